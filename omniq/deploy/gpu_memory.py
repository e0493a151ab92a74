"""How much GPU memory serving a NemotronH checkpoint needs, per GPU, for a batch and sequence length.

    per GPU = weights + KV cache + Mamba state + activations + fixed runtime reserve

- Weights: the checkpoint's bytes. Linear layers (Mamba in/out_proj, attention, routed and shared experts,
  lm_head) are split over the `tp` GPUs (routed experts over `ep` expert groups x `tp/ep` MoE tensor
  parallel ranks, which is again `tp` shares); everything else (embeddings, norms, router, Mamba conv1d /
  A / D / dt_bias, and for Omni the vision / audio towers and projectors) is counted whole on every GPU.
  That over-counts the small replicated part when the engine shards it too: the estimate errs on the safe
  side.
- KV cache: attention layers x 2 (K and V) x KV heads x head_dim x bytes per element x max_seq_len x
  max_batch (every sequence at full length), split over `tp` (KV heads are). Bytes per element: BF16 2,
  FP8 1, NVFP4 9/16 (4-bit values plus one FP8 scale per 16).
- Mamba state, per sequence and Mamba layer: the conv state conv_dim x (conv_kernel - 1) in BF16 plus the
  SSM state heads x head_dim x ssm_state_size in float32 (`mamba_ssm_cache_dtype: float32`); allocated for
  max_batch sequences, split over `tp` (Mamba heads are).
- Activations: max_num_tokens x per-token working set (hidden states, the Mamba in_proj output, the routed
  experts' intermediate for top-k experts), in BF16.
- Fixed reserve, `RUNTIME_RESERVE_BYTES` = 3 GiB: CUDA context, cuBLAS / NCCL workspaces, CUDA graphs,
  allocator fragmentation. An estimate from common TensorRT-LLM deployments, not a measurement of this
  model; `--execute` on the target reports what the engine really allocated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

from omniq.model.arch import MAMBA, Arch
from omniq.quant import formats as qformats

GIB = 2**30
RUNTIME_RESERVE_BYTES = 3 * GIB
# KV-cache element sizes; NVFP4 stores 4-bit values plus one FP8 scale per 16 elements.
KV_ELEMENT_BYTES = {"bf16": Fraction(2), "fp8": Fraction(1), "nvfp4": Fraction(1, 2) + Fraction(1, 16)}
SSM_STATE_BYTES = 4      # float32
CONV_STATE_BYTES = 2     # bf16
ACTIVATION_BYTES = 2     # bf16


@dataclass(frozen=True)
class WeightBytes:
    sharded: int         # split over the tp GPUs
    replicated: int      # whole on every GPU

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_gpu(self, tp: int) -> int:
        return -(-self.sharded // tp) + self.replicated


def weight_bytes_from_headers(arch: Arch, headers: dict) -> WeightBytes:
    """Split a checkpoint's tensors (safetensors headers: name -> object with `.nbytes`) into sharded linear
    layers (weight and its scale companions) and replicated rest."""
    linears = arch.linear_by_name
    sharded = replicated = 0
    for name, info in headers.items():
        module, _, suffix = name.rpartition(".")
        if module in linears and suffix not in qformats.KV_SUFFIXES:     # KV-cache scales: per layer, whole
            sharded += info.nbytes
        else:
            replicated += info.nbytes
    return WeightBytes(sharded, replicated)


def weight_bytes_from_plan(plan, extra_replicated: int = 0) -> WeightBytes:
    """The same split from a layer plan (no weights needed): what `omniq quantize` would write for this
    recipe. `extra_replicated` adds parts the plan does not know, e.g. an Omni model's towers."""
    from omniq.quant.plan import tensor_bytes, weight_bytes

    sharded = 0
    linear_weights = set()
    for lin in plan.arch.linears:
        sharded += weight_bytes(plan.formats[lin.name], lin.out_features, lin.in_features)
        linear_weights.add(f"{lin.name}.weight")
    replicated = sum(tensor_bytes(t.dtype, t.numel) for t in plan.arch.tensors if t.name not in linear_weights)
    replicated += qformats.SCALAR_BYTES * len(plan.kv_scale_tensors)
    return WeightBytes(sharded, replicated + extra_replicated)


def kv_bytes_per_token(arch: Arch, kv_dtype: str) -> Fraction:
    """K and V of one token in every attention layer, all GPUs together."""
    elements = len(arch.attention_layers) * 2 * arch.num_key_value_heads * arch.head_dim
    return elements * KV_ELEMENT_BYTES[kv_dtype]


def mamba_state_bytes_per_sequence(arch: Arch) -> int:
    """Conv state (BF16) and SSM state (float32) of one sequence in every Mamba layer, all GPUs together."""
    conv = arch.conv_dim * (arch.conv_kernel - 1) * CONV_STATE_BYTES
    ssm = arch.mamba_num_heads * arch.mamba_head_dim * arch.ssm_state_size * SSM_STATE_BYTES
    return len(arch.layers_of(MAMBA)) * (conv + ssm)


def activation_bytes_per_token(arch: Arch, tp: int, moe_tp: int) -> int:
    """Working set of one token in flight: residual and normed hidden states (x4), the Mamba in_proj output,
    and up + down activations of the top-k routed experts (sharded by the MoE tensor-parallel size)."""
    per_token = 4 * arch.hidden_size
    if arch.layers_of(MAMBA):
        per_token += arch.in_proj_out // tp
    if arch.n_routed_experts:
        per_token += 2 * arch.num_experts_per_tok * arch.moe_intermediate_size // moe_tp
    return per_token * ACTIVATION_BYTES


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""

    weights: int
    kv_cache: int
    mamba_state: int
    activations: int
    runtime_reserve: int
    capacity: int
    kv_bytes_per_token: float        # all GPUs together, for the record
    mamba_bytes_per_sequence: int    # all GPUs together

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mamba_state + self.activations + self.runtime_reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["headroom"] = self.headroom
        d["fits"] = self.fits
        d["gib"] = {k: round(v / GIB, 2) for k, v in d.items()
                    if k in ("weights", "kv_cache", "mamba_state", "activations", "runtime_reserve", "capacity",
                             "total", "headroom")}
        return d


def estimate(arch: Arch, weights: WeightBytes, *, capacity: int, tp: int, moe_tp: int, max_batch: int,
             max_seq_len: int, max_num_tokens: int, kv_dtype: str) -> MemoryEstimate:
    kv_token = kv_bytes_per_token(arch, kv_dtype)
    kv_total = kv_token * max_seq_len * max_batch
    mamba_seq = mamba_state_bytes_per_sequence(arch)
    return MemoryEstimate(
        weights=weights.per_gpu(tp),
        kv_cache=int(-(-kv_total // tp)),
        mamba_state=-(-mamba_seq * max_batch // tp),
        activations=max_num_tokens * activation_bytes_per_token(arch, tp, moe_tp),
        runtime_reserve=RUNTIME_RESERVE_BYTES,
        capacity=capacity,
        kv_bytes_per_token=float(kv_token),
        mamba_bytes_per_sequence=mamba_seq,
    )
