"""What a TensorRT-LLM deployment of a quantized NemotronH checkpoint on a GPU target looks like.

`decide` answers, before anything is written, whether the checkpoint can be served on the target with the
requested TensorRT-LLM version, parallel mapping, batch and sequence length, and with which kernels; every
"no" is a one-line `OmniqError` (exit 2). `llm_api_options`, `serve_script` and `bench_script` turn the
decision into the LLM-API options file and the `trtllm-serve` / `trtllm-bench` commands.

NemotronH runs only on TensorRT-LLM's PyTorch backend: the fused MoE kernels and the Mamba-2 conv / SSM
kernels are chosen at load time from these options. The legacy `trtllm-build` engine path
(`--moe_plugin`, `--mamba_conv1d_plugin`) never supported NemotronH and was removed in TensorRT-LLM 1.3,
so no engine file is built.

Versions (facts from TensorRT-LLM's release notes and LLM-API reference; assumptions marked):
- `MIN_VERSION` 1.2.0: NemotronH with MoE (Nemotron 3 Nano) on the PyTorch backend (ReLU^2 CUTLASS MoE
  kernels and NemotronH MoE sharding landed in 1.2.0rc3). Assumption: the first stable release is the floor.
- `HOPPER_NVFP4_VERSION` 1.3.0rc18: the first release whose notes list PR #14775 ("Support Nemotron-H NVFP4
  checkpoint on Hopper", the W4A16 fallback). 1.2.1 and earlier fail with "FP4 Gemm not supported before
  Blackwell". The Hopper options select the opt-in Marlin kernels explicitly (`moe_config.backend: MARLIN`,
  `nvfp4_gemm_config.allowed_backends: [marlin]`, PR #13476, in the tree before 1.3.0rc18), so they keep
  working if the automatic fallback of #14775 is reverted in favour of Marlin (PR #15772).
- `TRTLLM_MOE_TP_VERSION` 1.3.0rc7: tensor parallelism of the TRTLLM MoE backend for Nemotron-H (#11470);
  before it, sm100 NVFP4 with MoE tensor parallelism (ep < tp) falls back to CUTLASS.
- `CHUNKED_PREFILL_VERSION` 1.3.0rc7: NVIDIA's published Nemotron 3 Super configs for this release enable
  chunked prefill on NemotronH; older releases get `max_num_tokens = max_seq_len` instead.
- `CHECKED_BELOW` 1.5.0: option keys checked against the LLM-API reference of 1.3.0rc27 and 1.4.0rc4
  (`KvCacheConfig.dtype / enable_block_reuse / free_gpu_memory_fraction / mamba_ssm_cache_dtype`,
  `MoeConfig.backend`, `CudaGraphConfig.batch_sizes / enable_padding`, `nvfp4_gemm_config`); newer releases
  get a warning, not a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from packaging.version import InvalidVersion, Version

from omniq.errors import OmniqError
from omniq.deploy import gpu_memory
from omniq.gpus import Gpu
from omniq.model.arch import Arch
from omniq.quant import formats as qformats
from omniq.validate import declaration as decl_mod

DEFAULT_TRTLLM_VERSION = "1.3.0rc27"   # the release whose LLM-API reference the option keys were checked against
MIN_VERSION = "1.2.0"
HOPPER_NVFP4_VERSION = "1.3.0rc18"
TRTLLM_MOE_TP_VERSION = "1.3.0rc7"
CHUNKED_PREFILL_VERSION = "1.3.0rc7"
CHECKED_BELOW = "1.5.0"

TP_SIZES = (1, 2, 4, 8)
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_SEQ_LEN = 32768
DEFAULT_MAX_NUM_TOKENS = 8192
FREE_GPU_MEMORY_FRACTION = 0.8      # as NVIDIA's NemotronH serving recipes; leaves room for the Omni towers
NVFP4_GROUP = qformats.NVFP4.group_size
WEIGHT_ALGOS = tuple(qformats.BY_QUANT_ALGO)
KV_DTYPES = {None: "bf16", "FP8": "fp8", "NVFP4": "nvfp4"}       # declared KV algorithm -> cache dtype
KV_OPTION = {"bf16": "auto", "fp8": "fp8", "nvfp4": "nvfp4"}      # cache dtype -> kv_cache_config.dtype
LAYER_GROUPS = ("mamba", "attention", "routed_experts", "shared_experts", "mlp", "lm_head")
GROUP_OF_ROLE = {
    "mamba_in": "mamba", "mamba_out": "mamba",
    "attn_q": "attention", "attn_k": "attention", "attn_v": "attention", "attn_o": "attention",
    "expert_up": "routed_experts", "expert_down": "routed_experts",
    "shared_up": "shared_experts", "shared_down": "shared_experts",
    "mlp_up": "mlp", "mlp_down": "mlp",
    "lm_head": "lm_head",
}
# Row-parallel layers: their input dimension is what tensor parallelism splits.
ROW_PARALLEL = {"mamba_out", "attn_o", "shared_down", "mlp_down", "expert_down"}
STORED_ALGO = {**{d: f.quant_algo for d, f in qformats.BY_WEIGHT_DTYPE.items()}, "BF16": "BF16", "F16": "BF16",
               "F32": "BF16"}


def parse_version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise OmniqError(f"--trtllm-version {text!r}: not a version (expected e.g. {DEFAULT_TRTLLM_VERSION} "
                         "or 1.2.1)") from None


# ----- what the checkpoint declares (what TensorRT-LLM reads to pick kernels) -------------------------------
@dataclass(frozen=True)
class Declared:
    quant_algo: str
    kv_cache_quant_algo: str | None
    group_size: int | None
    exclude_modules: tuple[str, ...]
    reading: decl_mod.Reading = field(compare=False, hash=False, repr=False)
    _by_omni: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def algo_of(self, name: str, prefix: str = "", covered: bool = True) -> str:
        """FP8 / NVFP4 / BF16 for one linear layer (hub-layout name), as the engine resolves it: the one
        reading of the declaration (`omniq.validate.declaration.Reading`; `backbone.` / `model.` /
        `language_model.` spellings, wildcards, fused experts listed once)."""
        is_omni = bool(prefix)
        if is_omni not in self._by_omni:
            self._by_omni[is_omni] = replace(self.reading, is_omni=is_omni)
        return self._by_omni[is_omni].algo(name, covered=covered) or "BF16"


def read_declared(quantization: dict | None, where: str = "checkpoint") -> Declared:
    """`hf_quant_config.json` (nested `{"producer", "quantization": {...}}`) or `config.json`
    `quantization_config` (flat, also ModelOpt 1.0's `ignore` / `kv_cache_scheme`), read by
    `omniq.validate.declaration`."""
    if not quantization:
        raise OmniqError(f"{where}: not a quantized checkpoint (no hf_quant_config.json or "
                         "quantization_config); run `omniq quantize` first")
    q = quantization.get("quantization", quantization) if isinstance(quantization, dict) else None
    if not isinstance(q, dict):
        raise OmniqError(f"{where}: quantization declaration is not a mapping; re-export the checkpoint")
    reading = decl_mod.of_quantization(quantization, is_omni=False)
    d = reading.declared
    if d is None or not d.quant_algo:
        raise OmniqError(f"{where}: the quantization declaration has no quant_algo; TensorRT-LLM would load "
                         "it unquantized; re-export the checkpoint")
    return Declared(quant_algo=d.quant_algo, kv_cache_quant_algo=d.kv_cache_quant_algo, group_size=d.group_size,
                    exclude_modules=d.exclude_modules, reading=reading)


def declared_formats(arch: Arch, declared: Declared) -> dict[str, str]:
    """Every linear layer -> FP8 / NVFP4 / BF16, refusing algorithms omniq cannot deploy."""
    if declared.quant_algo not in WEIGHT_ALGOS + ("MIXED_PRECISION",):
        raise OmniqError(f"quant_algo {declared.quant_algo}: omniq build deploys FP8, NVFP4 and their "
                         "MIXED_PRECISION combinations")
    # lm_head: the engine builds it without a QuantConfig, so it is BF16 whatever the declaration says
    out = {lin.name: declared.algo_of(lin.name, arch.prefix, covered=lin.name in decl_mod.engine_linears(arch))
           for lin in arch.linears}
    bad = sorted({a for a in out.values() if a not in WEIGHT_ALGOS + ("BF16",)})
    if bad:
        raise OmniqError(f"quantized_layers use {bad[0]}; omniq build deploys FP8 and NVFP4 layers only")
    if "NVFP4" in out.values() and declared.group_size not in (None, NVFP4_GROUP):
        raise OmniqError(f"NVFP4 group_size {declared.group_size}: TensorRT-LLM needs {NVFP4_GROUP}")
    if set(out.values()) == {"BF16"}:
        raise OmniqError(f"the declaration (quant_algo {declared.quant_algo}) leaves every linear layer in BF16; "
                         "nothing to deploy as a quantized model")
    return out


def check_stored(arch: Arch, formats: dict[str, str], headers: dict) -> None:
    """The weights must be stored the way the declaration says, or the engine fails to load them."""
    for lin in arch.linears:
        info = headers.get(f"{lin.name}.weight")
        if info is None:
            continue
        stored = STORED_ALGO.get(info.dtype, info.dtype)
        if stored != formats[lin.name]:
            raise OmniqError(f"{lin.name}: declared {formats[lin.name]} but stored as {info.dtype}; the "
                             "declaration and the weights disagree; re-export the checkpoint")


def layer_groups(arch: Arch, formats: dict[str, str]) -> dict[str, dict[str, int]]:
    """Layer group (mamba, attention, routed_experts, shared_experts, mlp, lm_head) -> {algo: count}."""
    out: dict[str, dict[str, int]] = {}
    for lin in arch.linears:
        g = out.setdefault(GROUP_OF_ROLE[lin.role], {})
        g[formats[lin.name]] = g.get(formats[lin.name], 0) + 1
    return {k: dict(sorted(out[k].items())) for k in LAYER_GROUPS if k in out}


# ----- the request and the decision -------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    gpu: Gpu
    trtllm_version: str = DEFAULT_TRTLLM_VERSION
    tp: int = 1
    ep: int | None = None              # None: `default_ep` (tp, or 1 on sm120 / sm121)
    max_batch: int = DEFAULT_MAX_BATCH
    max_seq_len: int | None = None     # None: min(DEFAULT_MAX_SEQ_LEN, max_position_embeddings)


@dataclass
class Deployment:
    gpu: Gpu
    trtllm_version: str
    min_version: str
    tp: int
    ep: int
    max_batch: int
    max_seq_len: int
    max_num_tokens: int
    chunked_prefill: bool
    quant_algo: str
    layer_groups: dict
    moe_algo: str | None               # format of the routed experts (None: no MoE layers)
    kv_cache_dtype: str                # bf16 | fp8 | nvfp4
    moe_backend: str | None
    moe_backend_reason: str
    w4a16_fallback: bool               # NVFP4 weights on Hopper, dequantized on the fly
    dense_nvfp4: bool                  # NVFP4 linear layers outside the routed experts
    memory: gpu_memory.MemoryEstimate
    is_omni: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def version_range(self) -> str:
        return f">={self.min_version},<{CHECKED_BELOW}"

    def as_dict(self) -> dict:
        return {
            "target": self.gpu.as_dict(),
            "tensorrt_llm": {"requested": self.trtllm_version, "range": self.version_range, "backend": "pytorch",
                             "engine": "none: kernels are chosen at load time from llm_api_options.yaml"},
            "quantization": {"quant_algo": self.quant_algo, "layer_groups": self.layer_groups,
                             "routed_experts": self.moe_algo, "kv_cache_dtype": self.kv_cache_dtype,
                             "w4a16_fallback": self.w4a16_fallback},
            "parallel": {"tp": self.tp, "ep": self.ep, "moe_tp": self.moe_tp},
            "moe_backend": {"backend": self.moe_backend, "reason": self.moe_backend_reason},
            "limits": {"max_batch_size": self.max_batch, "max_seq_len": self.max_seq_len,
                       "max_num_tokens": self.max_num_tokens, "chunked_prefill": self.chunked_prefill},
            "memory_per_gpu": self.memory.as_dict(),
            "warnings": list(self.warnings),
        }


def default_ep(gpu: Gpu, tp: int) -> int:
    """One expert group per GPU, except on sm120 / sm121, whose NVFP4 MoE path (FlashInfer, under CUTLASS)
    needs a single expert group (ep 1)."""
    return 1 if gpu.sm in (120, 121) else tp


def _check_parallel(arch: Arch, tp: int, ep: int | None, formats: dict[str, str], gpu: Gpu) -> int:
    if tp not in TP_SIZES:
        raise OmniqError(f"--tp {tp}: TensorRT-LLM's NemotronH supports tensor parallel sizes "
                         f"{', '.join(map(str, TP_SIZES))}")
    for what, n in (("attention heads", arch.num_attention_heads), ("KV heads", arch.num_key_value_heads),
                    ("Mamba heads", arch.mamba_num_heads)):
        if n % tp:
            raise OmniqError(f"--tp {tp}: the model has {n} {what}, not divisible by {tp}; "
                             f"use a tp that divides {n}")
    if not arch.n_routed_experts:
        if ep not in (None, 1):
            raise OmniqError(f"--ep {ep}: the model has no routed experts; expert parallelism does not apply")
        return 1
    given = ep is not None
    ep = ep if given else default_ep(gpu, tp)
    flag = f"--ep {ep}" if given else f"--ep (default {ep})"
    if ep < 1 or tp % ep:
        raise OmniqError(f"{flag}: must divide --tp {tp} (TensorRT-LLM splits the {tp} GPUs into ep expert "
                         "groups x tp/ep MoE tensor-parallel ranks)")
    if arch.n_routed_experts % ep:
        raise OmniqError(f"{flag}: the model has {arch.n_routed_experts} routed experts, not divisible by {ep}; "
                         "pass an --ep that divides both")
    for lin in arch.linears:
        if formats[lin.name] != "NVFP4" or lin.role not in ROW_PARALLEL:
            continue
        shards = tp // ep if lin.role == "expert_down" else tp
        if (lin.in_features // shards) % NVFP4_GROUP or lin.in_features % shards:
            raise OmniqError(f"--tp {tp} --ep {ep}: {lin.name} has {lin.in_features} NVFP4 inputs, which do not "
                             f"split into {shards} shards of whole {NVFP4_GROUP}-element blocks")
    return ep


def choose_moe_backend(gpu: Gpu, moe_algo: str | None, version: Version, moe_tp: int) -> tuple[str, str, list[str]]:
    """`moe_config.backend` for the routed experts: CUTLASS unless a target / format has a better one."""
    if moe_algo == "NVFP4" and gpu.family == "hopper":
        return ("MARLIN", "NVFP4 experts on Hopper: W4A16 fallback, Marlin kernels dequantize the FP4 weights "
                          "on the fly", [])
    if moe_algo == "NVFP4" and gpu.datacenter_blackwell:
        if moe_tp > 1 and version < Version(TRTLLM_MOE_TP_VERSION):
            return ("CUTLASS", "NVFP4 experts on sm100/sm103 with MoE tensor parallelism before "
                               f"{TRTLLM_MOE_TP_VERSION}: the TRTLLM backend cannot shard NemotronH experts",
                    [f"TensorRT-LLM {version} cannot tensor-parallelise NemotronH experts on the TRTLLM MoE "
                     f"backend (added in {TRTLLM_MOE_TP_VERSION}); using CUTLASS. Use --ep equal to --tp or a "
                     "newer release for the faster TRTLLM kernels"])
        return ("TRTLLM", "NVFP4 experts on sm100/sm103: TRTLLM-gen fused MoE kernels", [])
    fmt = moe_algo or "BF16"
    return ("CUTLASS", f"{fmt} experts on sm{gpu.sm}: CUTLASS fused MoE (TensorRT-LLM's default)", [])


def token_budget(max_batch: int, max_seq_len: int, version: Version) -> tuple[int, bool]:
    """max_num_tokens and whether prompts longer than it are prefilled in chunks."""
    tokens = max(DEFAULT_MAX_NUM_TOKENS, max_batch)
    if max_seq_len <= tokens:
        return tokens, False
    if version >= Version(CHUNKED_PREFILL_VERSION):
        return tokens, True
    return max_seq_len, False


def decide(arch: Arch, declared: Declared, weights: gpu_memory.WeightBytes, req: Request, *,
           headers: dict | None = None, max_position_embeddings: int | None = None,
           is_omni: bool = False) -> Deployment:
    """Everything `omniq build` needs to know before writing a file; raises OmniqError on any refusal."""
    gpu = req.gpu
    version = parse_version(req.trtllm_version)
    warnings: list[str] = []
    mins = [Version(MIN_VERSION)]
    if version < Version(MIN_VERSION):
        raise OmniqError(f"TensorRT-LLM {version}: NemotronH with MoE (Nemotron 3 Nano) needs {MIN_VERSION} or "
                         "newer on the PyTorch backend; the trtllm-build engine path never supported it")
    if version >= Version(CHECKED_BELOW):
        warnings.append(f"TensorRT-LLM {version} is newer than the releases the option keys were checked "
                        f"against (below {CHECKED_BELOW}); check the LLM-API reference if loading fails")

    formats = declared_formats(arch, declared)
    if headers is not None:
        check_stored(arch, formats, headers)
    algos = set(formats.values()) - {"BF16"}
    groups = layer_groups(arch, formats)
    moe = groups.get("routed_experts", {})
    moe_algo = ("NVFP4" if "NVFP4" in moe else "FP8" if "FP8" in moe else "BF16") if moe else None

    kv = declared.kv_cache_quant_algo
    if kv not in KV_DTYPES:
        raise OmniqError(f"kv_cache_quant_algo {kv}: TensorRT-LLM accepts only FP8 or NVFP4 KV caches for "
                         "pre-quantized checkpoints; re-quantize with an FP8 KV cache or none")
    kv_dtype = KV_DTYPES[kv]

    # ---- formats on this GPU
    if algos & {"FP8"} or kv_dtype == "fp8":
        if not gpu.fp8:
            raise OmniqError(f"{gpu.label} (sm{gpu.sm}) has no FP8 tensor cores; FP8 needs sm89 or newer "
                             "(Ada, Hopper, Blackwell)")
    w4a16 = False
    if "NVFP4" in algos and not gpu.nvfp4:
        if gpu.family != "hopper":
            raise OmniqError(f"{gpu.label} (sm{gpu.sm}) cannot run NVFP4: it needs Blackwell (sm100+), or Hopper "
                             f"with TensorRT-LLM {HOPPER_NVFP4_VERSION}+ (W4A16 fallback)")
        if version < Version(HOPPER_NVFP4_VERSION):
            raise OmniqError(f"NVFP4 on Hopper fails in TensorRT-LLM {version} (\"FP4 Gemm not supported before "
                             f"Blackwell\"); it runs as a W4A16 fallback from {HOPPER_NVFP4_VERSION} on "
                             f"(PR #14775): pass --trtllm-version {HOPPER_NVFP4_VERSION} or newer, or deploy an FP8 "
                             "checkpoint, or target Blackwell")
        w4a16 = True
        mins.append(Version(HOPPER_NVFP4_VERSION))
        warnings.append("NVFP4 on Hopper runs as W4A16: FP4 weights are dequantized on the fly by Marlin kernels "
                        "and activations stay BF16; memory is the NVFP4 checkpoint's, throughput is below "
                        "Blackwell NVFP4")
    if kv_dtype == "nvfp4" and not gpu.nvfp4:
        raise OmniqError(f"an NVFP4 KV cache needs Blackwell (sm100+); {gpu.label} is sm{gpu.sm}")
    if gpu.family in ("ada", "ampere"):
        warnings.append(f"{gpu.label} (sm{gpu.sm}) is outside TensorRT-LLM's NemotronH support matrix (Hopper, "
                        "Blackwell); the deployment is untested there")

    # ---- parallel mapping
    ep = _check_parallel(arch, req.tp, req.ep, formats, gpu)
    moe_tp = req.tp // ep
    if gpu.sm in (120, 121) and ep > 1:
        warnings.append(f"expert parallelism on sm{gpu.sm} has no tuned MoE path in TensorRT-LLM 1.3 "
                        "(discussion #16360); --ep 1 is the tested mapping")
    backend, reason, notes = None, "no MoE layers", []
    if moe_algo:
        backend, reason, notes = choose_moe_backend(gpu, moe_algo, version, moe_tp)
    warnings += notes
    if backend == "TRTLLM" and moe_tp > 1:
        mins.append(Version(TRTLLM_MOE_TP_VERSION))
    dense_nvfp4 = any(a == "NVFP4" and GROUP_OF_ROLE[arch.linear_by_name[n].role] != "routed_experts"
                      for n, a in formats.items())

    # ---- limits
    if req.max_batch < 1:
        raise OmniqError(f"--max-batch {req.max_batch}: must be at least 1")
    max_seq_len = req.max_seq_len
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, max_position_embeddings or DEFAULT_MAX_SEQ_LEN)
    if max_seq_len < 1:
        raise OmniqError(f"--max-seq-len {max_seq_len}: must be at least 1")
    if max_position_embeddings and max_seq_len > max_position_embeddings:
        warnings.append(f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings "
                        f"{max_position_embeddings}; quality beyond it is untested")
    max_num_tokens, chunked = token_budget(req.max_batch, max_seq_len, version)
    if chunked:
        mins.append(Version(CHUNKED_PREFILL_VERSION))

    # ---- memory
    mem = gpu_memory.estimate(arch, weights, capacity=gpu.memory_bytes, tp=req.tp, moe_tp=moe_tp,
                              max_batch=req.max_batch, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                              kv_dtype=kv_dtype)
    if not mem.fits:
        g = mem.as_dict()["gib"]
        raise OmniqError(
            f"does not fit: {g['total']} GiB per GPU needed (weights {g['weights']}, KV cache {g['kv_cache']}, "
            f"Mamba state {g['mamba_state']}, activations {g['activations']}, reserve {g['runtime_reserve']}) "
            f"but {gpu.label} has {g['capacity']} GiB; lower --max-batch / --max-seq-len, raise --tp, or pick a "
            "larger GPU")
    if mem.headroom < 0.05 * mem.capacity:
        warnings.append(f"only {mem.as_dict()['gib']['headroom']} GiB headroom per GPU at the full batch and "
                        "sequence length; expect the KV cache to cap concurrency")
    if is_omni:
        warnings.append("Omni checkpoint: the config class ships with the checkpoint, so serving needs "
                        "trust_remote_code (set in the options and serve.sh)")

    return Deployment(
        gpu=gpu, trtllm_version=str(version), min_version=str(max(mins)), tp=req.tp, ep=ep,
        max_batch=req.max_batch, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, chunked_prefill=chunked,
        quant_algo=declared.quant_algo, layer_groups=groups, moe_algo=moe_algo, kv_cache_dtype=kv_dtype,
        moe_backend=backend, moe_backend_reason=reason, w4a16_fallback=w4a16, dense_nvfp4=dense_nvfp4,
        memory=mem, is_omni=is_omni, warnings=warnings)


# ----- what the decision becomes ----------------------------------------------------------------------------
def cuda_graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def llm_api_options(dep: Deployment) -> dict:
    """The LLM-API options (`tensorrt_llm.LLM(model=..., **options)`, `--extra_llm_api_options`). Plain CUDA
    graphs only: piecewise CUDA graphs produced NaNs on Nemotron Nano V3 (TensorRT-LLM PR #16193)."""
    opts: dict = {
        "tensor_parallel_size": dep.tp,
        "moe_expert_parallel_size": dep.ep,
        "max_batch_size": dep.max_batch,
        "max_num_tokens": dep.max_num_tokens,
        "max_seq_len": dep.max_seq_len,
    }
    if dep.chunked_prefill:
        opts["enable_chunked_prefill"] = True
    if dep.is_omni:
        opts["trust_remote_code"] = True
    opts["kv_cache_config"] = {
        "dtype": KV_OPTION[dep.kv_cache_dtype],
        "enable_block_reuse": False,            # no prefix caching for Mamba / SSM state
        "mamba_ssm_cache_dtype": "float32",     # lower precision is a correctness bug (issue #8763)
        "free_gpu_memory_fraction": FREE_GPU_MEMORY_FRACTION,
    }
    if dep.moe_backend:
        opts["moe_config"] = {"backend": dep.moe_backend}
    if dep.w4a16_fallback and dep.dense_nvfp4:
        opts["nvfp4_gemm_config"] = {"allowed_backends": ["marlin"]}
    opts["cuda_graph_config"] = {"batch_sizes": cuda_graph_batch_sizes(dep.max_batch), "enable_padding": True}
    return opts


def _header(dep: Deployment, what: str) -> list[str]:
    return [f"omniq build: {what}",
            f"target {dep.gpu.label} (sm{dep.gpu.sm}), TensorRT-LLM {dep.version_range}, PyTorch backend",
            f"{dep.quant_algo} weights, {dep.kv_cache_dtype} KV cache, MoE backend {dep.moe_backend or 'n/a'}, "
            f"tp {dep.tp} ep {dep.ep}"]


def options_yaml(dep: Deployment) -> str:
    """Block-style YAML (lists of numbers inline), with a provenance header."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    head = _header(dep, "LLM-API options (trtllm-serve / trtllm-bench --extra_llm_api_options, or "
                        "tensorrt_llm.LLM(model=..., **options))")
    body = yaml.dump(llm_api_options(dep), Dumper=Dumper, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" for line in head) + body


def _script(dep: Deployment, what: str, lines: list[str]) -> str:
    head = ["#!/usr/bin/env bash"] + [f"# {line}" for line in _header(dep, what)]
    body = ["set -euo pipefail", 'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"']
    return "\n".join(head + body + lines) + "\n"


def _continued(cmd: list[str]) -> list[str]:
    """`prog first-arg \\` then one argument per line."""
    parts = [f"{cmd[0]} {cmd[1]}"] + cmd[2:]
    return [f"  {p} \\" if i else f"{p} \\" for i, p in enumerate(parts[:-1])] + [f"  {parts[-1]}"]


def serve_command(dep: Deployment) -> list[str]:
    cmd = ["trtllm-serve", '"$HERE/checkpoint"', "--backend pytorch", f"--tp_size {dep.tp}", f"--ep_size {dep.ep}",
           f"--max_batch_size {dep.max_batch}", f"--max_num_tokens {dep.max_num_tokens}",
           f"--max_seq_len {dep.max_seq_len}"]
    if dep.is_omni:
        cmd.append("--trust_remote_code")
    return cmd + ['--extra_llm_api_options "$HERE/llm_api_options.yaml"', '"$@"']


def serve_script(dep: Deployment) -> str:
    return _script(dep, "serve the bundle (OpenAI-compatible server; extra trtllm-serve flags such as "
                        "--host / --port pass through)", ["exec " + "\n".join(_continued(serve_command(dep)))])


def bench_lengths(max_seq_len: int) -> tuple[int, int]:
    """Default synthetic input / output lengths that fit in max_seq_len."""
    isl = min(1024, max(1, max_seq_len // 2))
    return isl, max(1, min(256, max_seq_len - isl))


def bench_command(dep: Deployment) -> list[str]:
    return ["trtllm-bench", '--model "$MODEL"', '--model_path "$HERE/checkpoint"', "throughput", "--backend pytorch",
            '--dataset "$DATASET"', f"--tp {dep.tp}", f"--ep {dep.ep}", f"--max_batch_size {dep.max_batch}",
            f"--max_num_tokens {dep.max_num_tokens}", f"--max_seq_len {dep.max_seq_len}",
            '--extra_llm_api_options "$HERE/llm_api_options.yaml"', '"$@"']


def bench_script(dep: Deployment) -> str:
    isl, osl = bench_lengths(dep.max_seq_len)
    prepare = ["trtllm-bench", '--model "$MODEL"', '--model_path "$HERE/checkpoint"', "prepare-dataset",
               '--output "$DATASET"', "token-norm-dist", '--num-requests "$NUM_REQUESTS"', '--input-mean "$ISL"',
               '--output-mean "$OSL"', "--input-stdev 0", "--output-stdev 0"]
    lines = [
        "# MODEL labels the run and is the tokenizer source (a hub id or this checkpoint);",
        "# NUM_REQUESTS / ISL / OSL shape the synthetic dataset written to DATASET when it does not exist.",
        'MODEL="${MODEL:-$HERE/checkpoint}"',
        'NUM_REQUESTS="${NUM_REQUESTS:-512}"',
        f'ISL="${{ISL:-{isl}}}"',
        f'OSL="${{OSL:-{osl}}}"',
        'DATASET="${DATASET:-$HERE/bench-dataset-${ISL}-${OSL}-${NUM_REQUESTS}.jsonl}"',
        'if [ ! -f "$DATASET" ]; then',
        *["  " + line for line in _continued(prepare)],
        "fi",
        "exec " + "\n".join(_continued(bench_command(dep))),
    ]
    return _script(dep, "throughput benchmark of the bundle with trtllm-bench", lines)
