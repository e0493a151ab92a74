"""`omniq validate --generate N`: greedy continuations of held-out prompts by both models, not only next-token
statistics.

Each of N held-out documents (the evaluation set's, in order) gives a prompt: `<s>` and its first
`PROMPT_TOKENS` tokens. Both the reference and the candidate continue every prompt greedily (argmax) for up to
`max_new_tokens` tokens or until they emit EOS, through the same forward validate scores with (the
candidate dequantized, activations and KV cache quantized as an engine would). Decoding re-runs the whole
sequence for every new token (no KV / Mamba-state cache): exact, and cheap on the bundled models (N x
max_new_tokens forwards of at most PROMPT_TOKENS + max_new_tokens tokens, batched over the prompts); on a
real-width model it is slow, which is why it is opt-in. Unlike the rest of validate it is not layer-streamed:
both models' weights are read (and the candidate's dequantized) once into memory for the decoding loop.

Reported under `generation`: the share of prompts whose first 16 / 64 generated tokens are identical in both
models (`same_first_16`, `same_first_64`; one that stopped earlier differs; null when the budget is shorter),
how often each model stopped with EOS within the budget (`eos_rate_reference`,
`eos_rate_candidate`), the mean generated lengths and their ratio candidate / reference (`length_ratio`: the
"reasoning traces got 16 % longer" regression that accuracy gates miss). The length ratio is gated by default:
it must lie in [`min_length_ratio`, `max_length_ratio`] (`DEFAULT_LENGTH_RATIO`, or the gates file).
"""

from __future__ import annotations

import torch

from omniq.errors import OmniqError
from omniq.model import forward

PROMPT_TOKENS = 32
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_LENGTH_RATIO = (0.85, 1.15)
PREFIXES = (16, 64)


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
           kv=None) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuations of a batch of equal-length prompts: (generated ids per prompt, stopped with EOS)."""
    seq = prompt.clone()
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    gen: list[list[int]] = [[] for _ in range(prompt.shape[0])]
    stopped = [False] * prompt.shape[0]
    for _ in range(max_new_tokens):
        nxt = forward.logits(arch, weights, seq, linear=linear, kv=kv)[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            gen[i].append(t)
            if eos is not None and t == eos:
                done[i] = True
                stopped[i] = True
        if bool(done.all()):
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return gen, stopped


def compare(reference, candidate, docs, n: int, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            length_ratio: tuple[float, float] = DEFAULT_LENGTH_RATIO, candidate_weights=None) -> dict:
    """The `generation` section of the report (see the module doc), with its gate's `failures`.
    `candidate_weights`: the candidate's tensors as a mapping (default: read from its files once)."""
    if max_new_tokens < 1:
        raise OmniqError("--max-new-tokens must be at least 1")
    tok = reference.tokenizer
    p = prompts(tok, docs, n)
    eos = tok.eos_token_id
    ref, ref_eos = greedy(reference.arch, dict(reference.weights), p, max_new_tokens, eos)
    cw = dict(candidate.weights) if candidate_weights is None else candidate_weights
    cand, cand_eos = greedy(candidate.arch, cw, p, max_new_tokens, eos,
                            linear=candidate.linear(cw), kv=candidate.kv())
    # a continuation that stopped earlier than k differs from one that did not (EOS is a token too)
    same = {f"same_first_{k}": (sum(a[:k] == b[:k] for a, b in zip(ref, cand)) / n if max_new_tokens >= k else None)
            for k in PREFIXES}
    mean_ref = sum(map(len, ref)) / n
    mean_cand = sum(map(len, cand)) / n
    ratio = mean_cand / mean_ref
    lo, hi = length_ratio
    failures = [] if lo <= ratio <= hi else [
        f"generation: length_ratio {ratio:.3f} outside [{lo:g}, {hi:g}] (mean generated tokens {mean_cand:.1f} "
        f"vs the reference's {mean_ref:.1f})"]
    return {"prompts": n, "prompt_tokens": PROMPT_TOKENS, "max_new_tokens": max_new_tokens, **same,
            "eos_rate_reference": sum(ref_eos) / n, "eos_rate_candidate": sum(cand_eos) / n,
            "mean_length_reference": mean_ref, "mean_length_candidate": mean_cand, "length_ratio": ratio,
            "gates": {"min_length_ratio": lo, "max_length_ratio": hi}, "passed": not failures,
            "failures": failures, "decoding": "greedy, full re-forward per token (no cache)"}
