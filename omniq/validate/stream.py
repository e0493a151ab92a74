"""The layer-streamed evaluation behind `omniq validate`: the reference and the candidate side by side, one
decoder layer at a time, on the same token rows.

Three streams run through every layer on every row: the float32 reference, the reference as a BF16 engine
runs it (the noise floor: every linear's input, weight and output rounded to bf16, K / V in bf16,
`artifact.bf16_compute_hooks`) and the candidate as its engine runs it (`artifact.EngineLinear`). Per step:

  towers       (Omni) each artifact's vision / audio towers embed the media samples, then are released;
  embeddings   both embedding matrices: the rows' input embeddings (media embeddings spliced in);
  layer i      layer i of both artifacts, read from the shards in their stored dtype onto the device
               (`Artifact.unit`), dequantized to float32 per matrix on use; every row of every evaluation
               set goes through it in batches; then both are released;
  head         final norm and lm_head of both; logits in chunks of tokens (`LOGITS_CHUNK_BYTES`: a
               131,072-entry vocabulary in float64 is 1 MiB per token), each chunk scored and dropped.

So memory is the hidden states of the rows (three streams) plus one layer of each artifact plus a logits
chunk, whatever the depth (`estimate_bytes`). The per-layer diagnostics (weight SQNR of every quantized
matrix, unquantized tensors that differ) are computed from the layer while it is loaded. Everything stays on
the device until the run is over (`Outcome.summary`), so the same code runs on CPU, CUDA and, in the
tests, PyTorch's `meta` device.

With a reference cache hit (`omniq.validate.reference_cache`, `validate --reference-cache`) the reference and
noise-floor streams are not run: the reference's head states and the noise floor's scores are read instead.

Why not transformers' model with accelerate offloading: its CPU Mamba path is wrong past chunk_size
(tests/validate/test_forward.py), and the candidate must run with engine numerics (quantized activations,
fused q/k/v scales, FP8 KV cache) that no library model applies to an exported checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from omniq.heap import give_back
from omniq.model import forward, omni
from omniq.validate.artifact import (Artifact, bf16_compute_hooks, changed_unquantized, unquantized_names)
from omniq.validate.metrics import Comparison, compare_logits, sqnr_from_sums, sqnr_sums

BATCH_ROWS = 8                     # rows per forward batch inside a layer
LOGITS_CHUNK_BYTES = 256 * 2**20   # float64 log-probabilities of one chunk, both models
KEEP_FLOAT32_BYTES = 64 * 2**20    # a layer smaller than this in float32 keeps its dequantized matrices
LAZY_LAYER_BYTES = 1 * 2**30     # a layer larger than this stored is read matrix by matrix when used
KEEP_ALL = math.inf                # the embedding and head steps keep theirs (converted once, not per batch)
STREAMS = ("reference", "noise_floor", "candidate")

Progress = Callable[[int, int], None]


@dataclass
class Item:
    """One batch of rows of one evaluation set: input ids (b, L), the scored predictions `select` (positions
    of the inputs whose next token is scored) and their targets (b, S); media embeddings for Omni sets."""

    set: str
    input_ids: torch.Tensor
    targets: torch.Tensor
    select: slice = field(default_factory=lambda: slice(None))
    media: dict = field(default_factory=dict)      # stream -> {"image": embeds, "audio": embeds}


@dataclass
class Outcome:
    """What a run leaves, still on the device: per set and stream a Comparison against the reference, the
    per-module SQNR sums and the unquantized tensors' largest differences."""

    comparisons: dict[str, dict[str, Comparison]]
    sqnr: dict[str, torch.Tensor]
    changed: dict[str, torch.Tensor]
    changed_elsewhere: dict[str, float]

    def merge(self, into: str, sets: list[str]) -> None:
        """Add set `into` holding every token of `sets` (which stay as they are), per stream."""
        parts = [self.comparisons[s] for s in sets if s in self.comparisons]
        self.comparisons[into] = {k: Comparison.merged([p[k] for p in parts]) for k in parts[0]}

    def summary(self, positions: bool = False) -> dict:
        """{set: {stream: metrics}}, {module: SQNR dB}, {tensor: largest difference}: host numbers."""
        metrics = {s: {k: c.summary(position_buckets=positions and s == "text") for k, c in by.items()}
                   for s, by in self.comparisons.items()}
        sqnr = {m: sqnr_from_sums(v) for m, v in sorted(self.sqnr.items())}
        changed = {n: float(v) for n, v in self.changed.items() if not float(v) == 0.0}
        changed.update(self.changed_elsewhere)
        return metrics, sqnr, changed


# ----- which tensors belong to which step ---------------------------------------------------------------
def layer_names(artifact: Artifact, i: int) -> list[str]:
    """Layer i's base tensors (norm, mixer weights, biases, router), in file order."""
    return artifact.names_by_layer.get(i, [])


def head_names(artifact: Artifact) -> list[str]:
    a = artifact.arch
    return [a.norm_f, a.head_weight]


def embedding_names(artifact: Artifact) -> list[str]:
    return [artifact.arch.embedding_weight]


def tower_names(artifact: Artifact) -> list[str]:
    return [n for n in artifact.base_names if omni.component_of(n) not in ("language_model", "other")]


def streamed_names(artifact: Artifact) -> set[str]:
    out = set(embedding_names(artifact)) | set(head_names(artifact))
    for i in range(artifact.arch.num_layers):
        out |= set(layer_names(artifact, i))
    return out


def step_bytes(art: Artifact, names: list[str], *, keep_all: bool = False, lazy: bool = False) -> int:
    """Memory of one step's weights of one artifact, from the headers: the stored tensors, plus their float32
    form where it is kept (all of it with `keep_all`, the embedding / head steps; a layer below
    KEEP_FLOAT32_BYTES), plus the float32 matrices converted on use; `lazy`: one matrix at a time."""
    stored = art.unit_bytes(names)
    f32 = [4 * _numel(art.logical_shape(n)) for n in names]
    if lazy:                 # read matrix by matrix
        return max(art.unit_bytes([n]) for n in names) + 3 * max(f32)
    if keep_all:             # embedding / head: float32 kept once (counted for both, shared or not)
        return stored + sum(f32)
    kept = sum(f32) if sum(f32) < KEEP_FLOAT32_BYTES else 0
    return stored + kept + 3 * (max(f32) if f32 else 0)


def activation_bytes(arch, tokens: int) -> int:
    """One batch of `tokens` inside a layer: the Mamba in_proj output and scan blocks, the routed experts'
    inputs, the layer's output."""
    per_token = (4 * arch.in_proj_out + 3 * arch.mamba_num_heads * arch.chunk_size
                 + 2 * arch.num_experts_per_tok * max(arch.moe_intermediate_size, arch.hidden_size)
                 + 4 * arch.hidden_size)
    return tokens * per_token * 4


def logits_bytes(arch) -> int:
    """A logits chunk: its float32 logits and log-probabilities of both models in float64."""
    return 2 * LOGITS_CHUNK_BYTES + 3 * _chunk_tokens(arch.vocab_size) * arch.vocab_size * 4


def estimate_bytes(reference: Artifact, candidate: Artifact, tokens: int, with_noise_floor: bool = True,
                   batch_tokens: int | None = None) -> dict:
    """Peak memory of a run, from the headers: the largest step of each artifact (`step_bytes`), the hidden
    states of every evaluated token for each stream, one batch's activations inside a layer (`batch_tokens`,
    default all tokens) and a logits chunk."""
    arch = reference.arch

    def step(art: Artifact, names: list[str], keep_all: bool = False) -> int:
        lazy = not keep_all and reference.unit_bytes(names) > LAZY_LAYER_BYTES
        return step_bytes(art, names, keep_all=keep_all, lazy=lazy)

    kept_steps = [embedding_names(reference), head_names(reference)]
    steps = [tower_names(reference)] + [layer_names(reference, i) for i in range(arch.num_layers)]
    largest = max([step(reference, s, True) + step(candidate, s, True) for s in kept_steps if s]
                  + [step(reference, s) + step(candidate, s) for s in steps if s])
    n_streams = 3 if with_noise_floor else 2
    hidden = n_streams * tokens * arch.hidden_size * 4
    activations = activation_bytes(arch, min(tokens, batch_tokens or tokens))
    logits = logits_bytes(arch)
    total = largest + hidden + activations + logits
    return {"largest_step_bytes": largest, "hidden_states_bytes": hidden, "activations_bytes": activations,
            "logits_chunk_bytes": logits, "total_bytes": total}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _chunk_tokens(vocab: int) -> int:
    """Tokens per logits chunk: both models' float64 log-probabilities of a chunk within LOGITS_CHUNK_BYTES."""
    return max(1, LOGITS_CHUNK_BYTES // (2 * 8 * vocab))


def _layer_step(reference: Artifact, candidate: Artifact, i: int, hidden: dict[str, list[torch.Tensor]], device,
                diagnose, kv_amax: dict | None = None) -> None:
    """Layer i of both artifacts, loaded, run on every stream's hidden states (in place in `hidden`),
    diagnosed and released when this returns (a large layer's pages and the shards' maps given back)."""
    arch = reference.arch
    names = layer_names(reference, i)
    stored = reference.unit_bytes(names)
    lazy = stored > LAZY_LAYER_BYTES                          # a real-width MoE layer: matrix by matrix
    ref_u = reference.unit(names, device, KEEP_FLOAT32_BYTES, lazy=lazy)
    cand_u = candidate.unit(names, device, KEEP_FLOAT32_BYTES, lazy=lazy)
    hooks = {"reference": (ref_u, forward.plain_linear(ref_u), None),
             "noise_floor": (ref_u, *bf16_compute_hooks(ref_u)),
             "candidate": (cand_u, candidate.linear(cand_u), _recording(candidate.kv(), kv_amax))}
    for s in hidden:
        weights, linear, kv = hooks[s]
        hidden[s] = [forward.decoder_layer(arch, weights, i, x, linear=linear, kv=kv) for x in hidden[s]]
    diagnose(ref_u, cand_u, names)
    del ref_u, cand_u, hooks
    if stored > KEEP_FLOAT32_BYTES:
        give_back()                          # a large layer's freed pages, not kept by the allocator
        for art in (reference, candidate):
            if art.reader is not None:
                art.reader.unmap()


def _recording(kv, kv_amax: dict | None):
    """The candidate's K / V hook, also recording the largest |K| / |V| per layer (`gates.check_kv`)."""
    if kv is None or kv_amax is None:
        return kv
    from omniq.validate.gates import recording_kv

    return recording_kv(kv, kv_amax)


# ----- the run ------------------------------------------------------------------------------------------
@torch.inference_mode()
def run(reference: Artifact, candidate: Artifact, items: list[Item], *, device="cpu", noise_floor: bool = True,
        progress: Progress | None = None, kv_amax: dict | None = None, cache=None) -> Outcome:
    """Evaluate `items` through both artifacts layer by layer; see the module docstring. `cache`: a
    `reference_cache.Entry`: when it holds the reference streams' head states (a hit) only the candidate's
    stream runs through the layers; otherwise they are computed and stored in it."""
    device = torch.device(device)
    arch = reference.arch
    streams = [s for s in STREAMS if noise_floor or s != "noise_floor"]
    # a cache hit: the reference's head states and the noise floor's per-token scores, read, not run
    cached = cache.states if cache is not None and cache.hit else {}
    computed: dict[str, list] = {}
    running = [s for s in streams if s not in cached]       # the streams run through the layers
    steps = arch.num_layers + 2
    done = 0
    sqnr: dict[str, torch.Tensor] = {}
    changed: dict[str, torch.Tensor] = {}

    def diagnose(ref_u, cand_u, names):
        for n in names:
            module = n[: -len(".weight")] if n.endswith(".weight") else None
            if module in candidate.quantized:
                sqnr[module] = sqnr_sums(ref_u[n], cand_u[n])
        for n in unquantized_names(reference, candidate, names):
            if ref_u[n] is cand_u[n]:          # shared: the same stored bytes (`share_identical`)
                continue
            changed[n] = (ref_u[n] - cand_u[n]).abs().max() if ref_u[n].numel() else ref_u[n].new_zeros(())

    # embeddings: every row's input (media embeddings spliced in)
    names = embedding_names(reference)
    ref_u, cand_u = reference.unit(names, device, KEEP_ALL), candidate.unit(names, device, KEEP_ALL)
    cand_u.share_identical(ref_u)
    diagnose(ref_u, cand_u, names)
    tokens = omni.context_tokens(reference.checkpoint.config, reference.tokenizer) if any(
        it.media for it in items) else None
    hidden: dict[str, list[torch.Tensor]] = {s: [] for s in running}
    for it in items:
        ids = it.input_ids.to(device)
        for s, u in (("reference", ref_u), ("candidate", cand_u)):
            if s not in hidden:
                continue
            if it.media:
                m = it.media[s]
                x = omni.splice(arch, u, ids, m.get("image"), m.get("audio"), tokens=tokens)
            else:
                x = forward.embed(arch, u, ids)
            hidden[s].append(x)
        if "noise_floor" in hidden:
            hidden["noise_floor"].append(hidden["reference"][-1])
    del ref_u, cand_u
    give_back()
    done += 1
    if progress is not None:
        progress(done, steps)

    # decoder layers
    for i in range(arch.num_layers):
        _layer_step(reference, candidate, i, hidden, device, diagnose, kv_amax)
        done += 1
        if progress is not None:
            progress(done, steps)

    # final norm, lm_head, scores in chunks of tokens
    names = head_names(reference)
    ref_u, cand_u = reference.unit(names, device, KEEP_ALL), candidate.unit(names, device, KEEP_ALL)
    cand_u.share_identical(ref_u)
    diagnose(ref_u, cand_u, names)
    heads = {"reference": (ref_u, forward.plain_linear(ref_u)),
             "noise_floor": (ref_u, bf16_compute_hooks(ref_u)[0]),
             "candidate": (cand_u, candidate.linear(cand_u))}
    comparisons: dict[str, dict[str, Comparison]] = {}
    chunk = _chunk_tokens(arch.vocab_size)
    for k, it in enumerate(items):
        by = comparisons.setdefault(it.set, {s: Comparison() for s in streams if s != "reference"})
        targets = it.targets.to(device)
        b, S = targets.shape
        flat = {}
        for s in running:
            u = heads[s][0]
            flat[s] = forward.final_norm(arch, u, hidden[s][k][:, it.select]).reshape(b * S, -1)
            hidden[s][k] = None
        if "reference" in cached:
            flat["reference"] = cached["reference"][k]
        elif cache is not None:
            computed.setdefault("reference", []).append(flat["reference"])
        floor = cached.get("noise_floor", [None] * len(items))[k]     # its scores, when cached
        floor_scores = []
        t = targets.reshape(-1)
        pos = torch.arange(S, device=device).repeat(b)
        for c, a in enumerate(range(0, b * S, chunk)):
            sl = slice(a, a + chunk)
            logits = {s: forward.lm_head(arch, heads[s][0], flat[s][sl], heads[s][1]) for s in flat}
            compare_logits(logits.pop("reference"), logits, t[sl], pos[sl], by)
            if floor is not None:
                by["noise_floor"].add_scores(floor["kl"][sl], floor["agree"][sl], pos[sl], floor["nll"][c])
            elif "noise_floor" in by:
                nf = by["noise_floor"]
                floor_scores.append((nf.kl[-1], nf.agree[-1], nf.nll[-1]))
        if cache is not None and floor_scores:
            computed.setdefault("noise_floor", []).append(
                {"kl": torch.cat([f[0] for f in floor_scores]), "agree": torch.cat([f[1] for f in floor_scores]),
                 "nll": torch.stack([f[2] for f in floor_scores])})
    del ref_u, cand_u, heads
    if cache is not None and computed:
        from omniq.validate import reference_cache

        reference_cache.store(cache, computed)
    give_back()
    done += 1
    if progress is not None:
        progress(done, steps)

    # the rest (towers, anything outside the language model): tensor by tensor
    streamed = streamed_names(reference)
    rest = [n for n in reference.base_names if n not in streamed]
    elsewhere = changed_unquantized(reference.weights, candidate.weights,
                                    unquantized_names(reference, candidate, rest))
    return Outcome(comparisons, sqnr, changed, elsewhere)
