"""Chat-format calibration and evaluation data: conversations rendered through the checkpoint's chat template,
with reasoning on and off in a share the user chooses (`--calib-format chat`, `--eval-format chat`,
`--reasoning-share`).

A source row holds a conversation in a `messages` column (`--calib-column` / `--eval-column`): a list of
OpenAI-style messages `{"role": ..., "content": ..., ["reasoning_content": ...]}`, the shape of
`nvidia/Nemotron-Post-Training-Dataset-v2` and of most chat data sets. Each conversation is rendered with
`tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=...)` (transformers; the template is
the checkpoint's own, from `chat_template.jinja` or `tokenizer_config.json`), so the text is exactly what the
model sees when served. A conversation that does not end with an assistant turn gets the generation prompt
(`add_generation_prompt=True`).

Reasoning on / off is the real Nemotron 3 template's `enable_thinking` switch (its default is on: the
generation prompt opens `<think>\\n`; off opens `<think></think>`, and an assistant turn without reasoning is
written `<think></think>answer`; known from third-party copies of NVIDIA's `chat_template.jinja`, not from a
file in this repository). A conversation rendered with reasoning off also loses its `reasoning_content`
(ModelOpt's `prepare_messages_for_chat_template` "strip" mode); with reasoning on the field is passed to the
template as it is ("native"). omniq normalises the messages itself (tool-call arguments given as JSON strings
become mappings, as ModelOpt does for the Nemotron v3 templates) because importing ModelOpt patches torch
process-wide, which `omniq validate` must not do.

Which conversations are rendered with reasoning on: conversation i (in source order, after `--calib-seed`'s
sampling) is on when floor((i+1) x share) > floor(i x share): exactly the share, spread evenly through the
data (share 0.5 alternates off, on, ...), reproducible, no random state.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Iterator

from omniq.errors import OmniqError

FORMATS = ("text", "chat")
COLUMN = "messages"
DEFAULT_REASONING_SHARE = 0.5
SPLITS = ("reasoning_on", "reasoning_off")


def check_format(fmt: str, option: str) -> str:
    if fmt not in FORMATS:
        raise OmniqError(f"{option} {fmt!r}: expected text or chat")
    return fmt


def check_share(share: float | None, fmt: str, option: str = "--reasoning-share") -> float:
    """The reasoning share for `fmt` (chat: default DEFAULT_REASONING_SHARE; text: must not be given)."""
    if fmt != "chat":
        if share is not None:
            raise OmniqError(f"{option} applies to chat data only; add --calib-format chat / --eval-format chat")
        return 0.0
    if share is None:
        return DEFAULT_REASONING_SHARE
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise OmniqError(f"{option} {share!r}: must be a share between 0 and 1 (0: all reasoning off, 1: all on)")
    return float(share)


def template_of(tokenizer, where: str) -> str:
    """The checkpoint's chat template (one-line error when it has none)."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):        # named templates: the default one
        tpl = tpl.get("default")
    if not tpl:
        raise OmniqError(f"{where}: the checkpoint has no chat template (no chat_template.jinja and no "
                         "chat_template in tokenizer_config.json), so chat-format data cannot be rendered; "
                         "use the text format or add the model's template")
    return tpl


def reasoning_on(i: int, share: float) -> bool:
    """Whether conversation i is rendered with reasoning on (exactly `share` of them, evenly spread)."""
    s = Fraction(str(share))
    return math.floor((i + 1) * s) > math.floor(i * s)


def check_messages(value, where: str, row: int, column: str = COLUMN) -> list[dict]:
    """A conversation: a non-empty list of messages with a string `role` and a string `content` (None or
    absent only beside `tool_calls`)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise OmniqError(f"{where}: row {row} column {column!r} holds text, not a list of messages; "
                             "use the text format for a text column") from None
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        raise OmniqError(f"{where}: row {row} column {column!r} holds {what}, not a list of "
                         "{role, content} messages")
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise OmniqError(f"{where}: row {row} message {k} is {type(m).__name__}, not a {{role, content}} mapping")
        if not isinstance(m.get("role"), str):
            raise OmniqError(f"{where}: row {row} message {k} has no string 'role'")
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (content is None and m.get("tool_calls")):
            raise OmniqError(f"{where}: row {row} message {k} ({m['role']}) has no string 'content'")
    return value


def _arguments(args):
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return args if isinstance(args, dict) else {}


def prepared(messages: list[dict], thinking: bool) -> list[dict]:
    """Messages as the template takes them: `reasoning_content` kept (on) or dropped (off); tool-call
    arguments as mappings."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None or k == "content"}
        if not thinking:
            m.pop("reasoning_content", None)
        if isinstance(m.get("tool_calls"), list):
            calls = []
            for tc in m["tool_calls"]:
                if isinstance(tc, dict):
                    tc = dict(tc)
                    if "arguments" in tc:
                        tc["arguments"] = _arguments(tc["arguments"])
                    if isinstance(tc.get("function"), dict) and "arguments" in tc["function"]:
                        tc["function"] = dict(tc["function"], arguments=_arguments(tc["function"]["arguments"]))
                calls.append(tc)
            m["tool_calls"] = calls
        out.append(m)
    return out


def render(tokenizer, messages: list[dict], thinking: bool, where: str, row: int) -> str:
    """One conversation through the chat template with `enable_thinking=thinking`."""
    try:
        text = tokenizer.apply_chat_template(prepared(messages, thinking), tokenize=False,
                                             add_generation_prompt=messages[-1].get("role") != "assistant",
                                             enable_thinking=thinking)
    except Exception as e:  # noqa: BLE001 - jinja2 TemplateError, raise_exception(), a template's TypeError
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"{where}: the chat template rejects row {row} (reasoning "
                         f"{'on' if thinking else 'off'}; {type(e).__name__}: {first})") from None
    if not isinstance(text, str) or not text.strip():
        raise OmniqError(f"{where}: the chat template renders row {row} as empty text")
    return text


@dataclass
class Rendered:
    """What rendering produced so far: conversations per split (filled while the texts are read)."""

    share: float
    template_sha256: str
    column: str
    counts: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def identity(self) -> dict:
        return {"format": "chat", "column": self.column, "reasoning_share": self.share,
                "conversations": dict(self.counts), "chat_template_sha256": self.template_sha256,
                "rendering": "tokenizer.apply_chat_template(messages, enable_thinking=on/off); reasoning_content "
                             "dropped when off; generation prompt when the last turn is not the assistant's"}


def start(tokenizer, share: float, where: str, column: str = COLUMN) -> Rendered:
    tpl = template_of(tokenizer, where)
    return Rendered(share, hashlib.sha256(tpl.encode()).hexdigest(), column)


def texts(conversations: Iterable, tokenizer, state: Rendered, where: str) -> Iterator[str]:
    """Rendered conversations in order (lazily), reasoning on / off by `reasoning_on`; counts in `state`."""
    for i, conv in enumerate(conversations):
        on = reasoning_on(i, state.share)
        state.counts[SPLITS[0 if on else 1]] += 1
        yield render(tokenizer, conv, on, where, i)


def prompt_of(messages: list[dict]) -> list[dict]:
    """The conversation a model answers: without its final assistant turn (unchanged if it has none)."""
    return messages[:-1] if len(messages) > 1 and messages[-1].get("role") == "assistant" else messages


def split(conversations: Iterable, tokenizer, state: Rendered, where: str
          ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({reasoning_on: [...], reasoning_off: [...]} every conversation rendered, the same for its prompt
    (`prompt_of`, with the generation prompt) for --generate): evaluation sets."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    prompts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, conv in enumerate(conversations):
        on = reasoning_on(i, state.share)
        out[SPLITS[0 if on else 1]].append(render(tokenizer, conv, on, where, i))
        prompts[SPLITS[0 if on else 1]].append(render(tokenizer, prompt_of(conv), on, where, i))
        state.counts[SPLITS[0 if on else 1]] += 1
    return out, prompts


def split_counts(n: int, share: float, option: str = "--samples") -> dict[str, int]:
    """n rows (or prompts) shared between the splits in proportion `share`: each split of a share strictly
    between 0 and 1 gets at least one."""
    n_on = math.floor(n * share + 0.5)
    if 0.0 < share < 1.0:
        if n < 2:
            raise OmniqError(f"--reasoning-share {share:g} splits {option} into reasoning on and off: pass "
                             f"{option} 2 or more")
        n_on = min(max(n_on, 1), n - 1)
    return {SPLITS[0]: n_on, SPLITS[1]: n - n_on}
