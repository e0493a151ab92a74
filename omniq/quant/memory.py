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
    weight_calibration: int = 0  # omniq's weight calibration in the stream (`weight_calibration_bytes`)

    @property
    def total(self) -> int:
        body = max(int(self.layer * self.layer_copies) + self.activations + self.quantizer_state, self.embedding)
        return body + self.hidden_states + self.weight_calibration + self.overhead

    def as_dict(self) -> dict:
        return {"layer_bytes": self.layer, "layer_copies": round(self.layer_copies, 3),
                "embedding_bytes": self.embedding, "hidden_states_bytes": self.hidden_states,
                "activations_bytes": self.activations, "quantizer_state_bytes": self.quantizer_state,
                "overhead_bytes": self.overhead, "peak_bytes": self.total, "peak_gib": round(self.total / GiB, 3),
                "samples": self.samples, "seq_len": self.seq_len,
                "weight_calibration_bytes": self.weight_calibration}


# omniq.quant.weight_calibration runs routed experts' GPTQ as batched calls of at most this many (the
# factorisation's float64 work is about 3 x 8 bytes x in^2 per expert: 2.6 GiB for 16 experts at Nemotron 3
# Nano's 2,688 inputs, 21 GiB for all 128 at once).
GPTQ_EXPERT_CHUNK = 16


def weight_calibration_bytes(plan: LayerPlan, algorithms: dict, *, samples: int, seq_len: int,
                             activation: str = "max") -> int:
    """Extra peak of omniq's weight calibration inside the stream (`omniq.quant.weight_calibration.LayerByLayer`),
    for `algorithms` (linear name -> recipe Algorithm): when gptq or local-hessian is used, the float32
    hidden states of every calibration row (kept between layers, plus one layer's output) and, for the layer
    that needs most, the float32 values of its calibrated (non-max) linears, one linear's float32 copies at
    a time (the layer's weights are read and fake-quantized on access, `weight_calibration.LayerWeights`),
    and its statistics: gptq in^2 floats per linear and per routed expert, summed (gptaq twice that), plus
    one batched call's stacked float32 weights and float64 factorisation work (3 x 8 bytes x in^2 per
    expert, `GPTQ_EXPERT_CHUNK` experts at most); local-hessian in x 16 floats per linear. 0 when no
    algorithm needs statistics (mse, four-over-six and max add only a float32 copy of one weight)."""
    arch = plan.arch
    kinds = {n: a.name for n, a in algorithms.items() if a.name in ("gptq", "gptaq", "local-hessian")}
    if not kinds and activation == "max":          # activation mse runs the same stream (no statistics)
        return 0
    per_layer: dict[int, int] = {}
    transient: dict[int, int] = {}
    stack: dict[tuple, int] = {}
    for lin in arch.linears:
        if lin.layer is None:
            continue
        stat = {"gptq": 4 * lin.in_features ** 2, "gptaq": 8 * lin.in_features ** 2,      # gptaq: + cross term
                "local-hessian": 4 * lin.in_features * 16}.get(kinds.get(lin.name), 0)
        algo = algorithms.get(lin.name)
        calibrated = 4 * lin.params if algo is not None and algo.name != "max" else 0
        per_layer[lin.layer] = per_layer.get(lin.layer, 0) + stat + calibrated
        transient[lin.layer] = max(transient.get(lin.layer, 0), 2 * 4 * lin.params)
        if kinds.get(lin.name) in ("gptq", "gptaq"):
            key = (lin.layer, lin.role if lin.expert is not None else lin.name)
            stack[key] = stack.get(key, 0) + 24 * lin.in_features ** 2 + 4 * lin.params
    count: dict[tuple, int] = {}
    for lin in arch.linears:
        if lin.layer is not None and kinds.get(lin.name) in ("gptq", "gptaq"):
            key = (lin.layer, lin.role if lin.expert is not None else lin.name)
            count[key] = count.get(key, 0) + 1
    work = {}
    for key, b in stack.items():          # one batched call of at most GPTQ_EXPERT_CHUNK experts at a time
        work[key[0]] = max(work.get(key[0], 0), b * min(count[key], GPTQ_EXPERT_CHUNK) // count[key])
    layer = max(per_layer[i] + transient[i] + work.get(i, 0) for i in per_layer)
    return 2 * samples * seq_len * arch.hidden_size * 4 + layer


def streamed_estimate(plan: LayerPlan, *, samples: int, seq_len: int, batch: int = 4, device: str = "cpu",
                      dtype: str = "bf16", algorithms: dict | None = None,
                      activation: str = "max") -> StreamedEstimate:
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
    return StreamedEstimate(layer=largest, layer_copies=1 + packed, embedding=emb, hidden_states=hidden,
                            activations=parts["hidden_states"] + layer_peak,
                            quantizer_state=quantizer_state_bytes(plan, dtype),
                            overhead=STREAMED_OVERHEAD["cpu" if device == "cpu" else "gpu"], samples=samples,
                            seq_len=seq_len,
                            weight_calibration=weight_calibration_bytes(plan, algorithms or {}, activation=activation, samples=samples,
                                                                        seq_len=seq_len))


def preflight(plan: LayerPlan, *, samples: int, seq_len: int, batch: int = 4, device: str = "cpu",
              algorithms: dict | None = None, activation: str = "max") -> StreamedEstimate:
    """Refuse (exit 2, one line) before anything is loaded when the streamed quantize's predicted peak does not
    fit the memory limit that applies to this process (`omniq.memory_limit`: cgroup v1/v2, MemAvailable, or
    the CUDA device's free memory)."""
    from omniq import memory_limit

    est = streamed_estimate(plan, samples=samples, seq_len=seq_len, batch=batch, device=device,
                            algorithms=algorithms, activation=activation)
    limit = memory_limit.available_bytes(device)
    if est.total > limit:
        one = streamed_estimate(plan, samples=1, seq_len=seq_len, batch=batch, device=device, algorithms=algorithms, activation=activation)
        if one.total <= limit:
            per_row = seq_len * plan.arch.hidden_size * (DTYPE_BYTES["bf16"] + (8 if one.weight_calibration else 0))
            rows = max(1, int((limit - one.total) // per_row))
            hint = f"pass --calib-samples {rows} or fewer, a shorter --calib-seq-len, or another --device"
        elif streamed_estimate(plan, samples=1, seq_len=1, batch=batch, device=device,
                               algorithms=algorithms, activation=activation).total <= limit:
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
