"""omniq's CPU FP8 / NVFP4 arithmetic writes exactly what ModelOpt writes, and reads it back right."""

from __future__ import annotations

import math

import pytest
import torch

from omniq.quant import formats as fm


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * 0.04
    w[0, 5] = 0.9                       # an outlier that sets the global scale
    w[3, :16] = 0.0                     # an all-zero block (scale 1.0 by convention)
    w[5, 16:32] *= 1e-7                 # a block whose scale falls below E4M3's smallest value
    w[7, 32:48] = torch.linspace(-1, 1, 16) * 0.3
    return w.to(dtype)


@pytest.fixture(scope="module")
def modelopt():
    from modelopt.torch.export.quant_utils import to_quantized_weight
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return NVFP4QTensor, to_quantized_weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_quantize_is_bit_identical_to_modelopt(modelopt, dtype):
    NVFP4QTensor, _ = modelopt
    w = _weights(dtype)
    q, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    mine = fm.nvfp4_quantize(w)
    assert mine.weight.dtype == torch.uint8 and mine.weight.shape == (48, 128)
    assert mine.weight_scale.dtype == torch.float8_e4m3fn and mine.weight_scale.shape == (48, 16)
    assert torch.equal(mine.weight, q._quantized_data)
    assert torch.equal(mine.weight_scale.view(torch.uint8), scale.view(torch.uint8))
    assert mine.weight_scale_2.item() == scale_2.item()
    # and with a given (shared) global scale, as export uses after fusing layers' scales
    shared = scale_2 * 1.7
    q2, scale2, _ = NVFP4QTensor.quantize(w, 16, None, shared)
    mine2 = fm.nvfp4_quantize(w, shared)
    assert torch.equal(mine2.weight, q2._quantized_data)
    assert torch.equal(mine2.weight_scale.view(torch.uint8), scale2.view(torch.uint8))


def test_nvfp4_dequantize_is_identical_to_modelopt(modelopt):
    NVFP4QTensor, _ = modelopt
    w = _weights(torch.bfloat16)
    q, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    theirs = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    mine = fm.nvfp4_dequantize(q._quantized_data, scale, scale_2)
    assert torch.equal(mine, theirs)


def test_fp8_quantize_is_bit_identical_to_modelopt_export(modelopt):
    _, to_quantized_weight = modelopt
    for dtype in (torch.bfloat16, torch.float32):
        w = _weights(dtype, seed=1)
        amax = w.abs().amax().float()
        scale = torch.tensor(amax.item() / 448.0)   # how ModelOpt's export builds the per-tensor scale
        theirs = to_quantized_weight(w, scale, "fp8")
        mine = fm.fp8_quantize(w)
        assert mine.weight_scale.item() == scale.item()
        assert torch.equal(mine.weight.view(torch.uint8), theirs.view(torch.uint8)), dtype


def test_e2m1_codes_round_to_nearest_even_and_saturate():
    x = torch.tensor([0.0, -0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 9.0, -0.1, -3.2, -100.0])
    codes = fm.e2m1_encode(x)
    assert codes.tolist() == [0, 0, 0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 8, 13, 15]
    assert fm.e2m1_decode(codes).tolist() == [0, 0, 0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6, -0.0, -3, -6]
    # every code round-trips
    all_codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fm.e2m1_encode(fm.e2m1_decode(all_codes)), torch.tensor(
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15], dtype=torch.uint8))  # -0.0 encodes as +0


def test_pack_puts_even_elements_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = fm.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(fm.unpack_e2m1(packed), codes)


def test_dequantize_quantize_error_is_small():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02

    def sqnr(a, b):
        return 10 * math.log10(a.pow(2).sum().item() / (a - b).pow(2).sum().item())

    fp8 = sqnr(w, fm.fp8_fake_quant_weight(w))
    nvfp4 = sqnr(w, fm.nvfp4_fake_quant_weight(w))
    # E4M3 keeps 3 mantissa bits (about 31 dB on Gaussian data); E2M1 with 16-blocks about 20 dB
    assert fp8 > 28, fp8
    assert 17 < nvfp4 < 26, nvfp4
    # and the quantization is not a no-op
    assert not torch.equal(fm.nvfp4_fake_quant_weight(w), w)


def test_nvfp4_activation_fake_quant_follows_the_two_level_scale(modelopt):
    NVFP4QTensor, _ = modelopt
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, 64, generator=g) * 3.0
    x[0, 0, :16] = 0.0
    input_scale = fm.nvfp4_global_scale(x.abs().amax())
    mine = fm.nvfp4_fake_quant(x, input_scale)
    # the same numbers through ModelOpt's weight arithmetic, given our per-block FP8 scale
    block_amax = x.reshape(4, 10, 4, 16).abs().amax(-1)
    block_scale = fm.cast_e4m3(block_amax / (6.0 * input_scale))
    q, _, _ = NVFP4QTensor.quantize(x, 16, block_scale, input_scale)
    theirs = q.dequantize(dtype=torch.float32, scale=block_scale, double_scale=input_scale, block_sizes={-1: 16})
    nonzero = (block_scale.float() > 0).repeat_interleave(16, dim=-1)
    assert torch.equal(mine[nonzero], theirs[nonzero])
    assert torch.equal(mine[~nonzero], torch.zeros_like(mine[~nonzero]))
    # every block's largest magnitude maps to E2M1's largest value, so quantizing twice changes nothing
    assert torch.equal(fm.nvfp4_fake_quant(mine, input_scale), mine)
    # a block whose FP8 scale underflows is flushed to zero, as TensorRT-LLM's kernel does
    tiny = torch.full((1, 16), 1e-9)
    assert torch.equal(fm.nvfp4_fake_quant(tiny, input_scale), torch.zeros(1, 16))


def test_fp8_activation_fake_quant_is_static_and_saturates():
    s = torch.tensor(0.01)
    x = torch.tensor([0.0, 0.01, 1.04, 4.48, 5.0, -100.0, 0.0123, 1.0])
    y = fm.fp8_fake_quant(x, s)
    assert y[:4].tolist() == pytest.approx([0.0, 0.01, 1.04, 4.48], rel=1e-6)          # on the E4M3 grid
    assert y[4].item() == pytest.approx(4.48) and y[5].item() == pytest.approx(-4.48)   # clamped at 448 * s
    assert y[6].item() == pytest.approx(0.0125)                                        # 1.23 -> 1.25
    assert y[7].item() == pytest.approx(0.96)                                          # 100: tie -> even 96
    # matches ModelOpt's eager FP8 fake-quant up to the rounding of 1 / scale
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    z = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    amax = z.abs().amax()
    assert torch.allclose(fm.fp8_fake_quant(z, amax / 448), fp8_eager(z, amax), rtol=0, atol=1e-6)


def test_fast_e2m1_rounding_equals_the_codes():
    grid = torch.arange(-8.0, 8.0, 1 / 64)                     # every tie and midpoint of the E2M1 grid
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(5)) * 3
    for x in (grid, noise):
        assert torch.equal(fm.e2m1_round(x), fm.e2m1_decode(fm.e2m1_encode(x)) + 0.0)   # + 0.0: -0 == 0


def test_fast_e2m1_rounding_is_exact_next_to_every_tie_and_far_out():
    """The magic-number rounding (`e2m1_round`) against the codes on the floats either side of every tie and
    step boundary, values past saturation up to float32's range, tiny and subnormal ones, and NaN."""
    edges = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 2.0 ** 21, 2.0 ** 23,
                          1.5 * 2 ** 22, 1.5 * 2 ** 24, 2.0 ** 25, 3.0e38, 1e-30, 1e-45])
    near = torch.cat([torch.nextafter(edges, torch.zeros_like(edges)), edges,
                      torch.nextafter(edges, torch.full_like(edges, math.inf))])
    x = torch.cat([near, -near, torch.tensor([0.0, -0.0, math.inf, -math.inf])])
    assert torch.equal(fm.e2m1_round(x), fm.e2m1_decode(fm.e2m1_encode(x)) + 0.0)
    assert fm.e2m1_round(torch.tensor([math.nan])).isnan().all()
    half = torch.arange(-8.0, 8.0, 1 / 64).to(torch.bfloat16)          # other dtypes: rounded as float32
    assert fm.e2m1_round(half).dtype == torch.bfloat16
    assert torch.equal(fm.e2m1_round(half).float(), fm.e2m1_round(half.float()))


def _e2m1_edge_values():
    """Every tie and step boundary of the E2M1 grid and the floats either side of it, values past the
    saturation up to float32's range, tiny and subnormal ones, both zeros, both infinities, NaN of both signs."""
    edges = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0,
                          2.0 ** 21, 2.0 ** 22, 2.0 ** 23, 1.5 * 2 ** 22, 1.5 * 2 ** 24, 2.0 ** 25, 3.0e38,
                          1e-30, 1e-38, 1e-45])
    near = torch.cat([torch.nextafter(edges, torch.zeros_like(edges)), edges,
                      torch.nextafter(edges, torch.full_like(edges, math.inf))])
    grid = torch.arange(-8.0, 8.0, 1 / 64)
    return torch.cat([near, -near, grid, torch.tensor([0.0, -0.0, math.inf, -math.inf]),
                      torch.tensor([math.nan, -math.nan])])


def _reference_packed(x):
    return fm.pack_e2m1(fm.e2m1_encode(x))


def test_arithmetic_e2m1_encoder_gives_the_threshold_codes():
    """e2m1_encode_pack (one float32 addition per value, `nvfp4._e2m1_pack_into`) writes the bytes of
    pack_e2m1(e2m1_encode(x)) on every tie and its neighbours, far out, subnormal, -0.0 (code 0), infinities,
    and NaN (code 0), in whole chunks and in chunks that split the special values."""
    special = _e2m1_edge_values()
    finite = special[torch.isfinite(special)]
    noise = torch.randn(40000, generator=torch.Generator().manual_seed(6)) * 3
    for x in (finite, special, noise, noise * 1e-3, noise * 1e3):
        x = x[: x.numel() // 2 * 2]
        ref = _reference_packed(x)
        for chunk in (None, 2, 64, 1 << 12):
            assert torch.equal(fm.e2m1_encode_pack(x, chunk), ref), chunk
    # the chunk with a non-finite value falls back to the definition; its neighbours stay arithmetic
    mixed = noise.clone()
    mixed[5000] = math.nan
    mixed[20001] = -math.inf
    assert torch.equal(fm.e2m1_encode_pack(mixed, 4096), _reference_packed(mixed))
    assert fm.e2m1_encode_pack(torch.tensor([math.nan, -0.0, -1e-30, 7.0])).tolist() == [0x00, 0x78]
    # other dtypes are encoded from their float32 value
    half = noise[:1000].to(torch.bfloat16)
    assert torch.equal(fm.e2m1_encode_pack(half), _reference_packed(half.float()))
    with pytest.raises(ValueError):
        fm.e2m1_encode_pack(torch.zeros(3))


def test_nvfp4_pack_of_edge_values_and_zero_scales_is_the_definitions():
    """nvfp4_pack's fused division and arithmetic encoding against the definition (divide, then encode by
    thresholds) where values land on ties after the division, where a block's scale is zero or NaN (an all-zero
    tensor's global scale is 0: 0 / 0 gives NaN, code 0), and with a last block padded."""
    special = _e2m1_edge_values()
    w = special[torch.randperm(special.numel(), generator=torch.Generator().manual_seed(7))][:32 * 16]
    w = torch.cat([w, torch.zeros(32 * 16 - w.numel())]).reshape(16, 32) * 0.5
    ws = torch.full((16, 2), 2.0).to(torch.float8_e4m3fn)          # divisor 2 * 0.25: every value doubled
    ws2 = torch.tensor(0.25)
    for chunk in (None, 1, 64, 200):
        assert torch.equal(fm.nvfp4_pack(w, ws, ws2, chunk_elements=chunk), nvfp4_pack_at_once(w, ws, ws2))
    zero = torch.zeros(4, 48, dtype=torch.bfloat16)
    zero[1, 3] = 1.0                                                # x / 0 = inf beside 0 / 0 = NaN
    for ws2 in (torch.tensor(0.0), torch.tensor(math.nan)):
        scales = fm.nvfp4_block_scales(zero, ws2)
        assert torch.equal(fm.nvfp4_pack(zero, scales, ws2), nvfp4_pack_at_once(zero, scales, ws2))
    padded = _weights(torch.bfloat16)[:, :200]                      # 200 = 12.5 blocks
    q = fm.nvfp4_quantize(padded)
    blocks = fm._blocks(padded.float(), 16) / (q.weight_scale.float() * q.weight_scale_2).unsqueeze(-1)
    assert q.weight.shape == (48, 104)
    assert torch.equal(q.weight, _reference_packed(blocks.flatten(-2)))
    assert torch.equal(fm.nvfp4_pack(padded, q.weight_scale, q.weight_scale_2, chunk_elements=300), q.weight)


def test_block_amax_on_bit_patterns_is_abs_amax():
    """nvfp4._block_amax (max over the sign-cleared bit patterns, rows in chunks) against abs().amax(-1):
    signed zeros, subnormals, infinities and NaN of both signs (a NaN block stays NaN), stacked experts, a
    padded last block, every float dtype it takes the integer path for, and one it does not."""
    from omniq.quant.formats import nvfp4

    special = _e2m1_edge_values()
    g = torch.Generator().manual_seed(8)
    base = torch.randn(3, 10, 64, generator=g)
    base.view(-1)[torch.randperm(base.numel(), generator=g)[:special.numel()]] = special
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        w = base.to(dtype)
        for x in (w, w[..., :56], w[0]):
            ref = fm._blocks(x, 16).abs().amax(-1)
            for chunk in (1, 100, 1 << 20):
                mine = nvfp4._block_amax(x, 16, chunk)
                assert mine.dtype == dtype and mine.shape == ref.shape
                assert torch.equal(mine.isnan(), ref.isnan()), (dtype, chunk)
                assert torch.equal(mine.nan_to_num(), ref.nan_to_num()), (dtype, chunk)


def test_block_scales_are_the_definitions_for_every_global_scale():
    """nvfp4_block_scales (zero scales set to 1.0 by integer passes when weight_scale_2 is one finite positive
    value) against the definition (abs().amax(-1), divide, where(scale == 0, 1), clamp, cast): a zero block, a
    block whose scale underflows to 0 after the division, NaN and inf blocks, and global scales that are
    0, NaN, inf or negative (the definition's path)."""
    def definition(w, ws2):
        scale = fm._blocks(w, 16).abs().amax(-1).float() / (6.0 * ws2.float())
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale.clamp(fm.E4M3_MIN_SCALE, fm.E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)

    w = _weights(torch.float32)
    w[9, :16] = 1e-44                               # / (6 * 1e30): underflows to 0 -> scale 1.0
    w[10, :16] = math.nan
    w[11, 16:32] = -math.inf
    for ws2 in (0.02, 1e30, 1e-30, 0.0, math.nan, math.inf, -0.5):
        ws2 = torch.tensor(ws2)
        for x in (w, w.to(torch.bfloat16)):
            assert torch.equal(fm.nvfp4_block_scales(x, ws2).view(torch.uint8), definition(x, ws2)), ws2


def test_e4m3_positive_finite_check_by_codes_is_the_float_check():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    values = codes.float()
    for c in range(256):
        one = codes[c:c + 1]
        assert fm.e4m3_all_positive_finite(one) == bool(values[c].isfinite() and values[c] > 0), c
    good = torch.tensor([1.0, 448.0, 2.0 ** -9]).to(torch.float8_e4m3fn)
    assert fm.e4m3_all_positive_finite(good) and fm.e4m3_all_positive_finite(good[:0])
    assert not fm.e4m3_all_positive_finite(torch.cat([good, codes[0:1]]))


def test_e4m3_table_is_torchs_conversion():
    from omniq.quant.formats import nvfp4

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    mine, theirs = nvfp4._e4m3_float(codes), codes.float()
    assert mine.shape == (16, 16) and torch.equal(mine.isnan(), theirs.isnan())
    assert torch.equal(mine.nan_to_num().view(torch.int32), theirs.nan_to_num().view(torch.int32))   # -0.0 too
    assert torch.equal(nvfp4._e4m3_float(torch.tensor([1.5, 3.0])), torch.tensor([1.5, 3.0]))


def test_export_packs_nvfp4_with_omniq_arithmetic_bit_identically(modelopt, monkeypatch):
    """streamed.omniq_packing: ModelOpt's export step `to_quantized_weight` runs omniq's packing for
    NVFP4 (stacked experts with one global scale each included), with ModelOpt's own result."""
    from modelopt.torch.export import unified_export_hf as ue

    from omniq.export import streamed
    from omniq.quant.formats import nvfp4

    NVFP4QTensor, to_quantized_weight = modelopt
    calls = []
    real_pack = nvfp4.nvfp4_pack
    monkeypatch.setattr(nvfp4, "nvfp4_pack", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    w = _weights(torch.bfloat16)
    stacked = torch.stack([w, w * 3])
    for weight in (w, stacked):
        ws2 = (weight.float().abs().amax(dim=(-2, -1)) / (6 * 448)) if weight.dim() == 3 else \
            fm.nvfp4_global_scale(weight.float().abs().amax())
        ws = NVFP4QTensor.get_weights_scaling_factor(weight, 16, ws2.view(-1, 1, 1) if ws2.dim() else ws2)[0]
        theirs = to_quantized_weight(weight, ws, "nvfp4", ws2, 16)
        with streamed.omniq_packing():
            assert ue.to_quantized_weight is not to_quantized_weight
            mine = ue.to_quantized_weight(weight, ws, "nvfp4", ws2, 16)
        assert torch.equal(mine, theirs)
    assert ue.to_quantized_weight is to_quantized_weight and len(calls) == 2


def test_nvfp4_pack_in_row_chunks_is_the_same_as_at_once():
    w = torch.stack([_weights(torch.bfloat16), _weights(torch.bfloat16) * 5])
    ws2 = w.float().abs().amax(dim=(-2, -1)) / (6 * 448)
    ws = torch.stack([fm.nvfp4_block_scales(w[e], ws2[e]) for e in range(2)])
    whole = nvfp4_pack_at_once(w, ws, ws2)
    for chunk in (1, 128, 1000, 1 << 24):
        assert torch.equal(fm.nvfp4_pack(w, ws, ws2, chunk_elements=chunk), whole)
    one = fm.nvfp4_quantize(w[1], ws2[1])
    assert torch.equal(fm.nvfp4_pack(w[1], one.weight_scale, ws2[1], chunk_elements=300), one.weight)


def nvfp4_pack_at_once(w, ws, ws2):
    from omniq.quant.formats.nvfp4 import _blocks, e2m1_encode, pack_e2m1

    scaled = _blocks(w.float(), 16) / (ws.float() * ws2.reshape(-1, 1, 1) if ws2.dim() else ws.float() * ws2
                                       ).unsqueeze(-1)
    return pack_e2m1(e2m1_encode(scaled.flatten(-2)))


def test_export_fp8_in_chunks_is_modelopts_division(modelopt):
    from modelopt.torch.export import unified_export_hf as ue

    from omniq.export import streamed

    _, to_quantized_weight = modelopt
    w = _weights(torch.bfloat16)
    stacked = torch.stack([w, w * 3, w / 7])
    cases = [(w, w.float().abs().amax() / 448),
             (stacked, (stacked.float().abs().amax(dim=(-2, -1)) / 448).reshape(3, 1)),      # per expert
             (stacked, stacked.float().abs().amax(dim=-1) / 448)]                            # per expert row
    for weight, scale in cases:
        theirs = to_quantized_weight(weight, scale, "fp8")
        with streamed.omniq_packing():
            mine = ue.to_quantized_weight(weight, scale, "fp8")
        assert mine.dtype == torch.float8_e4m3fn and torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(streamed._fp8_in_chunks(w, cases[0][1], chunk_elements=200).view(torch.uint8),
                       to_quantized_weight(w, cases[0][1], "fp8").view(torch.uint8))


def test_the_export_gives_heap_pages_back_every_few_packed_weights(modelopt, monkeypatch):
    """An MoE layer's export packs hundreds of expert matrices; omniq_packing trims the heap every TRIM_EVERY of
    them (their freed temporaries' pages otherwise stay in the process: benchmarks/export_layer_memory.py)."""
    from modelopt.torch.export import unified_export_hf as ue

    from omniq.export import streamed

    trims = []
    monkeypatch.setattr(streamed, "give_back", lambda *a, **k: trims.append(1))
    monkeypatch.setattr(streamed, "TRIM_EVERY", 3)
    w = _weights(torch.bfloat16)
    scale = w.float().abs().amax().reshape(()) / 448
    with streamed.omniq_packing():
        for _ in range(7):
            ue.to_quantized_weight(w, scale, "fp8")
    assert len(trims) == 2


def test_export_nvfp4_block_scales_are_modelopts_and_computed_once(modelopt):
    """omniq_packing's NVFP4QTensor.get_weights_scaling_factor: ModelOpt's scales bit for bit (zero blocks
    included), computed once when the export asks twice for the same weight, and ModelOpt's own function back
    after the context."""
    from omniq.export import streamed
    from omniq.quant.formats import nvfp4

    NVFP4QTensor, _ = modelopt
    theirs_fn = NVFP4QTensor.get_weights_scaling_factor
    w = _weights(torch.bfloat16)
    w[3, :16] = 0                                             # a zero block: scale 1.0 by ModelOpt's rule
    cases = [(w, w.float().abs().amax() / (6 * 448)), (w.float() * 1e-6, torch.tensor(1e-9))]   # tiny: clamped
    calls = []
    real = nvfp4.nvfp4_block_scales
    import unittest.mock as mock
    for weight, ws2 in cases:
        theirs = theirs_fn(weight, 16, ws2)[0]
        with mock.patch.object(nvfp4, "nvfp4_block_scales", lambda *a, **k: calls.append(1) or real(*a, **k)):
            with streamed.omniq_packing():
                mine = NVFP4QTensor.get_weights_scaling_factor(weight, 16, ws2)[0]
                again = NVFP4QTensor.get_weights_scaling_factor(weight, 16, ws2.clone())[0]
                other = NVFP4QTensor.get_weights_scaling_factor(weight * 2, 16, ws2)[0]
        assert mine.dtype == torch.float8_e4m3fn
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
        assert again is mine
        assert torch.equal(other.view(torch.uint8), theirs_fn(weight * 2, 16, ws2)[0].view(torch.uint8))
    assert len(calls) == 4                                    # twice per case: the weight, then weight * 2
    assert NVFP4QTensor.get_weights_scaling_factor == theirs_fn
