"""How much memory calibrating a model takes, predicted from its architecture alone.

At its peak, calibration holds the sum of:

weights
    every tensor of the language model as loaded for calibration (BF16 by default, the router's fp32
    tensors stay fp32), plus the towers and projectors of an Omni checkpoint when their size is known
    (they are loaded with the model even though they are never quantized).
quantizer state
    ModelOpt's `max` calibration keeps one fp32 `amax` per enabled quantizer (a weight and an input
    quantizer per quantized linear layer, one per expert for fused experts; k/v quantizers per attention
    layer with an FP8 KV cache): a few kilobytes. While a weight quantizer calibrates it reduces
    `|weight|`, a temporary the size of the largest quantized weight, counted here too.
activations
    one forward pass of `batch x seq_len` tokens with no gradients, freed layer by layer, so the peak is
    the residual stream plus the largest transient of any single layer, or the logits at the end:
    - hidden states: the residual stream and the layer output in the activation dtype, plus the fp32
      RMSNorm temporary;
    - Mamba: the `in_proj` output and the chunked SSD scan in fp32 as `omniq.model.mamba2.ssd_chunked`
      computes it (conv output, B/C repeated per head, the (heads, chunk, chunk) decay and score blocks,
      per-chunk states). This is an upper bound for the CUDA kernels, which fuse most of it;
    - MoE: fp32 router scores, the fp32 accumulator transformers' expert loop uses, the int64 expert mask,
      and one expert's up/down activations for every token (the worst case, and the case of calibration
      that routes every token to every expert);
    - attention: q/k/v, k/v repeated to every query head, and the output; scores are not materialised
      (scaled-dot-product attention, causal without a mask: calibration rows are packed, never padded, and
      ModelOpt's KV-cache quantizers leave the attention kernel alone);
    - logits: `vocab x tokens` from `lm_head` in the activation dtype and their fp32 copy (transformers'
      `.float()`), where tokens are the positions whose logits are computed: calibration asks for the last
      position of each row only (`logits_to_keep=1` in `omniq.quant.calibrate`), `logits_positions=None`
      counts every position.

The runtime itself (Python and its libraries on CPU; CUDA context and allocator slack on a GPU) is a fixed
allowance, `overhead`. Not modelled: the towers' own activations for image/audio calibration batches (small
next to the language model's).

The device is `cpu` (this machine's RAM), a GPU name from the one GPU table, `omniq.gpus` (h100,
h200, b200, ...: marketed capacity in GiB; the driver shows a little less, which the overhead allowance
covers), or an explicit `--device-memory`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omniq.errors import OmniqError
from omniq.model.arch import ATTENTION, MAMBA, MLP, MOE, Arch
from omniq.quant.plan import LayerPlan

GiB = 1024 ** 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The runtime itself. CPU: Python + torch + transformers + ModelOpt measured 0.65 GiB RSS besides the
# bundled model's own bytes (`quantize` of `tiny`: 0.73 GiB peak), rounded up. GPU: CUDA context,
# cuBLAS workspaces and allocator slack, an allowance (not measured here).
OVERHEAD = {"gpu": 2 * GiB, "cpu": 1 * GiB}
# The layer-streamed quantize's runtime besides the layer, its packed copy, activations and quantizer state:
# RssAnon 0.56 GiB once torch, transformers and ModelOpt are imported and the skeleton is built (a real-width
# `MEM*E` fp8 run sampled per stage; its peak, in the MoE layer's export, was 4.13 GiB against the layer x1.5
# of 3.63 GiB), rounded down to 0.5 GiB: the whole-model allowance of 1 GiB over-predicted it by 23 %.
STREAMED_OVERHEAD = {"gpu": 2 * GiB, "cpu": GiB // 2}
_AMAX = 4                       # one fp32 amax per quantizer


@dataclass(frozen=True)
class MemoryEstimate:
    device: str
    device_bytes: int | None          # capacity; None if unknown
    weights: int
    quantizer_state: int
    activations: int                  # peak of the activation parts below
    activation_parts: dict[str, int] = field(default_factory=dict)
    overhead: int = 0
    batch: int = 4
    seq_len: int = 256
    dtype: str = "bf16"
    towers_included: bool = True      # False: an Omni model whose tower size is unknown (not counted)
    available_bytes: int | None = None  # cpu only: memory available right now

    @property
    def total(self) -> int:
        return self.weights + self.quantizer_state + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    @property
    def headroom(self) -> int | None:
        return None if self.device_bytes is None else self.device_bytes - self.total

    def as_dict(self) -> dict:
        return {
            "device": self.device, "device_bytes": self.device_bytes,
            "available_bytes": self.available_bytes,
            "batch": self.batch, "seq_len": self.seq_len, "dtype": self.dtype,
            "weights_bytes": self.weights, "quantizer_state_bytes": self.quantizer_state,
            "activations_bytes": self.activations, "activation_parts_bytes": dict(self.activation_parts),
            "overhead_bytes": self.overhead, "peak_bytes": self.total,
            "peak_gib": round(self.total / GiB, 3),
            "towers_included": self.towers_included,
            "fits": self.fits, "headroom_bytes": self.headroom,
        }


# ----- devices -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'80', '80GiB', '141 GB', '2.7G', '512MiB', '123456789B' -> bytes. A bare number means GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise OmniqError(f"size {text!r}: expected a number with an optional unit, like 80GiB, 141GB or 2.7G")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    if unit == "B":
        return int(value)
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    binary = unit.endswith("IB") or len(unit) == 1          # "G" alone is taken as GiB
    base = 1024 if binary else 1000
    return int(value * base ** powers[unit[0]])


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])


def device_capacity(device: str, device_memory: str | None = None) -> tuple[str, int | None, int | None]:
    """(device label, capacity bytes, available bytes or None) for a device name or an explicit size."""
    name = device.strip().lower()
    if device_memory is not None:
        return name, parse_size(device_memory), None
    if name == "cpu":
        total, available = host_memory()
        return name, total, available
    from omniq.gpus import ALIASES, GPUS, resolve_gpu

    try:
        gpu = resolve_gpu(name)
    except OmniqError:
        raise OmniqError(f"--device {device!r}: unknown device; expected cpu, "
                         f"{', '.join(sorted(set(GPUS) | set(ALIASES)))}, "
                         "or give its size with --device-memory (e.g. 96GiB)") from None
    return gpu.name, gpu.memory_bytes, None


# ----- the estimate ------------------------------------------------------------------------------------
def weight_bytes(arch: Arch, dtype: str = "bf16") -> int:
    """The language model's weights as loaded for calibration (fp32 tensors, the router, stay fp32)."""
    size = DTYPE_BYTES[dtype]
    return sum(t.numel * max(size, 4 if t.dtype == "F32" else 2) for t in arch.tensors)


def quantizer_state_bytes(plan: LayerPlan, dtype: str = "bf16") -> int:
    """fp32 amax of every enabled quantizer, plus the |weight| temporary of the largest quantized weight."""
    n_quantizers = 2 * len(plan.quantized) + (2 * len(plan.arch.attention_layers) if plan.kv_cache else 0)
    largest = max((lin.params for lin in plan.quantized), default=0)
    return _AMAX * n_quantizers + largest * DTYPE_BYTES[dtype]


def activation_parts(arch: Arch, batch: int, seq_len: int, dtype: str = "bf16",
                     logits_positions: int | None = 1) -> dict[str, int]:
    """Bytes of each transient of one calibration forward (see the module docstring)."""
    a = DTYPE_BYTES[dtype]
    f = 4
    T = batch * seq_len
    h = arch.hidden_size
    parts = {"hidden_states": T * h * (2 * a + f)}
    if MAMBA in arch.kinds:
        Q = arch.chunk_size
        padded = batch * math.ceil(seq_len / Q) * Q
        heads, p, n = arch.mamba_num_heads, arch.mamba_head_dim, arch.ssm_state_size
        per_token = (arch.in_proj_out * (a + f)      # in_proj output and its fp32 copy
                     + 2 * arch.conv_dim * f         # conv output, silu
                     + 2 * heads * n * f             # B and C repeated per head
                     + 3 * heads * p * f             # x, x*dt, y
                     + 3 * heads * Q * f             # log-decay differences, decay, scores
                     + 2 * arch.mamba_inner * f)     # gated RMSNorm
        chunk_states = 2 * (padded // Q) * heads * p * n * f   # per-chunk states and states entering chunks
        parts["mamba"] = padded * per_token + chunk_states
    if MOE in arch.kinds:
        E, k, inter = arch.n_routed_experts, arch.num_experts_per_tok, arch.moe_intermediate_size
        router = T * (h * f + 3 * E * f)                       # fp32 input, logits, scores, choice
        mask = T * k * E * 8                                   # one-hot expert mask (int64)
        accumulator = T * h * f                                # fp32 sum of expert outputs
        expert = T * (2 * h + 2 * inter) * a                   # one expert's input, up, act, down for all tokens
        shared = T * 2 * arch.moe_shared_expert_intermediate_size * a if arch.n_shared_experts else 0
        parts["moe"] = router + mask + accumulator + max(expert, shared)
    if MLP in arch.kinds:
        parts["mlp"] = T * 2 * arch.intermediate_size * a
    if ATTENTION in arch.kinds:
        q = arch.num_attention_heads * arch.head_dim
        kv = arch.num_key_value_heads * arch.head_dim
        parts["attention"] = T * (q + 2 * kv + 2 * q + q) * a      # q, k, v, k/v repeated, output
    positions = seq_len if logits_positions is None else min(logits_positions, seq_len)
    parts["logits"] = batch * positions * arch.vocab_size * (a + f)
    return parts


def estimate(plan: LayerPlan, *, batch: int = 4, seq_len: int = 256, device: str = "cpu",
             device_memory: str | None = None, dtype: str = "bf16", extra_weight_bytes: int | None = 0,
             logits_positions: int | None = 1) -> MemoryEstimate:
    """Predicted peak memory of calibrating `plan` with `batch x seq_len` token batches on `device`.

    extra_weight_bytes: weights loaded besides the language model (an Omni checkpoint's towers);
    None when they exist but their size is unknown (then they are left out and flagged).
    """
    if batch < 1 or seq_len < 1:
        raise OmniqError(f"--batch and --seq-len must be positive (got {batch} x {seq_len})")
    if dtype not in DTYPE_BYTES:
        raise OmniqError(f"calibration dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    label, capacity, available = device_capacity(device, device_memory)
    parts = activation_parts(plan.arch, batch, seq_len, dtype, logits_positions)
    layer_peak = max((v for k, v in parts.items() if k not in ("hidden_states", "logits")), default=0)
    activations = parts["hidden_states"] + max(layer_peak, parts["logits"])
    return MemoryEstimate(
        device=label, device_bytes=capacity, available_bytes=available,
        weights=weight_bytes(plan.arch, dtype) + (extra_weight_bytes or 0),
        quantizer_state=quantizer_state_bytes(plan, dtype),
        activations=activations, activation_parts=parts,
        overhead=OVERHEAD["cpu" if label == "cpu" else "gpu"],
        batch=batch, seq_len=seq_len, dtype=dtype, towers_included=extra_weight_bytes is not None,
    )


# ----- the layer-streamed quantize (omniq.export.streamed) ----------------------------------------------
STREAM_SHARD_BYTES = 10 ** 9      # the streamed export's output shard size (omniq.export.streamed.SHARD_BYTES)


def layer_bytes(arch: Arch, dtype: str = "bf16") -> dict[int, int]:
    """Decoder layer index -> its tensors' bytes as loaded (fp32 router stays fp32)."""
    size = DTYPE_BYTES[dtype]
    out: dict[int, int] = {}
    for t in arch.tensors:
        i = arch.layer_index(t.name)
        if i is not None:
            out[i] = out.get(i, 0) + t.numel * max(size, 4 if t.dtype == "F32" else 2)
    return out


# omniq.quant.weight_calibration calibrates the routed experts under gptq / gptaq chunk by chunk of experts of
# one projection: a chunk's statistics are gathered by its own forward over the layer's calibration inputs,
# GPTQ runs on the chunk as one batched call, its results are packed and its statistics freed before the next
# chunk. A chunk has at most GPTQ_EXPERT_CHUNK experts and about GPTQ_CHUNK_BYTES of working memory
# (`gptq_chunk_bytes`), so a real-width MoE layer (128 experts x 2 projections, 2,688 / 1,856 inputs) holds
# 6 / 8 experts' statistics at a time (gptaq 5 / 7) instead of all 256 (5.5 GB; gptaq 11).
GPTQ_EXPERT_CHUNK = 16
WEIGHT_CALIBRATION_BATCH_ROWS = 8   # rows per forward of omniq's weight calibration (weight_calibration.BATCH_ROWS)
GPTQ_CHUNK_BYTES = GiB
_STAT_FLOATS = {"gptq": 1, "gptaq": 2}      # in^2 float32 statistics per linear: X^T X (gptaq: Xq^T Xq and X^T Xq)


def gptq_chunk_bytes(in_features: int, out_features: int, algorithm: str, act_order: bool = False) -> int:
    """Working bytes per weight of a batched GPTQ call (`weight_calibration._gptq_stack`, `gptq.gptq`): its
    float32 statistics (gptaq's two) and, stacked, the Hessian and the inverse's Cholesky factor (4 x in^2
    each), plus the weight's float32 copies: stacked source, GPTQ's working copy, its values and the lazy
    update's temporary (4 x 4 x in x out); act-order adds the permuted Hessian and weight and the values
    permuted back (4 x in^2 + 8 x in x out)."""
    extra = 4 * in_features ** 2 + 8 * in_features * out_features if act_order else 0
    return 4 * (_STAT_FLOATS[algorithm] + 2) * in_features ** 2 + 16 * in_features * out_features + extra


def gptq_float64_bytes(in_features: int, out_features: int, algorithm: str) -> int:
    """The float64 work of one weight, done one matrix at a time, taken as 5 x 8 x in^2: `gptq._inverse_cholesky`
    holds at most three float64 in x in matrices at once (the Hessian's float64 copies and the identity, then
    the reversed damped copy and its Cholesky factor; the triangular inverse is float32, half that each), so
    this is an upper bound; gptaq's target solve: the Hessian, the cross term, the ridge, the identity, the
    shifted matrix and its Cholesky factor (6 x 8 x in^2) and three in x out float64 matrices."""
    if algorithm == "gptaq":
        return 48 * in_features ** 2 + 24 * in_features * out_features
    return 40 * in_features ** 2


def gptq_expert_chunk(in_features: int, out_features: int, algorithm: str, act_order: bool = False) -> int:
    """Experts per chunk for routed experts of this shape under `algorithm` (gptq | gptaq)."""
    per = gptq_chunk_bytes(in_features, out_features, algorithm, act_order)
    return max(1, min(GPTQ_EXPERT_CHUNK, GPTQ_CHUNK_BYTES // per))


@dataclass(frozen=True)
class WeightCalibrationBytes:
    """omniq's weight calibration in the stream: `hidden` (float32 hidden states of every calibration row, the
    set entering the layer and the set it makes, held throughout) and, while layer `layer` is calibrated
    (after ModelOpt has exported it and released its BF16 weights), `working` beside that layer's packed
    tensors (`packed_layer`)."""
    hidden: int = 0
    working: int = 0
    packed_layer: int = 0
    layer: int | None = None

    @property
    def peak(self) -> int:
        """The layer step's own peak (without the hidden states)."""
        return self.packed_layer + self.working


@dataclass(frozen=True)
class StreamedEstimate:
    """Predicted peak of the layer-streamed quantize; `total` is what the preflight compares with the limit."""

    layer: int                 # the largest decoder layer as loaded
    layer_copies: float        # the layer, plus its packed copy while it is exported (1 + packed / bf16)
    embedding: int             # held only while the block inputs are recorded (before any layer)
    hidden_states: int         # every calibration row's hidden states, kept between layers
    activations: int           # one batch's transient inside the largest layer
    quantizer_state: int
    overhead: int
    samples: int = 0
    seq_len: int = 0
    weight_calibration: int = 0  # omniq's weight calibration in the stream: its hidden states + its layer step
    weight_calibration_parts: WeightCalibrationBytes = field(default_factory=WeightCalibrationBytes)

    @property
    def total(self) -> int:
        """The largest of ModelOpt's step (the BF16 layer, its packed copy, a batch's activations), the embedding
        before the first layer, and weight calibration's step (after ModelOpt's export of the layer and the
        release of its BF16 weights: the packed layer and the calibration's working memory), plus what is held
        throughout (hidden states, weight calibration's float32 hidden states, the runtime)."""
        wc = self.weight_calibration_parts
        body = max(int(self.layer * self.layer_copies) + self.activations + self.quantizer_state, self.embedding,
                   wc.peak)
        return body + self.hidden_states + wc.hidden + self.overhead

    def as_dict(self) -> dict:
        return {"layer_bytes": self.layer, "layer_copies": round(self.layer_copies, 3),
                "embedding_bytes": self.embedding, "hidden_states_bytes": self.hidden_states,
                "activations_bytes": self.activations, "quantizer_state_bytes": self.quantizer_state,
                "overhead_bytes": self.overhead, "peak_bytes": self.total, "peak_gib": round(self.total / GiB, 3),
                "samples": self.samples, "seq_len": self.seq_len,
                "weight_calibration_bytes": self.weight_calibration,
                "weight_calibration_parts_bytes": {
                    "hidden_states": self.weight_calibration_parts.hidden,
                    "working": self.weight_calibration_parts.working,
                    "packed_layer": self.weight_calibration_parts.packed_layer,
                    "layer": self.weight_calibration_parts.layer}}


def _packed_layer_bytes(plan: LayerPlan) -> dict[int, int]:
    """Decoder layer -> bytes of its exported tensors (the plan's stored bytes of its linears and the rest)."""
    from omniq.quant.plan import tensor_bytes, weight_bytes

    arch = plan.arch
    out: dict[int, int] = {}
    weights = set()
    for lin in arch.linears:
        if lin.layer is not None:
            out[lin.layer] = out.get(lin.layer, 0) + weight_bytes(plan.formats[lin.name], lin.out_features,
                                                                  lin.in_features)
            weights.add(f"{lin.name}.weight")
    for t in arch.tensors:
        i = arch.layer_index(t.name)
        if i is not None and t.name not in weights:
            out[i] = out.get(i, 0) + tensor_bytes(t.dtype, t.numel)
    return out


def compensation_fit_bytes(plan: LayerPlan, i: int, *, rows: int, seq_len: int) -> dict[str, int]:
    """norm-tweak's fit of decoder layer i (`LayerByLayer._compensate`, `compensation.fit_layer`) beside the
    row sets, as the code holds it (`benchmarks/compensation_memory.py` measures it per layer):
    - `view`: the layer's tensors as the fit holds them (`current[n].clone()`): each quantized linear's weight
      fake-quantized in float32, every other tensor as stored;
    - `autograd`: one batch's graph (`rows` rows; the fit runs forward and backward batch by batch), what
      the backward keeps, float32. A MoE layer (`forward.moe` with `compensation.STELinear`, a plain hook):
      per routed token-slot the up projection's straight-through input (hidden) and its ReLU output
      (intermediate), the down projection's straight-through input (intermediate) and output (hidden, kept
      by the product with the routing weight); per token the shared expert's input, ReLU output and down
      input (hidden + 2 x its intermediate), and six hidden-sized rows (the normalised input, the gathered
      sum, the layer's output and the loss's difference among them). Other kinds: twice the kind's float32
      forward transient (`activation_parts`: kept for the backward, and its gradients) plus the six rows.
    The view is built with the heap's free pages given back every few tensors (`compensation.layer_view`;
    without that glibc kept 1.9 GiB more for a real-width MoE layer's 4.83 GiB view)."""
    from omniq.quant.plan import tensor_bytes

    arch = plan.arch
    quantized = {f"{lin.name}.weight" for lin in arch.linears
                 if lin.layer == i and plan.formats.get(lin.name, "bf16") != "bf16"}
    view = sum(4 * t.numel if t.name in quantized else tensor_bytes(t.dtype, t.numel)
               for t in arch.tensors if arch.layer_index(t.name) == i)
    T, h, kind = rows * seq_len, arch.hidden_size, arch.kinds[i]
    rows_h = 6 * T * h * 4
    if kind == MOE:
        routed = T * arch.num_experts_per_tok * (2 * h + 2 * arch.moe_intermediate_size) * 4
        shared = T * (h + 2 * arch.moe_shared_expert_intermediate_size) * 4 if arch.n_shared_experts else 0
        autograd = routed + shared + rows_h
    else:
        parts = activation_parts(arch, rows, seq_len, "fp32", logits_positions=1)
        autograd = 2 * parts.get({MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp"}.get(kind, ""), 0) + rows_h
    return {"view": view, "autograd": autograd}


def weight_calibration_bytes(plan: LayerPlan, algorithms: dict, *, samples: int, seq_len: int,
                             activation: str = "max", compensation: bool = False) -> WeightCalibrationBytes:
    """Memory of omniq's weight calibration inside the stream (`omniq.quant.weight_calibration.LayerByLayer`)
    for `algorithms` (linear name -> recipe Algorithm), when some algorithm needs statistics (gptq, gptaq,
    local-hessian) or activation mse runs: the float32 hidden states of every calibration row (kept between
    layers, plus one layer's output) and, for the layer that needs most, beside its packed tensors (the
    calibrated weights are packed as they are made, in place of ModelOpt's):
    - the first forward's statistics, held together: gptq in^2 floats per linear (gptaq twice that),
      local-hessian in x 16, for every linear but the routed experts under gptq / gptaq, plus one such
      linear's GPTQ work (`gptq_chunk_bytes` and `gptq_float64_bytes` of one weight);
    - or, later, one chunk of routed experts (`gptq_expert_chunk` of them, their statistics and batched GPTQ
      work, plus one expert's float64 work), whichever is more;
    - one linear's float32 copies (its weight is read and fake-quantized on access,
      `weight_calibration.LayerWeights`) and one batch's float32 activations inside the layer
      (`weight_calibration.BATCH_ROWS` rows; an MoE layer also gathers every routed token's input row).
    With `compensation` (the recipe's norm-tweak, `LayerByLayer._compensate`): the reference stream's float32
    hidden states beside the quantized one's, and while a layer is fitted its targets and the fit's copy of
    its inputs (four row sets in all), and `compensation_fit_bytes` (the fit's view of the layer and one
    batch's autograd state): a real-width MoE layer's view alone is about 5 GB, so the preflight refuses
    norm-tweak inside 6 GiB rather than letting it be killed.
    Empty when no algorithm needs statistics (mse, four-over-six and max add only a float32 copy of one weight)."""
    arch = plan.arch
    kinds = {n: a.name for n, a in algorithms.items() if a.name in ("gptq", "gptaq", "local-hessian")}
    if not kinds and activation == "max" and not compensation:   # activation mse runs the same stream
        return WeightCalibrationBytes()
    BATCH_ROWS = WEIGHT_CALIBRATION_BATCH_ROWS

    first: dict[int, int] = {}
    one: dict[int, int] = {}
    transient: dict[int, int] = {}
    groups: dict[tuple, list] = {}
    for lin in arch.linears:
        if lin.layer is None:
            continue
        i, kind = lin.layer, kinds.get(lin.name)
        transient[i] = max(transient.get(i, 0), 2 * 4 * lin.params)
        if kind in _STAT_FLOATS:
            order = algorithms[lin.name].act_order
            if lin.expert is not None:
                groups.setdefault((i, lin.role, kind, order), []).append(lin)
                continue
            first[i] = first.get(i, 0) + 4 * _STAT_FLOATS[kind] * lin.in_features ** 2
            work = (gptq_chunk_bytes(lin.in_features, lin.out_features, kind, order)
                    - 4 * _STAT_FLOATS[kind] * lin.in_features ** 2
                    + gptq_float64_bytes(lin.in_features, lin.out_features, kind))
            one[i] = max(one.get(i, 0), work)
        elif kind == "local-hessian":
            first[i] = first.get(i, 0) + 4 * lin.in_features * 16
    chunk: dict[int, int] = {}
    for (i, _, kind, order), lins in groups.items():
        lin = lins[0]
        n = min(len(lins), gptq_expert_chunk(lin.in_features, lin.out_features, kind, order))
        b = n * gptq_chunk_bytes(lin.in_features, lin.out_features, kind, order) + gptq_float64_bytes(
            lin.in_features, lin.out_features, kind)
        chunk[i] = max(chunk.get(i, 0), b)
    parts = activation_parts(arch, min(BATCH_ROWS, samples), seq_len, "fp32", logits_positions=1)
    layer_act = parts["hidden_states"] + max((v for k, v in parts.items() if k not in ("hidden_states", "logits")),
                                             default=0)
    gathered = min(BATCH_ROWS, samples) * seq_len * arch.num_experts_per_tok * arch.hidden_size * 4 \
        if MOE in arch.kinds else 0
    packed = _packed_layer_bytes(plan)
    best = WeightCalibrationBytes()
    for i in transient:
        act = layer_act + (gathered if arch.kinds[i] == MOE else 0)
        working = max(first.get(i, 0) + one.get(i, 0), chunk.get(i, 0)) + transient[i] + act
        if compensation:
            working = max(working, sum(compensation_fit_bytes(plan, i, rows=min(BATCH_ROWS, samples),
                                                               seq_len=seq_len).values()))
        if best.layer is None or packed[i] + working > best.peak:
            best = WeightCalibrationBytes(0, working, packed[i], i)
    hidden = (4 if compensation else 2) * samples * seq_len * arch.hidden_size * 4
    return WeightCalibrationBytes(hidden, best.working, best.packed_layer, best.layer)


def streamed_estimate(plan: LayerPlan, *, samples: int, seq_len: int, batch: int = 4, device: str = "cpu",
                      dtype: str = "bf16", algorithms: dict | None = None,
                      activation: str = "max", compensation: bool = False) -> StreamedEstimate:
    """Peak memory of `omniq quantize` (layer-streamed) with `samples x seq_len` calibration tokens.

    One decoder layer is resident at a time (its routed experts materialized in place into the fused tensor);
    while it is exported ModelOpt's packing holds the packed copy beside it (the plan's packed / BF16 size
    ratio: about 0.5 for FP8, 0.3 for NVFP4). Besides it: the bf16 hidden states of every calibration row (one
    set, replaced layer by layer, plus one batch's output), one batch's transient inside the layer
    (`activation_parts` without the logits: lm_head never runs) and the quantizer state. Output shards are
    written tensor by tensor at planned offsets (no shard buffer). The embedding matrix is resident only before
    the first layer."""
    arch = plan.arch
    a = DTYPE_BYTES[dtype]
    layers = layer_bytes(arch, dtype)
    largest = max(layers.values(), default=0)
    parts = activation_parts(arch, min(batch, samples), seq_len, dtype, logits_positions=1)
    layer_peak = max((v for k, v in parts.items() if k not in ("hidden_states", "logits")), default=0)
    emb = arch.vocab_size * arch.hidden_size * a
    hidden = (samples + min(batch, samples)) * seq_len * arch.hidden_size * a
    packed = plan.total_bytes / plan.original_bytes if plan.original_bytes else 1.0
    wc = weight_calibration_bytes(plan, algorithms or {}, activation=activation, samples=samples, seq_len=seq_len,
                                  compensation=compensation)
    return StreamedEstimate(layer=largest, layer_copies=1 + packed, embedding=emb, hidden_states=hidden,
                            activations=parts["hidden_states"] + layer_peak,
                            quantizer_state=quantizer_state_bytes(plan, dtype),
                            overhead=STREAMED_OVERHEAD["cpu" if device == "cpu" else "gpu"], samples=samples,
                            seq_len=seq_len,
                            weight_calibration=wc.hidden + wc.working, weight_calibration_parts=wc)


def preflight(plan: LayerPlan, *, samples: int, seq_len: int, batch: int = 4, device: str = "cpu",
              algorithms: dict | None = None, activation: str = "max",
              compensation: bool = False) -> StreamedEstimate:
    """Refuse (exit 2, one line) before anything is loaded when the streamed quantize's predicted peak does not
    fit the memory limit that applies to this process (`omniq.memory_limit`: cgroup v1/v2, MemAvailable, or
    the CUDA device's free memory)."""
    from omniq import memory_limit

    est = streamed_estimate(plan, samples=samples, seq_len=seq_len, batch=batch, device=device,
                            algorithms=algorithms, activation=activation,
                            compensation=compensation)
    limit = memory_limit.available_bytes(device)
    if est.total > limit:
        one = streamed_estimate(plan, samples=1, seq_len=seq_len, batch=batch, device=device, algorithms=algorithms, activation=activation,
                                compensation=compensation)
        if one.total <= limit:
            per_row = seq_len * plan.arch.hidden_size * (DTYPE_BYTES["bf16"] + (8 if one.weight_calibration else 0))
            rows = max(1, int((limit - one.total) // per_row))
            hint = f"pass --calib-samples {rows} or fewer, a shorter --calib-seq-len, or another --device"
        elif streamed_estimate(plan, samples=1, seq_len=1, batch=batch, device=device,
                               algorithms=algorithms, activation=activation, compensation=compensation).total <= limit:
            hint = "pass a shorter --calib-seq-len (and fewer --calib-samples), or another --device"
        else:
            hint = "the largest layer alone does not fit; use a machine or --device with more memory"
        raise OmniqError(f"quantize needs about {est.total / GiB:.2f} GiB (layer-streamed: largest layer "
                         f"{est.layer / GiB:.2f} GiB x{est.layer_copies:.2f}, calibration {samples} x {seq_len} tokens "
                         f"{est.hidden_states / GiB:.2f} GiB"
                         f"{f', weight calibration {est.weight_calibration / GiB:.2f} GiB' if est.weight_calibration else ''}"
                         f") but only {limit / GiB:.2f} GiB is available "
                         f"({memory_limit.limit_source(device)}); {hint}")
    return est
