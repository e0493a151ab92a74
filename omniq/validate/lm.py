"""An artifact from its files as an lm-eval-harness model (`ArtifactLM`), for `omniq eval`.

lm-eval drives any model through three calls (`lm_eval.api.model.LM`): `loglikelihood` (the log-probability
of a continuation after a context, and whether greedy decoding would produce it), `loglikelihood_rolling`
(a whole text's log-probability, for perplexity tasks) and `generate_until` (greedy text until a stop
string). `ArtifactLM` answers them with the forward `omniq validate` scores with: the checkpoint read by
`artifact.read_artifact`, each weight dequantized from its stored format, activations and the KV cache
quantized as the engine would (`Artifact.linear`, `Artifact.kv`), the same plain-torch NemotronH forward
(`omniq.model.forward`). A BF16 reference goes through the same path, so both scores of `omniq eval` differ
only by what the files hold.

Why not lm-eval's own `hf` model: transformers' NemotronH cannot run an exported FP8 / NVFP4 checkpoint
with engine numerics (quantized activations, fused q/k/v scales, FP8 KV), and its CPU Mamba path is wrong
past `chunk_size` (tests/validate/test_forward.py).

Scoring (`loglikelihood`, `loglikelihood_rolling`) is layer-streamed, as validate is: all requests are
tokenized, sorted by length and cut into batches (right-padded: every layer is causal and quantizes
activations per token or with static scales, so padding after a sequence changes nothing in it); then one
decoder layer of the artifact at a time is read from the shards onto the device and run on every batch, and
released (`score`); the head scores every scored position of a pass in chunks of tokens, with the
lm_head (or tied embedding) converted to float32 once per pass. Memory is one layer (the head: its float32
copy too, 1.4 GB at the real width) plus the hidden states of a pass (`PASS_BYTES`; more requests take
more passes, each reading the weights once). `generate_until` is not streamed: it decodes one request
at a time with the full sequence re-run per new token (no KV / Mamba-state cache), like `validate
--generate`, holding the dequantized weights in memory; exact but slow on real-width models. It is always
greedy (argmax): sampling arguments in a task's `generation_kwargs` are ignored; `until` and `max_gen_toks`
are honoured.

Every sequence starts with the tokenizer's BOS (the bundled models were trained on `<s> doc </s>`); a
context that is empty is BOS alone (`prefix_token_id`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lm_eval.api.model import TemplateLM

from omniq.heap import give_back
from omniq.model import forward
from omniq.validate.artifact import Artifact
from omniq.validate.metrics import log_probs
from omniq.validate.stream import (KEEP_FLOAT32_BYTES, _chunk_tokens, activation_bytes, embedding_names,
                                   head_names, layer_names, logits_bytes, step_bytes)

BATCH_TOKENS = 4096                # padded tokens per forward batch inside a layer
PASS_BYTES = 512 * 2**20           # float32 hidden states of one pass (its batches, all held between layers)
DEFAULT_MAX_LENGTH = 2048          # longest scored window (tokens): NemotronH has no position limit
DEFAULT_MAX_GEN_TOKENS = 256
ALWAYS = 2**62                     # keep_float32_below: the embedding / head matrices converted once per pass

Progress = Callable[[int, int], None]


# ----- the layer-streamed scorer ------------------------------------------------------------------------
def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), each within `batch_tokens` padded."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        if cur and lengths[cur[0]] * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def score(artifact: Artifact, seqs: list[list[int]], spans: list[int], *, device="cpu",
          batch_tokens: int = BATCH_TOKENS, pass_bytes: int = PASS_BYTES,
          progress: Progress | None = None) -> list[tuple[float, bool]]:
    """For each token sequence, (sum of log p of its last `spans[k]` tokens, whether each of them is the
    argmax): the model reads seq[:-1] and predicts seq[1:], layer-streamed (see the module doc)."""
    total, missed = score_on_device(artifact, seqs, spans, device=device, batch_tokens=batch_tokens,
                                    pass_bytes=pass_bytes, progress=progress)
    return [(t, m == 0) for t, m in zip(total.tolist(), missed.tolist())]      # the one copy to the host


@torch.inference_mode()
def score_on_device(artifact: Artifact, seqs: list[list[int]], spans: list[int], *, device="cpu",
                    batch_tokens: int = BATCH_TOKENS, pass_bytes: int = PASS_BYTES,
                    progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`score`'s figures left on the device: per sequence the float64 sum of log p of its scored tokens and
    the count of those that are not the argmax (every tensor made here is made on `device`: the tests run
    it on PyTorch's `meta` device)."""
    device = torch.device(device)
    arch = artifact.arch
    inputs = [s[:-1] for s in seqs]
    batches = _batches([len(x) for x in inputs], batch_tokens)
    per_token = 4 * arch.hidden_size
    passes, cur, used = [], [], 0
    for b in batches:
        size = len(b) * len(inputs[b[0]]) * per_token
        if cur and used + size > pass_bytes:
            passes.append(cur)
            cur, used = [], 0
        cur.append(b)
        used += size
    if cur:
        passes.append(cur)
    total = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    missed = torch.zeros(len(seqs), dtype=torch.long, device=device)
    steps, done = len(passes) * (arch.num_layers + 2), 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    kv = artifact.kv()
    for group in passes:
        u = artifact.unit(embedding_names(artifact), device, ALWAYS)
        hidden = []
        for b in group:
            width = len(inputs[b[0]])
            ids = torch.zeros(len(b), width, dtype=torch.long)
            for r, k in enumerate(b):
                ids[r, : len(inputs[k])] = torch.tensor(inputs[k], dtype=torch.long)
            hidden.append(forward.embed(arch, u, ids.to(device)))
        del u
        tick()
        for i in range(arch.num_layers):
            u = artifact.unit(layer_names(artifact, i), device, KEEP_FLOAT32_BYTES)
            linear = artifact.linear(u)
            hidden = [forward.decoder_layer(arch, u, i, x, linear=linear, kv=kv) for x in hidden]
            del u, linear
            give_back()                      # freed pages back to the OS (omniq.heap)
            tick()
        # the head: every scored position of the pass, in chunks of tokens (logits are vocab-wide)
        u = artifact.unit(head_names(artifact), device, ALWAYS)
        linear = artifact.linear(u)
        rows, targets, owners = [], [], []
        for b, x in zip(group, hidden):
            for r, k in enumerate(b):
                n, n_in = spans[k], len(inputs[k])
                rows.append(x[r, n_in - n: n_in])                        # the positions that predict them
                targets += seqs[k][-n:]
                owners += [k] * n
        del hidden
        h = torch.cat(rows) if rows else torch.zeros(0, arch.hidden_size, device=device)
        target = torch.tensor(targets, dtype=torch.long, device=device)
        owner = torch.tensor(owners, dtype=torch.long, device=device)
        chunk = _chunk_tokens(arch.vocab_size)
        for a in range(0, h.shape[0], chunk):
            sl = slice(a, a + chunk)
            lp = log_probs(forward.lm_head(arch, u, forward.final_norm(arch, u, h[sl]), linear))
            total.index_add_(0, owner[sl], lp.gather(-1, target[sl, None])[:, 0].double())
            missed.index_add_(0, owner[sl], (lp.argmax(-1) != target[sl]).long())
        del u, linear, h
        tick()
    return total, missed


def estimate_bytes(artifact: Artifact, *, generate: bool = False) -> dict:
    """Peak memory of `score` on one artifact, from the headers (`omniq eval` runs the reference, then the
    candidate): its largest step (`stream.step_bytes`: a layer as `score` loads it, whole; the embedding or
    head with its float32 copy), a pass's hidden states twice (a layer's outputs are made while its inputs
    are held), one batch's activations inside a layer, a logits chunk. With `generate` (a task that
    generates), also `generate_until`'s figure: every weight of the artifact in float32 at once."""
    arch = artifact.arch
    steps = [step_bytes(artifact, embedding_names(artifact), keep_all=True),
             step_bytes(artifact, head_names(artifact), keep_all=True)]
    steps += [step_bytes(artifact, layer_names(artifact, i)) for i in range(arch.num_layers)]
    hidden = 2 * max(PASS_BYTES, BATCH_TOKENS * 4 * arch.hidden_size)
    est = {"largest_step_bytes": max(steps), "hidden_states_bytes": hidden,
           "activations_bytes": activation_bytes(arch, BATCH_TOKENS), "logits_chunk_bytes": logits_bytes(arch)}
    est["total_bytes"] = sum(est.values())
    if generate:
        est["generation_bytes"] = sum(4 * math.prod(artifact.logical_shape(n)) for n in artifact.base_names)
    return est


# ----- the lm-eval model ---------------------------------------------------------------------------------
class ArtifactLM(TemplateLM):
    """One artifact (reference or candidate) as lm-eval's model; see the module doc."""

    def __init__(self, artifact: Artifact, *, device: str | torch.device = "cpu",
                 max_length: int = DEFAULT_MAX_LENGTH, progress: Progress | None = None):
        super().__init__()
        self.artifact = artifact
        self.tokenizer = artifact.tokenizer
        self._device = torch.device(device)
        self.max_length = max_length
        self.progress = progress
        self.forwards = 0                  # scored sequences, for the report

    # tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return str(self.artifact.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _with_prefix(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[0] == self.prefix_token_id else [self.prefix_token_id, *ids]

    # scoring
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)     # no tokenizing bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        seqs, spans = [], []
        for _, context_enc, continuation_enc in requests:
            seq = self._with_prefix(list(context_enc)) + list(continuation_enc)
            n = len(continuation_enc)
            if len(seq) > self.max_length + 1:          # keep the continuation and the nearest context
                seq = seq[-(self.max_length + 1):]
            seqs.append(seq)
            spans.append(min(n, len(seq) - 1))
        self.forwards += len(seqs)
        return score(self.artifact, seqs, spans, device=self._device, progress=self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        seqs, spans, owner = [], [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, target in map(make_disjoint_window, windows):
                seqs.append(list(context) + list(target))
                spans.append(len(target))
                owner.append(k)
        self.forwards += len(seqs)
        scores = score(self.artifact, seqs, spans, device=self._device, progress=self.progress)
        totals = [0.0] * len(requests)
        for k, (s, _) in zip(owner, scores):
            totals[k] += s
        return totals

    # generation
    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        if not requests:
            return []
        model = self.whole_model()
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
            ids = self._with_prefix(self.tok_encode(context))[-self.max_length:]
            seq = torch.tensor([ids], dtype=torch.long, device=self._device)
            new: list[int] = []
            text = ""
            for _ in range(budget):
                nxt = int(self.next_logits(model, seq).argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u and u in text for u in until):
                    break
                seq = torch.cat([seq, torch.tensor([[nxt]], device=self._device)], dim=1)
            for u in until:
                if u and u in text:
                    text = text.split(u)[0]
            self.forwards += 1
            out.append(text)
        return out

    def whole_model(self) -> tuple[dict, object, object]:
        """What `generate_until` decodes with (not layer-streamed): every weight dequantized to float32 and
        moved to the device, the engine's linear and KV hooks."""
        from omniq.validate.generate import weights_on

        weights = weights_on(self.artifact, self._device)
        return weights, self.artifact.linear(weights), self.artifact.kv()

    def next_logits(self, model: tuple, seq: torch.Tensor) -> torch.Tensor:
        """The logits after the last token of `seq` (1, L), on the device."""
        weights, linear, kv = model
        return forward.logits(self.artifact.arch, weights, seq, linear=linear, kv=kv)[0, -1]
