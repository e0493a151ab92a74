"""Chat-format test data: a copy of a bundled checkpoint with a chat template added, and conversations.

The template is written for these tests (not NVIDIA's): ChatML turns as the real Nemotron 3 template writes
them, `enable_thinking` defaulting to on, the generation prompt `<think>\\n` (on) or `<think></think>` (off),
an assistant turn's `reasoning_content` inside `<think>...</think>` when on and an empty `<think></think>`
when off, and `raise_exception` for a role it does not know (the "template rejects the messages" case).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEMPLATE = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unsupported role ' ~ m.role) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' -}}"
    "{%- if m.role == 'assistant' -%}"
    "{%- if enable_thinking and m.reasoning_content -%}"
    "{{- '<think>\\n' ~ m.reasoning_content ~ '\\n</think>\\n' -}}"
    "{%- else -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- m.content ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)


def with_template(src: Path, dest: Path, template: str = TEMPLATE) -> Path:
    """A copy of checkpoint `src` with `chat_template.jinja` added (as NVIDIA's checkpoints ship it)."""
    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").write_text(template)
    return dest


def conversations(n: int, split: str = "eval", start: int = 0) -> list[list[dict]]:
    """n conversations from the bundled docstrings: a user question, the assistant's answer (a docstring) with
    its reasoning (the next docstring), every third one a two-turn conversation."""
    from omniq.calib import docstrings

    docs = [d for d in docstrings.texts(split) if len(d) > 200][start:]
    out = []
    for i in range(n):
        answer, thought = docs[2 * i], docs[2 * i + 1]
        conv = [{"role": "user", "content": "Explain: " + answer.splitlines()[0]},
                {"role": "assistant", "content": answer, "reasoning_content": thought}]
        if i % 3 == 2:
            conv = [{"role": "system", "content": "You document Python."}, *conv,
                    {"role": "user", "content": "And in one line?"},
                    {"role": "assistant", "content": answer.splitlines()[0]}]
        out.append(conv)
    return out


def write_jsonl(path: Path, convs: list[list[dict]], column: str = "messages") -> Path:
    path.write_text("".join(json.dumps({column: c}) + "\n" for c in convs))
    return path
