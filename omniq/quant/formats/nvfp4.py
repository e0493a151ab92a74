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
    """Values already divided by their block scale -> E2M1 codes (uint8 0..15). The definition (seven
    threshold passes); `e2m1_encode_pack` computes the packed form of the same codes by arithmetic."""
    return ((x < 0).to(torch.uint8) << 3) | _e2m1_magnitudes(x.abs())


def _e2m1_magnitudes(a: torch.Tensor) -> torch.Tensor:
    """|x| -> the magnitude index (bits 0-2) of its E2M1 code; NaN gives 0 (no threshold is passed)."""
    mag = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for threshold, tie_up in _E2M1_STEPS:
        mag += (a >= threshold if tie_up else a > threshold).to(torch.uint8)
    return mag


# The arithmetic encoder (`_e2m1_pack_into`): |x| is rounded by one float32 addition of
#   m = 2**22 * e + j ulps,  e = 2**floor(log2 |x|) clamped to [1, 4]  (the E2M1 step is e / 2 = m's ulp),
# so the sum's bit pattern is bits(2**22 * e) + j + round(|x| / step) (ties to even when j is even). With
# j = 2 * log2(e) + 8 * sign, the low byte of the sum is the E2M1 code itself: round(|x| / step) is 0..4 below
# 2 (codes 0..4), 2..4 below 4 (codes 4..6) and 2..3 up to the saturation at 6 (codes 6..7). m's bits from
# the exponent E of |x| (127..129 after the clamp): E * (2**23 + 2) + (22 * 2**23 - 254) + 8 * sign.
_E2M1_M_PER_EXPONENT = (1 << 23) + 2
_E2M1_M_OFFSET = (22 << 23) - 254
_FLOAT32_SIX = 0x40C00000                       # bits of 6.0: |x| saturates here (code 7)
_FLOAT32_MAGNITUDE = 0x7FFFFFFF                 # every bit but the sign
_FLOAT32_NONFINITE_EXPONENT = 255
_INT32_SIGN_BIT = -(1 << 31)
_FLOAT32_ONE = 0x3F800000
# The sum's bits 28-31 are 0b0100 for every m (exponent 149..151): packing by `v ^ (v >> 28)` on int64 pairs
# leaves that 4 in the even element's nibble, removed by one XOR on the packed bytes.
_E2M1_PACK_RESIDUE = 4


def _e2m1_pack_into(q: torch.Tensor, out: torch.Tensor, exponents: torch.Tensor, signs: torch.Tensor) -> None:
    """E2M1 codes of the float32 values `q` (flat, contiguous, even length; overwritten), packed two per
    byte into `out` (uint8, q.numel() / 2) exactly as `pack_e2m1(e2m1_encode(q))`; `exponents` and `signs`
    are int32 scratch of q's length. Fourteen elementwise passes and one reduction, all in place, against the
    definition's twenty-nine (abs, seven compares, seven conversions, seven adds, four for the sign, two to
    pack), each allocating its result: on the CPU the callers run them on chunks that stay in the cache
    (ModelOpt's own NVFP4 cast, `NVFP4QTensor.quantize`, works on whole tensors too: 127-158 ms on one
    1856 x 2688 expert matrix against 9-17 ms here, benchmarks/nvfp4_pack_speed.py). No comparison op: torch's
    CPU compares are 4-10x slower than an integer pass (x < 0 by `torch.lt` was a fifth of the encoder's
    time); the sign code is 8 * clamp(bits ^ 0x80000000, 0, 1), which is 1 for a negative float other than
    -0.0. A chunk with an infinite or NaN value (an exponent of 255) is encoded by the definition instead
    (NaN: code 0, as there). Off the CPU the definition runs instead (the same bytes; no host sync for the
    non-finite check, no cache to fit)."""
    if q.device.type != "cpu":
        out.copy_(pack_e2m1(e2m1_encode(q)))
        return
    qi = q.view(torch.int32)
    torch.bitwise_xor(qi, _INT32_SIGN_BIT, out=signs)         # > 0 exactly for x < 0 (and for -NaN)
    qi &= _FLOAT32_MAGNITUDE                                     # |x|
    torch.bitwise_right_shift(qi, 23, out=exponents)
    if int(exponents.amax()) == _FLOAT32_NONFINITE_EXPONENT:
        negative = (signs > 0) & ~q.isnan()
        out.copy_(pack_e2m1(_e2m1_magnitudes(q) | (negative.to(torch.uint8) << 3)))
        return
    signs.clamp_(0, 1)
    exponents.clamp_(127, 129)
    torch.add(_e2m1_m_offset(q.device), exponents, alpha=_E2M1_M_PER_EXPONENT, out=exponents)   # one pass
    exponents.add_(signs, alpha=8)
    qi.clamp_(max=_FLOAT32_SIX)
    q += exponents.view(torch.float32)                           # the rounding; low byte = the code
    pairs = qi.view(torch.int64)                                 # element 2i in the low half (little-endian)
    packed = signs.view(torch.int64)
    torch.bitwise_right_shift(pairs, 28, out=packed)
    packed ^= pairs
    out.copy_(packed)                                            # int64 -> uint8 keeps the low byte
    out ^= _E2M1_PACK_RESIDUE


def e4m3_all_positive_finite(scales: torch.Tensor) -> bool:
    """Whether every float8_e4m3fn value is finite and > 0: its codes all in 0x01..0x7E (0x00 is zero, 0x7F
    NaN, the sign bit negative; E4M3FN has no infinity). Two uint8 reductions, against a float32 conversion
    (per element in torch) and two passes over the values."""
    codes = scales.view(torch.uint8)
    return codes.numel() == 0 or (int(codes.min()) >= 0x01 and int(codes.max()) <= 0x7E)


_M_OFFSETS: dict = {}


def _e2m1_m_offset(device) -> torch.Tensor:
    """_E2M1_M_OFFSET as a 0-dim int32 tensor, so that `offset + exponents * K` is one pass."""
    t = _M_OFFSETS.get(device)
    if t is None:
        t = _M_OFFSETS[device] = torch.tensor(_E2M1_M_OFFSET, dtype=torch.int32, device=device)
    return t


def _default_chunk(device: torch.device) -> int:
    """Elements per chunk of the arithmetic encoder: on the CPU 256 K (three 1 MiB buffers, in the L2 / L3
    cache; on a real-width expert matrix at one thread 128 K-1 M were within this machine's noise of each
    other, 32-64 K slower by the per-op overhead: benchmarks/nvfp4_pack_speed.py --chunks); elsewhere 16 M
    (no cache to fit, fewer kernel launches and host syncs)."""
    return 1 << 18 if device.type == "cpu" else 1 << 24


def e2m1_encode_pack(x: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """[..., n] float values (n even) -> packed E2M1 codes [..., n/2], the same bytes as
    `pack_e2m1(e2m1_encode(x))`, by the arithmetic encoder in chunks of `chunk_elements`."""
    n = x.shape[-1]
    if n % 2:
        raise ValueError("e2m1_encode_pack needs an even last dimension")
    flat = x.detach().reshape(-1)
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=x.device)
    step = max(2, (chunk_elements or _default_chunk(x.device)) // 2 * 2)
    q = torch.empty(min(step, flat.numel()), dtype=torch.float32, device=x.device)
    exponents, signs = torch.empty_like(q, dtype=torch.int32), torch.empty_like(q, dtype=torch.int32)
    for a in range(0, flat.numel(), step):
        k = min(step, flat.numel() - a)
        q[:k].copy_(flat[a:a + k])
        _e2m1_pack_into(q[:k], out[a // 2:(a + k) // 2], exponents[:k], signs[:k])
    return out.reshape(*x.shape[:-1], n // 2)


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


def _magnitude_bits(dtype) -> tuple | None:
    """The integer view of a float dtype and the mask that clears its sign bit (None: no such path): a
    non-negative float's magnitude orders as its bit pattern does (NaN patterns above infinity's), so
    max |x| is a max over integers."""
    return {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
            torch.float32: (torch.int32, _FLOAT32_MAGNITUDE)}.get(dtype)


def _block_amax(w: torch.Tensor, block: int, chunk_elements: int = 1 << 20) -> torch.Tensor:
    """max |w| per block ([..., n/block], w's dtype; NaN where a block has one, as `abs().amax(-1)`). For
    BF16 / FP16 / FP32 on the bit patterns with the sign cleared, rows `chunk_elements` at a time into one
    reused buffer: 5x faster on the CPU than `abs().amax(-1)` in BF16 (whose elementwise passes are not
    vectorized) on a real-width expert matrix at one thread (benchmarks/nvfp4_pack_speed.py)."""
    blocks = _blocks(w, block)
    bits = _magnitude_bits(w.dtype)
    if bits is None:
        return blocks.abs().amax(-1)
    int_dtype, mask = bits
    rows = blocks.reshape(-1, *blocks.shape[-2:]).view(int_dtype)
    out = torch.empty(rows.shape[:2], dtype=int_dtype, device=w.device)
    step = max(1, min(rows.shape[0], chunk_elements // max(rows.shape[1] * block, 1)))
    buf = torch.empty((step, *rows.shape[1:]), dtype=int_dtype, device=w.device)
    for a in range(0, rows.shape[0], step):
        k = min(step, rows.shape[0] - a)
        torch.bitwise_and(rows[a:a + k], mask, out=buf[:k])
        torch.amax(buf[:k], -1, out=out[a:a + k])
    return out.view(w.dtype).reshape(blocks.shape[:-1])


def nvfp4_block_scales(w: torch.Tensor, weight_scale_2: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """Per-block weight scales (float8_e4m3fn [..., n/block]) as ModelOpt's export computes them."""
    block_amax = _block_amax(w.detach(), block).float()
    scale = block_amax / (E2M1_MAX * weight_scale_2.float())
    if scale.device.type == "cpu" and weight_scale_2.numel() == 1 and 0 < float(weight_scale_2) < math.inf:
        # (on the CPU only: reading the global scale is free there, a host sync elsewhere)
        # every scale is +0, positive, +inf or NaN, so its bits are >= 0 and bits - 1 < 0 only for +0: that one
        # becomes 1.0 by integer passes (`torch.where(scale == 0, ...)` took 3x as long, its compare most of it)
        bits = scale.view(torch.int32)
        zero = bits - 1
        zero >>= 31
        zero &= _FLOAT32_ONE
        bits += zero
    else:
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp_(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


_E4M3_VALUES: dict = {}


def _e4m3_float(scales: torch.Tensor) -> torch.Tensor:
    """`scales.float()`, for float8_e4m3fn by a 256-entry table (5x faster on the CPU than torch's
    conversion, which runs per element; the same values, NaN included: tests/quant/test_formats.py)."""
    if scales.dtype != torch.float8_e4m3fn:
        return scales.float()
    table = _E4M3_VALUES.get(scales.device)
    if table is None:
        table = _E4M3_VALUES[scales.device] = (
            torch.arange(256, dtype=torch.uint8, device=scales.device).view(torch.float8_e4m3fn).float())
    codes = scales.reshape(-1).view(torch.uint8).int()
    return torch.index_select(table, 0, codes).reshape(scales.shape)


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
               block: int = NVFP4_BLOCK, chunk_elements: int | None = None) -> torch.Tensor:
    """The packed E2M1 codes (uint8 [..., n/2]) of `w` under given block scales and global scale(s), as
    ModelOpt's `NVFP4QTensor.quantize` computes them (each value divided in float32 by its block's scale
    times the global scale, rounded to E2M1 ties to even, two codes per byte). A `weight_scale_2` with one
    value per stacked expert broadcasts over that leading dimension. Rows go `chunk_elements` at a time
    (default `_default_chunk`) through reused float32 / int32 buffers: converted, divided and encoded by the
    arithmetic encoder (`_e2m1_pack_into`) in place, so on the CPU every pass runs in the cache and no
    temporary is allocated per chunk (a fused real-width expert stack, 128 x 1856 x 2688, would be 2.55 GB of
    float32 per temporary if done at once). On one 1856 x 2688 BF16 expert matrix at one thread this is 4-6x
    faster than dividing the whole matrix and running `pack_e2m1(e2m1_encode(...))` on it
    (benchmarks/nvfp4_pack_speed.py); the bytes are the same (tests/quant/test_formats.py)."""
    w = w.detach()
    n = w.shape[-1]
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=w.device)
    rows = w.reshape(-1, n)
    scales = weight_scale.reshape(rows.shape[0], -1)
    if ws2.dim() and ws2.numel() > 1:          # one global scale per stacked expert: repeat it per row
        per_row = ws2.reshape(-1, 1).expand(-1, rows.shape[0] // ws2.numel()).reshape(-1, 1)
    else:
        per_row = ws2.reshape(1, 1)
    n_blocks = (n + (-n) % block) // block
    width = n_blocks * block
    out = torch.empty((rows.shape[0], width // 2), dtype=torch.uint8, device=w.device)
    step = max(1, (chunk_elements or _default_chunk(w.device)) // max(width, 1))
    step = min(step, max(rows.shape[0], 1))
    q = torch.zeros((step, width), dtype=torch.float32, device=w.device)
    exponents = torch.empty(step * width, dtype=torch.int32, device=w.device)
    signs = torch.empty_like(exponents)
    for a in range(0, rows.shape[0], step):
        k = min(step, rows.shape[0] - a)
        g = per_row if per_row.shape[0] == 1 else per_row[a:a + k]
        qk = q[:k]
        qk[:, :n].copy_(rows[a:a + k])
        if width > n:
            qk[:, n:].zero_()                  # the padding of the last block (overwritten by the encoder)
        blocks = qk.view(k, n_blocks, block)
        torch.div(blocks, (_e4m3_float(scales[a:a + k]) * g).unsqueeze(-1), out=blocks)
        _e2m1_pack_into(qk.view(-1), out[a:a + k].view(-1), exponents[:k * width], signs[:k * width])
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
