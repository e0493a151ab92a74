"""`omniq validate --generate N`: greedy continuations of held-out prompts by both models, not only next-token
statistics.

Each of N held-out documents (the evaluation set's, in order) gives a prompt: `<s>` and its first
`PROMPT_TOKENS` tokens. Both the reference and the candidate continue every prompt greedily (argmax) for up to
`max_new_tokens` tokens or until they emit EOS, through the same forward validate scores with (the
candidate dequantized, activations and KV cache quantized as an engine would). Decoding re-runs the whole
sequence for every new token (no KV / Mamba-state cache): exact, and cheap on the bundled models (N x
max_new_tokens forwards of at most PROMPT_TOKENS + max_new_tokens tokens, batched over the prompts); on a
real-width model it is slow, which is why it is opt-in. Unlike the rest of validate it is not layer-streamed:
both models' weights are read (and the candidate's dequantized) once into memory for the decoding loop, on
validate's `--device` (`weights_on`: one tensor at a time, so host memory holds one float32 matrix beyond what
the device holds), where the prompts are decoded too; the generated ids are read back once per step.

Reported under `generation`: the share of prompts whose first 16 / 64 generated tokens are identical in both
models (`same_first_16`, `same_first_64`; one that stopped earlier differs; null when the budget is shorter),
how often each model stopped with EOS within the budget (`eos_rate_reference`,
`eos_rate_candidate`), the mean generated lengths and their ratio candidate / reference (`length_ratio`: the
"reasoning traces got 16 % longer" regression that accuracy gates miss). The length ratio is gated by default:
it must lie in [`min_length_ratio`, `max_length_ratio`] (`DEFAULT_LENGTH_RATIO`, or the gates file).

On an Omni checkpoint the same is done for image and audio prompts (`media`: up to N of the evaluation
samples of each modality validate scores, `omniq.validate.multimodal`): the prompt is the sample up to its
caption (the text before, the media's context tokens, the text after), each model's own towers embed the media
once and the embeddings are spliced in at every step, and both models caption greedily. Each modality gets the
same statistics under `generation.modalities.<modality>`, and its own length-ratio gate (the gates file's
`<format>.<modality>.min_length_ratio` / `max_length_ratio`, else the format's). `generation.passed` holds when
every modality's gate holds; the top-level statistics are the text prompts'.

With `--eval-format chat` the text prompts are the conversations without their last assistant turn, rendered
through the chat template with the generation prompt (`chat_prompts`, reasoning on / off as the evaluation
rows), decoded one at a time; each reasoning split has its statistics and gate under `generation.reasoning`.

A length ratio outside its band fails only when the paired per-prompt difference of lengths is beyond
`SIGNIFICANT_SE` standard errors: with few prompts, one that stops early in one model and runs to the budget
in the other moves the ratio by more than the band (measured on the bundled Omni model, docs/trust.md).
"""

from __future__ import annotations

import math
import statistics as statistics_

import torch

from omniq.errors import OmniqError
from omniq.model import forward
from omniq.validate.gates import DEFAULT_LENGTH_RATIO  # noqa: F401  (the band is a gate; re-exported)

PROMPT_TOKENS = 32
DEFAULT_MAX_NEW_TOKENS = 128
PREFIXES = (16, 64)
SIGNIFICANT_SE = 2.0     # a length ratio outside its band fails only when the paired difference exceeds 2 s.e.


def prompts(tokenizer, docs, n: int, prompt_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """(n, prompt_tokens + 1): `<s>` + the first tokens of the first n documents long enough to give them."""
    if n < 1:
        raise OmniqError("--generate must be at least 1")
    out = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            out.append(bos + ids[:prompt_tokens])
        if len(out) == n:
            break
    if len(out) < n:
        raise OmniqError(f"--generate {n}: the evaluation text has only {len(out)} documents of at least "
                         f"{prompt_tokens} tokens; pass fewer prompts or more text")
    return torch.tensor(out, dtype=torch.long)


@torch.inference_mode()
def greedy(arch, weights, prompt: torch.Tensor, max_new_tokens: int, eos: int | None, *, linear=None,
           kv=None, embed=None) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuations of a batch of equal-length prompts: (generated ids per prompt, stopped with EOS).
    `embed(ids) -> inputs_embeds`: the input embeddings of the whole sequence (an Omni prompt's media spliced
    in), instead of the embedding lookup."""
    seq = prompt.clone()
    done = [False] * prompt.shape[0]
    gen: list[list[int]] = [[] for _ in range(prompt.shape[0])]
    stopped = [False] * prompt.shape[0]
    for _ in range(max_new_tokens):
        if embed is None:
            out = forward.logits(arch, weights, seq, linear=linear, kv=kv)
        else:
            out = forward.logits(arch, weights, linear=linear, kv=kv, inputs_embeds=embed(seq))
        nxt = out[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            gen[i].append(t)
            if eos is not None and t == eos:
                done[i] = True
                stopped[i] = True
        if all(done):
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return gen, stopped


def weights_on(artifact, device) -> dict[str, torch.Tensor]:
    """Every base tensor of `artifact` dequantized to float32 on `device`, read and moved one at a time."""
    lazy = artifact.weights
    return {n: lazy[n].to(device) for n in lazy}


def compare(reference, candidate, docs, n: int, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            length_ratio: tuple[float, float] = DEFAULT_LENGTH_RATIO, candidate_weights=None,
            media: dict | None = None, media_length_ratio: dict | None = None,
            chat_prompts: dict[str, list[str]] | None = None, device="cpu") -> dict:
    """The `generation` section of the report (see the module doc), with its gates' `failures`.
    `candidate_weights`: the candidate's tensors as a mapping (default: read from its files once).
    `media`: {modality: [MediaInputs]} of an Omni checkpoint (the first n of each are generated from);
    `media_length_ratio`: {modality: (lo, hi)} (default `length_ratio`). `chat_prompts` (--eval-format chat):
    {reasoning_on: [...], reasoning_off: [...]} rendered prompts, generated from instead of the documents'
    first tokens (`chat_split_counts` of them per split), reported and gated per split under `reasoning`."""
    if max_new_tokens < 1:
        raise OmniqError("--max-new-tokens must be at least 1")
    tok = reference.tokenizer
    eos = tok.eos_token_id
    device = torch.device(device)
    rw = weights_on(reference, device)
    cw = weights_on(candidate, device) if candidate_weights is None else candidate_weights
    linear, kv = candidate.linear(cw), candidate.kv()
    if chat_prompts is None:
        p = prompts(tok, docs, n).to(device)
        ref, ref_eos = greedy(reference.arch, rw, p, max_new_tokens, eos)
        cand, cand_eos = greedy(candidate.arch, cw, p, max_new_tokens, eos, linear=linear, kv=kv)
        out = dict(statistics(ref, cand, ref_eos, cand_eos, max_new_tokens, length_ratio, "generation"),
                   prompt_tokens=PROMPT_TOKENS)
        split_failures = []
    else:
        got, per = {s: ([], [], [], []) for s in chat_prompts}, {}
        for split, texts in chat_prompts.items():
            for text in texts:
                p = torch.tensor([([tok.bos_token_id] if tok.bos_token_id is not None else [])
                                  + tok(text, add_special_tokens=False)["input_ids"]], device=device)
                for k, (g, stopped) in enumerate((greedy(reference.arch, rw, p, max_new_tokens, eos),
                                                  greedy(candidate.arch, cw, p, max_new_tokens, eos,
                                                         linear=linear, kv=kv))):
                    got[split][k].append(g[0])
                    got[split][2 + k].append(stopped[0])
            r, c, re, ce = got[split]
            per[split[len("reasoning_"):]] = statistics(r, c, re, ce, max_new_tokens, length_ratio,
                                                        f"generation ({split.replace('_', ' ')})")
        joined = [sum((got[s][k] for s in got), []) for k in range(4)]
        out = dict(statistics(*joined, max_new_tokens, length_ratio, "generation"),
                   prompt="the conversation up to its last assistant turn, rendered with the generation prompt",
                   reasoning=per)
        split_failures = [f for v in per.values() for f in v["failures"]]
    out["decoding"] = "greedy, full re-forward per token (no cache)"
    failures = list(out["failures"]) + split_failures
    if media:
        out["modalities"] = {}
        for m, inputs in media.items():
            if not inputs[:n]:
                continue
            r = media_compare(reference, candidate, m, inputs[:n], rw, cw, linear, kv, max_new_tokens,
                              (media_length_ratio or {}).get(m, length_ratio), device)
            out["modalities"][m] = r
            failures += r["failures"]
    out.update(failures=failures, passed=not failures)
    return out


def media_compare(reference, candidate, modality: str, inputs: list, rw, cw, linear, kv, max_new_tokens: int,
                  length_ratio: tuple[float, float], device="cpu") -> dict:
    """Greedy captions of Omni media prompts by both models (one prompt at a time: their lengths differ)."""
    from omniq.model import omni
    from omniq.validate import multimodal

    cfg = reference.checkpoint.config
    tokens = omni.context_tokens(cfg, reference.tokenizer)
    emb = multimodal.embeds(reference, candidate, modality, inputs, device)
    key = "image_embeds" if modality == "image" else "audio_embeds"
    eos = reference.tokenizer.eos_token_id
    got: dict[str, tuple[list, list]] = {"reference": ([], []), "candidate": ([], [])}
    for k, x in enumerate(inputs):
        prompt = x.input_ids[:, :x.target_start].to(device)
        for stream, art, weights, lin, kvf in (("reference", reference, rw, None, None),
                                              ("candidate", candidate, cw, linear, kv)):
            e = emb[stream][k]

            def embed(seq, art=art, weights=weights, e=e):
                return omni.splice(art.arch, weights, seq, tokens=tokens, **{key: e})

            g, stopped = greedy(art.arch, weights, prompt, max_new_tokens, eos, linear=lin, kv=kvf, embed=embed)
            got[stream][0].append(g[0])
            got[stream][1].append(stopped[0])
    (ref, ref_eos), (cand, cand_eos) = got["reference"], got["candidate"]
    return dict(statistics(ref, cand, ref_eos, cand_eos, max_new_tokens, length_ratio, f"generation ({modality})"),
                prompt="the sample up to its caption (media spliced in)")


def statistics(ref: list[list[int]], cand: list[list[int]], ref_eos: list[bool], cand_eos: list[bool],
               max_new_tokens: int, length_ratio: tuple[float, float], label: str) -> dict:
    """Identical prefixes, EOS rates, mean lengths and their gated ratio for one set of prompts."""
    n = len(ref)
    # a continuation that stopped earlier than k differs from one that did not (EOS is a token too)
    same = {f"same_first_{k}": (sum(a[:k] == b[:k] for a, b in zip(ref, cand)) / n if max_new_tokens >= k else None)
            for k in PREFIXES}
    mean_ref = sum(map(len, ref)) / n
    mean_cand = sum(map(len, cand)) / n
    ratio = mean_cand / mean_ref
    diff = [len(c) - len(r) for r, c in zip(ref, cand)]
    se = statistics_.stdev(diff) / math.sqrt(n) if n > 1 else 0.0
    significant = abs(sum(diff) / n) > SIGNIFICANT_SE * se
    lo, hi = length_ratio
    failures = [] if lo <= ratio <= hi or not significant else [
        f"{label}: length_ratio {ratio:.3f} outside [{lo:g}, {hi:g}] (mean generated tokens {mean_cand:.1f} "
        f"vs the reference's {mean_ref:.1f}, paired difference {sum(diff) / n:+.1f} +- {se:.1f} over {n} prompts)"]
    return {"prompts": n, "max_new_tokens": max_new_tokens, **same,
            "eos_rate_reference": sum(ref_eos) / n, "eos_rate_candidate": sum(cand_eos) / n,
            "mean_length_reference": mean_ref, "mean_length_candidate": mean_cand, "length_ratio": ratio,
            "length_difference": {"mean": sum(diff) / n, "standard_error": se, "significant": significant},
            "lengths_reference": [len(r) for r in ref], "lengths_candidate": [len(c) for c in cand],
            "gates": {"min_length_ratio": lo, "max_length_ratio": hi}, "passed": not failures,
            "failures": failures}
