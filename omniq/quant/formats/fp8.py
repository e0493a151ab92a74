"""FP8 E4M3 per tensor (`quant_algo: FP8`) in plain torch, on CPU, matching what ModelOpt 0.47 writes.

    weight        F8_E4M3  = cast_e4m3(w / weight_scale), weight_scale = amax(|w|) / 448 (fp32 scalar).
                  ModelOpt divides in the weight's own dtype (a bf16 weight by a 0-dim fp32 scale gives a
                  bf16 quotient, then the cast): `fp8_quantize` does the same, so the bytes match.
    activation    static: x -> cast_e4m3(clamp(x / input_scale, +-448)) * input_scale.
    KV cache      the same with `k_scale` / `v_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniq.model import names
from omniq.quant.formats.base import SCALAR_BYTES, Companion, Format, torch

E4M3_MAX = 448.0


# ----- FP8 E4M3 ----------------------------------------------------------------------------------------
def fp8_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor FP8 scale (weight_scale, input_scale, k_scale, v_scale) from an absolute maximum."""
    return torch.as_tensor(amax, dtype=torch.float32).reshape(()) / E4M3_MAX


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to float8_e4m3fn (nearest, ties to even), saturating at +-448 instead of torch's NaN."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class FP8Weight:
    weight: torch.Tensor           # float8_e4m3fn, same shape as the weight
    weight_scale: torch.Tensor     # fp32 scalar

    def dequantize(self) -> torch.Tensor:
        return fp8_dequantize(self.weight, self.weight_scale)


def fp8_quantize(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> FP8Weight:
    """Per-tensor FP8 weight, as ModelOpt exports it (scale from the weight's amax unless given)."""
    if weight_scale is None:
        weight_scale = fp8_scale(w.detach().abs().amax().float())
    weight_scale = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(())
    return FP8Weight(cast_e4m3(w.detach() / weight_scale), weight_scale)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * torch.as_tensor(scale, dtype=torch.float32)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Static per-tensor FP8: what an engine does to an activation (or K / V) with a calibrated scale."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    return cast_e4m3(x.float() / s).float() * s

def fp8_fake_quant_weight(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    return fp8_quantize(w, weight_scale).dequantize()


class FP8Format(Format):
    """FP8 (W8A8, per-tensor static scales)."""

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        return out_features * in_features + 2 * SCALAR_BYTES           # F8_E4M3 weight + weight_scale + input_scale

    def quantize(self, w: torch.Tensor, **scales) -> dict[str, torch.Tensor]:
        q = fp8_quantize(w, scales.get("weight_scale"))
        return {"weight": q.weight, "weight_scale": q.weight_scale}

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int | None = None) -> torch.Tensor:
        return fp8_dequantize(tensors["weight"], tensors["weight_scale"])

    def corrupt(self, tensors: dict[str, torch.Tensor]) -> str | None:
        t, s = tensors["weight"], tensors["weight_scale"]
        if ((t.view(torch.uint8) & 0x7F) == 0x7F).any() or not torch.isfinite(s).all() or (s <= 0).any():
            return " has NaN FP8 codes or a non-positive weight_scale"     # E4M3FN's NaN is S.1111.111
        return None

    def fake_quant_input(self, x: torch.Tensor, input_scale) -> torch.Tensor:
        return fp8_fake_quant(x, input_scale)


FP8 = FP8Format(name="fp8", quant_algo="FP8", weight_dtype="F8_E4M3", bits=8,
                scales=(Companion("weight_scale", "F32", "weight"), Companion("input_scale", "F32", "input")),
                group_size=None,
                modelopt_quantizer={"num_bits": (4, 3), "axis": None})

# An FP8 KV cache (`kv_cache_quant_algo: FP8`): one fp32 scale each for K and V per attention layer, where
# the name codec puts them (`names.kv_scales`).
KV_CACHE = tuple(Companion(suffix, "F32", "kv") for suffix in names.KV_SCALE_SUFFIXES.values())
