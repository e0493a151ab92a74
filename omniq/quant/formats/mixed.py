"""MIXED_PRECISION: a checkpoint whose layers use more than one format (NVIDIA's NVFP4 releases: NVFP4
routed experts, FP8 or BF16 elsewhere). Not a format of its own: the declaration built from the per-layer
formats, `quantized_layers` in hf_quant_config.json naming each layer's `quant_algo` (and NVFP4's group
size).

The registry of formats (`FORMATS`) and of the companion tensors they store sits here too, because the
declaration is the one place that sees every format."""

from __future__ import annotations

from omniq.quant.formats.base import OTHER_COMPANIONS
from omniq.quant.formats.fp8 import FP8, KV_CACHE, fp8_fake_quant_weight
from omniq.quant.formats.nvfp4 import NVFP4, nvfp4_fake_quant_weight

MIXED_PRECISION = "MIXED_PRECISION"
FORMATS = {f.name: f for f in (FP8, NVFP4)}
BY_QUANT_ALGO = {f.quant_algo: f for f in FORMATS.values()}
BY_WEIGHT_DTYPE = {f.weight_dtype: f for f in FORMATS.values()}


def fake_quant_weight(w, fmt: str, ws2=None):
    """A max-calibrated weight of format `fmt` as it will be exported, float32 (`bf16`: the weight as it is);
    `ws2`: NVFP4's per-tensor global scale when it is fixed (fused q / k / v)."""
    if fmt == "nvfp4":
        return nvfp4_fake_quant_weight(w, ws2)
    if fmt == "fp8":
        return fp8_fake_quant_weight(w)
    return w.float()

# What readers (validate's artifact, lint) ask of the formats' companions, every format's together:
WEIGHT_COMPANIONS = tuple(dict.fromkeys(s for f in FORMATS.values() for s in f.companions))   # a layer's scales
KV_SUFFIXES = tuple(c.suffix for c in KV_CACHE)
SCALE_SUFFIXES = WEIGHT_COMPANIONS + KV_SUFFIXES              # calibrated scales: finite and positive
COMPANION_SUFFIXES = SCALE_SUFFIXES + tuple(c.suffix for c in OTHER_COMPANIONS)   # anything next to a weight


def companion_of(name: str) -> tuple[str, str] | None:
    """`X.weight_scale` -> ("X", "weight_scale"); None for a base tensor (a weight, norm, bias, ...)."""
    module, _, suffix = name.rpartition(".")
    return (module, suffix) if module and suffix in COMPANION_SUFFIXES else None


def quant_algo_of(formats) -> str | None:
    """The checkpoint-wide `quant_algo` for the set of formats its quantized layers use."""
    used = sorted({f for f in formats if f in FORMATS})
    if not used:
        return None
    return FORMATS[used[0]].quant_algo if len(used) == 1 else MIXED_PRECISION


def layer_declaration(fmt: str) -> dict:
    """One `quantized_layers` entry of a MIXED_PRECISION declaration."""
    f = FORMATS[fmt]
    return {"quant_algo": f.quant_algo, **({"group_size": f.group_size} if f.group_size else {})}
