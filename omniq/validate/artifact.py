"""Read a checkpoint from its files into what the plain-torch forward needs, the way an engine would run it.

A BF16 reference and a quantized candidate go through the same reader. Each weight's format is inferred
from the tensors present (dtype plus companions) and cross-checked with what the checkpoint declares
(`hf_quant_config.json` or `config.json` `quantization_config`), since an engine picks its kernels from the
declaration and reads the scales from the tensors:

    X.weight BF16/F16/F32                                          -> "bf16"  (kept in high precision)
    X.weight F8_E4M3 + X.weight_scale (fp32, per tensor or channel)  -> "fp8"
    X.weight U8 [out, in/2] + X.weight_scale F8_E4M3 [out, in/16] + X.weight_scale_2 -> "nvfp4"

Weights are dequantized once into float32. Activations are quantized in the `linear` hook from
`X.input_scale` (static per-tensor FP8, or dynamic per-16-block NVFP4 with the per-tensor global scale, see
`omniq.quant.formats`), after `X.pre_quant_scale` when present; K and V in the `kv` hook from
`k_proj.k_scale` / `v_proj.v_scale` when the KV cache is declared FP8. An attention layer's FP8 q / k / v
share the largest of their scales, as the engines' fused QKV GEMM does. Everything else is computed in
float32: the engines' BF16 rounding of GEMM outputs and activations is the noise floor (`bf16_compute_hooks`,
`omniq.validate.gates`), not part of the quantization error.

`check_same_model` refuses (exit 2) a candidate whose config, tensor layout or tokenizer differs from the
reference beyond what quantization allows: quantized weights may change dtype and shape (packing) and
gain scale tensors; nothing else may differ.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from omniq.errors import OmniqError
from omniq.model.arch import Arch
from omniq.model.checkpoint import Checkpoint, open_checkpoint
from omniq.quant import formats
from omniq.validate import declaration as decl_mod

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
# Tensors a quantizer adds next to `X.weight`; everything else must be the reference's.
COMPANION_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale",
                      "output_scale")
# Declared per-layer algorithm -> (weight format, activation format).
ALGOS = {
    "FP8": ("fp8", "fp8"),
    "NVFP4": ("nvfp4", "nvfp4"),
    "W4A8_NVFP4_FP8": ("nvfp4", "fp8"),
    "W4A16_NVFP4": ("nvfp4", None),
}

LinearFn = Callable[[str, torch.Tensor], torch.Tensor]
KvFn = Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """How one module's weight is stored and how its input is quantized."""

    name: str                          # module name, hub layout, without ".weight"
    weight_format: str                 # "bf16", "fp8", "nvfp4"
    activation: str | None = None      # "fp8" (static per tensor), "nvfp4" (dynamic per block) or None
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None


@dataclass
class Artifact:
    checkpoint: Checkpoint
    weights: dict[str, torch.Tensor]                 # every base tensor, dequantized, float32
    layers: dict[str, Layer]                         # every module with a `.weight`
    kv_scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)   # layer -> {"k","v"}
    warnings: list[str] = field(default_factory=list)

    @property
    def arch(self) -> Arch:
        return self.checkpoint.arch

    @property
    def path(self):
        return self.checkpoint.path

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def quantized(self) -> dict[str, Layer]:
        return {n: layer for n, layer in self.layers.items() if layer.weight_format != "bf16"}

    @property
    def format(self) -> str:
        """`bf16`, `fp8`, `nvfp4`, or `mixed` (several formats among the quantized layers)."""
        kinds = {layer.weight_format for layer in self.quantized.values()}
        if not kinds:
            return "bf16"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def kv_cache(self) -> str | None:
        return "fp8" if self.kv_scales else None

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lin in self.arch.linears:
            layer = self.layers.get(lin.name)
            key = layer.weight_format if layer else "bf16"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def linear(self) -> LinearFn:
        """The forward's hook: dequantized weight, activations quantized as the layer's engine kernel does."""
        weights, layers = self.weights, self.layers

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            layer = layers.get(name)
            if layer is not None and layer.pre_quant_scale is not None:
                x = x * layer.pre_quant_scale
            if layer is not None and layer.input_scale is not None:
                if layer.activation == "fp8":
                    x = formats.fp8_fake_quant(x, layer.input_scale)
                elif layer.activation == "nvfp4":
                    x = formats.nvfp4_fake_quant(x, layer.input_scale)
            return F.linear(x, weights[f"{name}.weight"], weights.get(f"{name}.bias"))

        return linear

    def kv(self) -> KvFn | None:
        if not self.kv_scales:
            return None
        scales = self.kv_scales

        def kv(layer: int, which: str, t: torch.Tensor) -> torch.Tensor:
            s = scales.get(layer, {}).get(which)
            return t if s is None else formats.fp8_fake_quant(t, s)

        return kv


def bf16_compute_hooks(weights: dict[str, torch.Tensor]) -> tuple[LinearFn, KvFn]:
    """Hooks that run every linear as a BF16 engine does (bf16 inputs and weights, fp32 accumulation, bf16
    output) and keep K / V in bf16. Used for the noise floor: a bf16 forward against the float32 one."""

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        w = weights[f"{name}.weight"].to(torch.bfloat16).float()
        b = weights.get(f"{name}.bias")
        y = F.linear(x.to(torch.bfloat16).float(), w, None if b is None else b.to(torch.bfloat16).float())
        return y.to(torch.bfloat16).float()

    def kv(layer: int, which: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    return linear, kv


# ----- reading ------------------------------------------------------------------------------------------
def _companion(name: str) -> tuple[str, str] | None:
    """`X.weight_scale` -> ("X", "weight_scale"); None for a base tensor."""
    module, _, suffix = name.rpartition(".")
    return (module, suffix) if suffix in COMPANION_SUFFIXES and module else None


def _where(ckpt: Checkpoint) -> str:
    return str(ckpt.source or ckpt.path)


def weight_format(ckpt: Checkpoint, module: str) -> str:
    """Infer how `module.weight` is stored from its dtype and companion tensors."""
    h = ckpt.headers
    w = h[f"{module}.weight"]
    scale = h.get(f"{module}.weight_scale")
    where = _where(ckpt)
    if w.dtype in FLOAT_DTYPES:
        if scale is not None:
            raise OmniqError(f"{where}: {module}.weight is {w.dtype} but has a weight_scale; "
                             "the artifact mixes quantized and unquantized tensors; re-export it")
        return "bf16"
    if w.dtype == "F8_E4M3":
        if scale is None or scale.dtype != "F32":
            raise OmniqError(f"{where}: {module}.weight is F8_E4M3 without an F32 weight_scale; "
                             "cannot dequantize it; re-export the checkpoint")
        n = 1
        for s in scale.shape:
            n *= s
        if n != 1 and n != w.shape[0]:
            raise OmniqError(f"{where}: {module}.weight_scale has shape {list(scale.shape)}; expected a "
                             "per-tensor or per-output-channel FP8 scale")
        return "fp8"
    if w.dtype == "U8":
        s2 = h.get(f"{module}.weight_scale_2")
        if scale is None or scale.dtype != "F8_E4M3" or s2 is None:
            raise OmniqError(f"{where}: {module}.weight is U8 but lacks an F8_E4M3 weight_scale and a "
                             "weight_scale_2; only NVFP4 packed weights are supported; re-export it")
        return "nvfp4"
    raise OmniqError(f"{where}: {module}.weight has dtype {w.dtype}; omniq validates BF16, FP8 (E4M3) and "
                     "NVFP4 checkpoints")


def _check_packed_shape(ckpt: Checkpoint, module: str, fmt: str, shape: tuple[int, ...]) -> None:
    """The stored shapes of a quantized weight are consistent with the logical shape the config implies."""
    h = ckpt.headers
    w = h[f"{module}.weight"].shape
    if fmt == "fp8":
        ok = w == shape
    else:
        blocks = -(-shape[-1] // formats.NVFP4_BLOCK)
        ok = (w == (*shape[:-1], blocks * formats.NVFP4_BLOCK // 2)
              and h[f"{module}.weight_scale"].shape == (*shape[:-1], blocks))
    if not ok:
        raise OmniqError(f"{_where(ckpt)}: {module}.weight is stored as {list(w)} ({fmt}), which does not hold "
                         f"the {list(shape)} weight config.json implies; config and weights do not match")


def _scalar(t: torch.Tensor, what: str, where: str) -> torch.Tensor:
    t = t.float()
    if t.numel() != 1 or not torch.isfinite(t).all() or (t <= 0).any():
        raise OmniqError(f"{where}: {what} must be one positive finite number, got {t.flatten()[:4].tolist()}")
    return t.reshape(())


def _memory_check(ckpt: Checkpoint) -> None:
    """Refuse early when the float32 weights cannot fit in this machine's memory."""
    need = sum(4 * math.prod(t.shape) * (2 if t.dtype == "U8" else 1) for t in ckpt.headers.values())
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.8 * have:
        raise OmniqError(f"{_where(ckpt)}: validating needs about {need / 2**30:.1f} GiB of float32 weights but "
                         f"this machine has {have / 2**30:.1f} GiB; run validate on a machine with more memory")


def read_artifact(name_or_path) -> Artifact:
    """Open a checkpoint directory (or bundled name) and read it as an engine would run it."""
    ckpt = open_checkpoint(str(name_or_path), check_shapes=False)
    where = _where(ckpt)
    arch = ckpt.arch
    _memory_check(ckpt)
    reading = decl_mod.of_quantization(ckpt.quantization, ckpt.is_omni)
    warnings: list[str] = []

    base = [n for n in ckpt.headers if _companion(n) is None]
    missing = [t.name for t in arch.tensors if t.name not in ckpt.headers]
    if missing:
        raise OmniqError(f"{where}: tensor {missing[0]} implied by config.json is missing "
                         f"({len(missing)} missing in all); config and weights do not match")

    modules = [n[: -len(".weight")] for n in base if n.endswith(".weight")]
    fmt_of = {m: weight_format(ckpt, m) for m in modules}
    for t in arch.tensors:
        if not t.name.endswith(".weight"):
            continue
        m = t.name[: -len(".weight")]
        f = fmt_of.get(m, "bf16")
        if f == "bf16":
            if ckpt.headers[t.name].shape != t.shape:
                raise OmniqError(f"{where}: tensor {t.name} has shape {list(ckpt.headers[t.name].shape)} but "
                                 f"config.json implies {list(t.shape)}; config and weights do not match")
        else:
            _check_packed_shape(ckpt, m, f, t.shape)
    for t in arch.tensors:
        if not t.name.endswith(".weight") and ckpt.headers[t.name].shape != t.shape:
            raise OmniqError(f"{where}: tensor {t.name} has shape {list(ckpt.headers[t.name].shape)} but "
                             f"config.json implies {list(t.shape)}; config and weights do not match")

    raw = ckpt.read()
    weights: dict[str, torch.Tensor] = {}
    for n in base:
        t = raw[n]
        m = n[: -len(".weight")] if n.endswith(".weight") else None
        f = fmt_of.get(m, "bf16") if m else "bf16"
        if f == "fp8":
            q = t.view(torch.float8_e4m3fn)
            s = raw[f"{m}.weight_scale"].float()
            if ((t.view(torch.uint8) & 0x7F) == 0x7F).any() or not torch.isfinite(s).all() or (s <= 0).any():
                raise OmniqError(f"{where}: {m} has NaN FP8 codes or a non-positive weight_scale; the artifact "
                                 "is corrupt; re-export it")
            s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (t.dim() - 1)))
            weights[n] = formats.fp8_dequantize(q, s)
        elif f == "nvfp4":
            logical = arch.tensor_by_name[n].shape if n in arch.tensor_by_name else None
            s2 = _scalar(raw[f"{m}.weight_scale_2"], f"{m}.weight_scale_2", where)
            s = raw[f"{m}.weight_scale"].view(torch.float8_e4m3fn)
            if not torch.isfinite(s.float()).all():
                raise OmniqError(f"{where}: {m}.weight_scale has NaN entries; the artifact is corrupt; re-export it")
            weights[n] = formats.nvfp4_dequantize(t, s, s2, None if logical is None else logical[-1])
        else:
            weights[n] = t.float()

    layers = _layers(ckpt, fmt_of, raw, reading, warnings)
    _fuse_qkv_fp8(arch, layers, raw, weights)
    kv_scales = _kv_scales(ckpt, raw, reading)
    return Artifact(checkpoint=ckpt, weights=weights, layers=layers, kv_scales=kv_scales, warnings=warnings)


def _layers(ckpt: Checkpoint, fmt_of: dict[str, str], raw: dict, reading: decl_mod.Reading,
            warnings: list[str]) -> dict:
    where = _where(ckpt)
    algo = reading.declared.quant_algo if reading.declared else None
    quantized = {m for m, f in fmt_of.items() if f != "bf16"}
    if quantized and reading.declared is None:
        raise OmniqError(f"{where}: has quantized tensors but no hf_quant_config.json or quantization_config; "
                         "an engine cannot load it; re-export with ModelOpt's export_hf_checkpoint")
    if algo and algo not in ALGOS and algo != "MIXED_PRECISION":
        raise OmniqError(f"{where}: declares quant_algo {algo!r}; omniq validates "
                         f"{', '.join(ALGOS)} and MIXED_PRECISION mixes of them")
    bad = reading.corrupted()
    if bad["quantized_layers"]:
        warnings.append(f"quantized_layers has {len(bad['quantized_layers'])} corrupted names (ModelOpt's "
                        f"sentinel, e.g. {bad['quantized_layers'][0]!r}); read here as their module names, "
                        "but engines match none of them")
    if bad["exclude_modules"]:
        warnings.append(f"exclude_modules has {len(bad['exclude_modules'])} corrupted entries (e.g. "
                        f"{bad['exclude_modules'][0]!r}); engines match none of them")

    layers: dict[str, Layer] = {}
    used: set[str] = set()
    for m, f in fmt_of.items():
        if f == "bf16":
            layers[m] = Layer(m, "bf16")
            continue
        if algo == "MIXED_PRECISION":
            entry = reading.layer_entry(m, repair=True)
            if entry is None:
                raise OmniqError(f"{where}: {m} is stored as {f} but is not in quantized_layers of the "
                                 "MIXED_PRECISION declaration; engines would misread it; re-export it")
            used.add(entry)
        if reading.excluded_by(m) is not None:
            raise OmniqError(f"{where}: {m} is quantized ({f}) but matches exclude_modules; engines would "
                             "load it as BF16; re-export it")
        layer_algo = reading.algo(m, covered=True, repair=True)
        if layer_algo not in ALGOS:
            raise OmniqError(f"{where}: {m} declares quant_algo {layer_algo!r}; omniq validates "
                             f"{', '.join(ALGOS)}")
        want_w, act = ALGOS[layer_algo]
        if want_w != f:
            raise OmniqError(f"{where}: {m} is stored as {f} but the checkpoint declares {layer_algo}; "
                             "declaration and tensors disagree; re-export it")
        s = raw.get(f"{m}.input_scale")
        input_scale = _scalar(s, f"{m}.input_scale", where) if s is not None else None
        if act is not None and input_scale is None:
            warnings.append(f"{m}: {layer_algo} without input_scale; simulated weight-only")
            act = None
        pqs = raw.get(f"{m}.pre_quant_scale")
        layers[m] = Layer(m, f, act, input_scale, None if pqs is None else pqs.float())
    unused = sorted(set(reading.declared.quantized_layers) - used) if algo == "MIXED_PRECISION" else []
    if unused:
        raise OmniqError(f"{where}: quantized_layers lists {decl_mod.repaired(unused[0])} but its weight is "
                         "not quantized (or not present); declaration and tensors disagree; re-export it")
    return layers


def _fuse_qkv_fp8(arch: Arch, layers: dict[str, Layer], raw: dict, weights: dict[str, torch.Tensor]) -> None:
    """Engines run an attention layer's q / k / v as one GEMM with one weight scale and one input scale, the
    largest of the three (TensorRT-LLM's `FP8QDQLinearMethod.rescale_fused_weights`, vLLM's
    `requantize_with_max_scale`): each FP8 weight is re-rounded to the common scale (via bf16, as
    TensorRT-LLM does) and the input quantized with the common input scale."""
    for i in arch.attention_layers:
        names = [f"{arch.layer_prefix(i)}.mixer.{x}_proj" for x in "qkv"]
        group = [layers.get(n) for n in names]
        if any(g is None or g.weight_format != "fp8" or raw[f"{g.name}.weight_scale"].numel() != 1 for g in group):
            continue
        scales = [raw[f"{n}.weight_scale"].float().reshape(()) for n in names]
        s_max = max(scales)
        for n, s in zip(names, scales):
            if s != s_max:
                w = (raw[f"{n}.weight"].view(torch.float8_e4m3fn).to(torch.bfloat16) * s) / s_max
                weights[f"{n}.weight"] = formats.fp8_dequantize(formats.cast_e4m3(w), s_max)
        inputs = [g.input_scale for g in group]
        if all(x is not None for x in inputs):
            common = max(inputs)
            for n, g in zip(names, group):
                layers[n] = replace(g, input_scale=common)


def _kv_scales(ckpt: Checkpoint, raw: dict, reading: decl_mod.Reading) -> dict[int, dict[str, torch.Tensor]]:
    where = _where(ckpt)
    arch = ckpt.arch
    kv_algo = reading.declared.kv_cache_quant_algo if reading.declared else None
    found: dict[int, dict[str, torch.Tensor]] = {}
    for i in arch.attention_layers:
        p = f"{arch.layer_prefix(i)}.mixer"
        for which in ("k", "v"):
            t = raw.get(f"{p}.{which}_proj.{which}_scale")
            if t is not None:
                found.setdefault(i, {})[which] = _scalar(t, f"{p}.{which}_proj.{which}_scale", where)
    if kv_algo is None:
        if found:
            raise OmniqError(f"{where}: has k_scale / v_scale tensors but declares no kv_cache_quant_algo; "
                             "engines would run a BF16 KV cache; re-export it")
        return {}
    if kv_algo != "FP8":
        raise OmniqError(f"{where}: kv_cache_quant_algo {kv_algo!r} is not supported; omniq validates FP8 KV caches")
    incomplete = [i for i in arch.attention_layers if set(found.get(i, {})) != {"k", "v"}]
    if incomplete:
        raise OmniqError(f"{where}: declares an FP8 KV cache but attention layer {incomplete[0]} lacks k_scale "
                         "or v_scale; re-export it")
    return found


# ----- same model? ----------------------------------------------------------------------------------------
def check_same_model(reference: Artifact, candidate: Artifact) -> None:
    """Refuse (exit 2) a candidate that is not a quantization of the reference's model."""
    ref, cand = reference.checkpoint, candidate.checkpoint
    if reference.quantized:
        raise OmniqError(f"{_where(ref)}: the reference is quantized ({reference.format}); pass the BF16 "
                         "checkpoint the candidate was made from")
    if ref.arch != cand.arch:
        diff = [k for k in ref.arch.__dataclass_fields__ if k != "extra"
                and getattr(ref.arch, k) != getattr(cand.arch, k)]
        k = diff[0] if diff else "architecture"
        raise OmniqError(f"{_where(cand)}: not the reference's model: config differs in {k} "
                         f"({getattr(ref.arch, k, '?')!r} vs {getattr(cand.arch, k, '?')!r})")
    ref_names = {n for n in ref.headers if _companion(n) is None}
    cand_names = {n for n in cand.headers if _companion(n) is None}
    if ref_names != cand_names:
        extra = sorted(cand_names - ref_names)
        lost = sorted(ref_names - cand_names)
        what = f"has {extra[0]} that the reference lacks" if extra else f"lacks the reference's {lost[0]}"
        raise OmniqError(f"{_where(cand)}: not the reference's model: it {what}")
    for n in ref_names:
        if n not in candidate.weights or n not in reference.weights:
            continue
        if reference.weights[n].shape != candidate.weights[n].shape:
            raise OmniqError(f"{_where(cand)}: not the reference's model: {n} has shape "
                             f"{list(candidate.weights[n].shape)}, the reference {list(reference.weights[n].shape)}")
    _check_same_tokenizer(reference, candidate)


def _tokenizer_files(ckpt: Checkpoint) -> bool:
    return any((ckpt.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                   "vocab.json"))


def _check_same_tokenizer(reference: Artifact, candidate: Artifact) -> None:
    if not _tokenizer_files(candidate.checkpoint):
        candidate.warnings.append("the candidate has no tokenizer files; the reference's tokenizer was used")
        return
    a, b = reference.tokenizer, candidate.tokenizer
    where = _where(candidate.checkpoint)
    if a.get_vocab() != b.get_vocab():
        raise OmniqError(f"{where}: not the reference's model: its tokenizer has a different vocabulary "
                         f"({len(b.get_vocab())} vs {len(a.get_vocab())} tokens)")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise OmniqError(f"{where}: not the reference's model: tokenizer {attr} is "
                             f"{getattr(b, attr, None)}, the reference's {getattr(a, attr, None)}")
    probe = "Return the number of items in a container.\n    >>> len([1, 2])  # héllo 3.14"
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe, add_special_tokens=False)["input_ids"]:
        raise OmniqError(f"{where}: not the reference's model: its tokenizer splits text differently")

def changed_unquantized(reference: Artifact, candidate: Artifact) -> dict[str, float]:
    """Tensors the candidate keeps in high precision whose values differ from the reference's (e.g. a router
    saved in BF16 instead of FP32): name -> largest absolute difference."""
    out = {}
    for name, ref in reference.weights.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in candidate.quantized or name not in candidate.weights:
            continue
        if not torch.equal(ref, candidate.weights[name]):
            out[name] = (ref - candidate.weights[name]).abs().max().item()
    return out
