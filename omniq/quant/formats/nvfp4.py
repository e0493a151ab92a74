"""NVFP4 (`quant_algo: NVFP4`, group_size 16)
    weight        U8 [out, in/2]: two E2M1 codes per byte, element 2i in the low nibble and 2i+1 in the
                  high nibble; a code is sign (bit 3) and a magnitude index (bits 0-2) into
                  {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
    weight_scale  F8_E4M3 [out, in/16]: per 16-block, e4m3(clamp(block_amax / (6 * weight_scale_2),
                  2**-9, 448)), an all-zero block gets 1.0.
    weight_scale_2  fp32 scalar: global_amax / (6 * 448).
    dequantize    w = e2m1 * (float(weight_scale) * weight_scale_2), per block.
    activation    dynamic per 16-block with the static global scale `input_scale` (= amax / (6 * 448)):
                  block scale e4m3(min(block_amax / (6 * input_scale), 448)) * input_scale, values
                  rounded to E2M1 relative to it; a block whose scale rounds to zero becomes zeros
                  (TensorRT-LLM's `cvt_warp_fp16_to_fp4`; ModelOpt's own fake-quant kernel needs CUDA).

E2M1 rounding is to nearest, ties to the even code, saturating at 6 (the thresholds below); the sign
of a value that rounds to zero is kept (code 8), as ModelOpt does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omniq.quant.formats.base import SCALAR_BYTES, Companion, F, Format, torch
from omniq.quant.formats.fp8 import E4M3_MAX, cast_e4m3

E2M1_MAX = 6.0
NVFP4_BLOCK = 16
E4M3_MIN_SCALE = 2.0 ** -9          # smallest positive E4M3 (subnormal) value; weight block scales floor here

# Magnitudes indexed by the low three bits of an E2M1 code; bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes, each with the rule for a value exactly on it: ties go to the
# code with an even index (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_E2M1_MAGIC = 1.5 * 2.0 ** 22       # x + this rounds a float32 |x| < 2**21 to a multiple of 0.5 (see e2m1_round)


# ----- E2M1 codes ----------------------------------------------------------------------------------------
def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Values already divided by their block scale -> E2M1 codes (uint8 0..15)."""
    a = x.abs()
    mag = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, tie_up in _E2M1_STEPS:
        mag += (a >= threshold if tie_up else a > threshold).to(torch.uint8)
    return ((x < 0).to(torch.uint8) << 3) | mag


def _e2m1_table(device=None) -> torch.Tensor:
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])                  # index = code


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return _e2m1_table(codes.device)[codes.long()]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest E2M1 value, ties to even, saturating at 6: the same result as
    `e2m1_decode(e2m1_encode(x))` (up to the sign of zero: a negative value that rounds to zero gives +0)
    without building codes. The E2M1 grid has step 0.5 below 2, 1 below 4 and 2 above; a float32 sum
    `x + M` with M = 1.5 * 2**23 * step rounds x to a multiple of `step`, ties to even (the hardware's
    rounding, one operation), and `- M` gives it back exactly. M comes from x's exponent bits (2**floor(log2
    |x|), clamped to [1, 4], times 1.5 * 2**22), so the whole rounding is six elementwise passes with no
    comparisons or divisions (`round(|x| / step) * step` with the step chosen by two `where`s was most of
    `validate`'s NVFP4 activation fake-quant time on CPU). Exact for every float32: |x| >= 8 saturates
    whatever the sum's rounding, NaN stays NaN (tests/quant/test_formats.py checks every tie and its
    neighbours)."""
    if x.dtype != torch.float32:
        return e2m1_round(x.float()).to(x.dtype)
    m = (x.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(1.0, 4.0).mul_(_E2M1_MAGIC)
    return (x + m).sub_(m).clamp_(-E2M1_MAX, E2M1_MAX)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] codes -> [..., n/2] bytes: element 2i in the low nibble, 2i+1 in the high nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    packed = packed.to(torch.uint8)
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _byte_table(device=None) -> torch.Tensor:
    """(256, 2): the two E2M1 values (low nibble first) of every packed byte."""
    codes = torch.arange(256, device=device)
    return _e2m1_table(device)[torch.stack([codes & 0x0F, codes >> 4], dim=-1)]


def e2m1_unpack_values(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] packed bytes -> [..., n] float32 E2M1 values (one row of the byte table per byte;
    `index_select` with int32 indices: a few times faster on CPU than indexing with int64 ones)."""
    values = torch.index_select(_byte_table(packed.device), 0, packed.reshape(-1).to(torch.int32))
    return values.reshape(*packed.shape[:-1], -1)


# ----- NVFP4 ---------------------------------------------------------------------------------------------
def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 / input_scale of NVFP4 from a per-tensor absolute maximum."""
    return torch.as_tensor(amax, dtype=torch.float32).reshape(()) / (E2M1_MAX * E4M3_MAX)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., n] -> [..., n/block, block], zero-padding the last dimension to a whole number of blocks."""
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block)


def nvfp4_block_scales(w: torch.Tensor, weight_scale_2: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """Per-block weight scales (float8_e4m3fn [..., n/block]) as ModelOpt's export computes them."""
    block_amax = _blocks(w.detach(), block).abs().amax(-1).float()
    scale = block_amax / (E2M1_MAX * weight_scale_2.float())
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


@dataclass(frozen=True)
class NVFP4Weight:
    weight: torch.Tensor           # uint8 [..., n/2], two E2M1 codes per byte
    weight_scale: torch.Tensor     # float8_e4m3fn [..., n/16]
    weight_scale_2: torch.Tensor   # fp32 scalar

    def dequantize(self, in_features: int | None = None) -> torch.Tensor:
        return nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2, in_features)


def nvfp4_quantize(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None,
                   block: int = NVFP4_BLOCK) -> NVFP4Weight:
    """NVFP4 weight, as ModelOpt exports it. `weight_scale_2` defaults to amax(|w|) / (6 * 448); pass the
    exported one when ModelOpt shared it across fused layers."""
    w = w.detach()
    if weight_scale_2 is None:
        weight_scale_2 = nvfp4_global_scale(w.abs().amax().float())
    weight_scale_2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(())
    weight_scale = nvfp4_block_scales(w, weight_scale_2, block)
    return NVFP4Weight(nvfp4_pack(w, weight_scale, weight_scale_2, block), weight_scale, weight_scale_2)


def nvfp4_pack(w: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
               block: int = NVFP4_BLOCK, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """The packed E2M1 codes (uint8 [..., n/2]) of `w` under given block scales and global scale(s), as
    ModelOpt's `NVFP4QTensor.quantize` computes them (each value divided in float32 by its block's scale
    times the global scale, rounded to E2M1 ties to even, two codes per byte). A `weight_scale_2` with one
    value per stacked expert broadcasts over that leading dimension. Rows are packed `chunk_elements` at a
    time, so the float32 temporaries stay at about 0.3 GB whatever the tensor (a fused real-width expert stack
    is 128 x 1856 x 2688: 2.55 GB in float32 per temporary if done at once)."""
    w = w.detach()
    n = w.shape[-1]
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=w.device)
    rows = w.reshape(-1, n)
    scales = weight_scale.reshape(rows.shape[0], -1)
    if ws2.dim() and ws2.numel() > 1:          # one global scale per stacked expert: repeat it per row
        per_row = ws2.reshape(-1, 1).expand(-1, rows.shape[0] // ws2.numel()).reshape(-1, 1)
    else:
        per_row = ws2.reshape(1, 1)
    out = torch.empty((rows.shape[0], (n + (-n) % block) // 2), dtype=torch.uint8, device=w.device)
    step = max(1, chunk_elements // max(n, 1))
    for a in range(0, rows.shape[0], step):
        r = slice(a, a + step)
        g = per_row if per_row.shape[0] == 1 else per_row[r]
        scaled = _blocks(rows[r].float(), block) / (scales[r].float() * g).unsqueeze(-1)
        out[r] = pack_e2m1(e2m1_encode(scaled.flatten(-2)))
    return out.reshape(*w.shape[:-1], -1)


def nvfp4_dequantize(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                     in_features: int | None = None) -> torch.Tensor:
    """U8 codes + F8_E4M3 block scales + fp32 global scale -> float32 weight [..., in_features]."""
    values = e2m1_unpack_values(packed)
    n_blocks = weight_scale.shape[-1]
    block = values.shape[-1] // n_blocks
    scale = weight_scale.float() * torch.as_tensor(weight_scale_2, dtype=torch.float32)
    w = (values.reshape(*values.shape[:-1], n_blocks, block) * scale.unsqueeze(-1)).flatten(-2)
    return w if in_features is None else w[..., :in_features]


def nvfp4_fake_quant(x: torch.Tensor, input_scale: torch.Tensor | float, block: int = NVFP4_BLOCK,
                     chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Dynamic NVFP4 activation quantization with a static global scale, as the engines run it. On the CPU
    the rows go `chunk_elements` at a time (1 MiB of float32), so the ten elementwise passes over them run
    in the cache instead of streaming the whole activation through memory ten times."""
    gs = torch.as_tensor(input_scale, dtype=torch.float32)
    n = x.shape[-1]
    xb = _blocks(x.float(), block)
    rows = xb.reshape(-1, *xb.shape[-2:])
    out = torch.empty_like(rows)
    step = max(1, chunk_elements // max(rows.shape[1] * block, 1)) if x.device.type == "cpu" else rows.shape[0]
    for a in range(0, rows.shape[0], max(step, 1)):
        r = rows[a: a + step]
        block_amax = r.abs().amax(-1, keepdim=True)
        scale = cast_e4m3(block_amax / (E2M1_MAX * gs)).float() * gs
        divisor = torch.where(scale > 0, scale, torch.full_like(scale, math.inf))   # a zero scale: zeros
        torch.mul(e2m1_round(r / divisor), scale, out=out[a: a + step])
    return out.reshape(xb.shape).flatten(-2)[..., :n]


def nvfp4_fake_quant_weight(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None) -> torch.Tensor:
    """What an NVFP4 weight will be after export and dequantization (float32)."""
    return nvfp4_quantize(w, weight_scale_2).dequantize(w.shape[-1])


class NVFP4Format(Format):
    """NVFP4 (W4A4: E2M1 values, E4M3 scale per 16-block, fp32 global scale)."""

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        # U8 [out, in/2] + F8_E4M3 weight_scale [out, in/16] + weight_scale_2 + input_scale
        return n // 2 + n // NVFP4_BLOCK + 2 * SCALAR_BYTES

    def quantize(self, w: torch.Tensor, **scales) -> dict[str, torch.Tensor]:
        q = nvfp4_quantize(w, scales.get("weight_scale_2"))
        return {"weight": q.weight, "weight_scale": q.weight_scale, "weight_scale_2": q.weight_scale_2}

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int | None = None) -> torch.Tensor:
        return nvfp4_dequantize(tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"], in_features)

    def corrupt(self, tensors: dict[str, torch.Tensor]) -> str | None:
        if not torch.isfinite(tensors["weight_scale"].view(torch.float8_e4m3fn).float()).all():
            return ".weight_scale has NaN entries"                   # every E2M1 code is a number
        return None

    def fake_quant_input(self, x: torch.Tensor, input_scale) -> torch.Tensor:
        return nvfp4_fake_quant(x, input_scale)


NVFP4 = NVFP4Format(name="nvfp4", quant_algo="NVFP4", weight_dtype="U8", bits=4,
                    scales=(Companion("weight_scale", "F8_E4M3", "weight", block=NVFP4_BLOCK),
                            Companion("weight_scale_2", "F32", "weight"), Companion("input_scale", "F32", "input")),
                    group_size=NVFP4_BLOCK,
                    modelopt_quantizer={"num_bits": (2, 1),
                                        "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)}})
