"""Weight-scale search for NVFP4 block scales and FP8 per-tensor scales: `mse`, `local-hessian`, `four-over-six`.

Plain tensors in, scales out; no model, no ModelOpt. The packing of the result is the one of
`omniq.quant.formats` (bit-compatible with ModelOpt's export): `nvfp4_pack(w, weight_scale, weight_scale_2)`
with `weight_scale = nvfp4_block_scales(w, weight_scale_2)` gives exactly `formats.nvfp4_quantize(w,
weight_scale_2)`; the search only chooses other FP8 E4M3 block-scale codes.

NVFP4 (per 16-element block of a row)
    max            code = e4m3(block_amax / (6 * weight_scale_2)): ModelOpt's max calibration, today's export.
    mse            among the E4M3 codes near that one (`WINDOW`: from 8 codes below to 6 above, a factor of
                   about 1/2 to 1.7 of the scale: the scale that maps the block's amax to 4 instead of 6 is
                   inside), keep the one whose dequantized block has the lowest squared error against the
                   weight. ModelOpt's `nvfp4_w4a4_weight_mse_fp8_sweep` (CUDA Triton kernel
                   `nvfp4_fp8_scale_sweep`) tries all 126 positive E4M3 codes; the window keeps the CPU cost
                   at 15 trials per block (codes far below clip most of the block, codes far above leave it
                   one or two E2M1 steps).
    local-hessian  the same search with the error weighted by the calibration inputs: per 16-block of input
                   channels, err = dw^T H_b dw with H_b the block's 16 x 16 slice of X^T X / n (ModelOpt's
                   `nvfp4_w4a4_weight_local_hessian`, `nvfp4_fp8_scale_sweep_hessian`, uses the same local
                   Hessian). A diagonal-only weighting is the special case of a per-channel second moment.
    four-over-six  per block, the scale that maps the block's amax to 6 (max) or to 4, whichever gives the
                   lower squared error (Cook et al. 2025, ModelOpt's `four_over_six` block option). The output
                   is ordinary NVFP4: E2M1 codes, E4M3 block scales, fp32 global scale; nothing in the
                   engines' NVFP4 dequantization assumes a block's largest value is coded 6.

FP8 (per tensor)
    mse / local-hessian: the scale amax/448 * f for f in `FP8_FACTORS` (0.5 .. 1) with the lowest (per-input-
    channel second moment weighted) squared error. An FP8 attention q / k / v trio is re-rounded by the
    engines to the largest of their three scales (see `omniq.validate.artifact._fuse_qkv_fp8`), which undoes
    a smaller searched scale there; validate measures what the engines do.

Why omniq's own code: ModelOpt's searches run as CUDA/Triton kernels (`modelopt.torch.kernels.quantization`)
and its CPU fallback needs the model wrapped in quantizers; omniq's quantize must run on CPU and, streamed,
one layer's tensors at a time. A GPU check comparing the two is for a GPU session (untested here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omniq.quant import formats

WINDOW = (-8, 6)                   # E4M3 code offsets tried around the max code, inclusive
FP8_FACTORS = tuple(0.5 + 0.02 * k for k in range(26))          # 0.50 .. 1.00
ROW_CHUNK = 2048                   # rows searched at once (memory: rows x in x candidates is never built)


def _blocks(x: torch.Tensor, block: int = formats.NVFP4_BLOCK) -> torch.Tensor:
    pad = (-x.shape[-1]) % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block)


def nvfp4_block_values(wb: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Blocks [..., nb, 16] (float32) quantized with given E4M3 block scales -> their dequantized values, by
    the same float32 operations as `nvfp4_pack` (so the error measured is the error exported)."""
    scale = (weight_scale.float() * torch.as_tensor(weight_scale_2, dtype=torch.float32)).unsqueeze(-1)
    return formats.e2m1_round(wb / scale) * scale


def nvfp4_pack(w: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> formats.NVFP4Weight:
    """NVFP4 weight with chosen block scales: E2M1 codes of w / (scale * weight_scale_2), packed as ModelOpt
    packs them (`formats.nvfp4_quantize` is this with the max block scales)."""
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(())
    weight_scale = weight_scale.to(torch.float8_e4m3fn)
    return formats.NVFP4Weight(formats.nvfp4_pack(w, weight_scale, ws2), weight_scale, ws2)


def _code_offsets(base: torch.Tensor, offset: int) -> torch.Tensor:
    """E4M3 codes `offset` steps from `base` (positive codes 1..126 are ordered like their values)."""
    u = base.view(torch.uint8).to(torch.int16) + offset
    return u.clamp(1, 126).to(torch.uint8).view(torch.float8_e4m3fn)


def _block_error(wb, deq, hessian):
    d = wb - deq
    if hessian is None:
        return d.square().sum(-1)
    # d: [rows, nb, 16]; hessian: [nb, 16, 16] -> d_b^T H_b d_b per block
    return torch.einsum("rbi,bij,rbj->rb", d, hessian, d)


def _best_codes(wb, candidates, ws2, hessian):
    """Among candidate code tensors (first = the default), the per-block code with the lowest error."""
    best = candidates[0]
    best_err = _block_error(wb, nvfp4_block_values(wb, best, ws2), hessian)
    for codes in candidates[1:]:
        err = _block_error(wb, nvfp4_block_values(wb, codes, ws2), hessian)
        better = err < best_err
        best = torch.where(better, codes.view(torch.uint8), best.view(torch.uint8)).view(torch.float8_e4m3fn)
        best_err = torch.where(better, err, best_err)
    return best


def nvfp4_search_scales(w: torch.Tensor, weight_scale_2: torch.Tensor, method: str = "mse",
                        hessian: torch.Tensor | None = None, window: tuple[int, int] = WINDOW) -> torch.Tensor:
    """Per-block E4M3 scales (float8_e4m3fn [out, in/16]) chosen by `method`: max | mse | local-hessian |
    four-over-six. `hessian` (local-hessian): the block-local input Hessians [in/16, 16, 16] (X^T X / n
    restricted to each 16-block of input channels; `block_hessians`)."""
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(())
    base = formats.nvfp4_block_scales(w, ws2)
    if method == "max":
        return base
    if method == "local-hessian":
        if hessian is None:
            raise ValueError("local-hessian needs the block-local input Hessians")
        hessian = hessian.float()
    elif method in ("mse", "four-over-six"):
        hessian = None
    else:
        raise ValueError(f"unknown weight-scale method {method!r}")
    wf = w.detach().float()
    out = torch.empty_like(base)
    for r0 in range(0, wf.shape[0], ROW_CHUNK):
        wb = _blocks(wf[r0:r0 + ROW_CHUNK])
        b = base[r0:r0 + ROW_CHUNK]
        if method == "four-over-six":
            amax = wb.abs().amax(-1)
            to4 = (amax / (4.0 * ws2)).clamp(formats.E4M3_MIN_SCALE, formats.E4M3_MAX).to(torch.float8_e4m3fn)
            to4 = torch.where(amax == 0, b.view(torch.uint8), to4.view(torch.uint8)).view(torch.float8_e4m3fn)
            candidates = [b, to4]
        else:
            lo, hi = window
            candidates = [b] + [_code_offsets(b, k) for k in range(lo, hi + 1) if k != 0]
        out[r0:r0 + ROW_CHUNK] = _best_codes(wb, candidates, ws2, hessian)
    return out


def nvfp4_weight(w: torch.Tensor, weight_scale_2: torch.Tensor, method: str = "mse",
                 hessian: torch.Tensor | None = None) -> formats.NVFP4Weight:
    """Search the block scales, then pack."""
    return nvfp4_pack(w, nvfp4_search_scales(w, weight_scale_2, method, hessian), weight_scale_2)


def fp8_search_scale(w: torch.Tensor, method: str = "mse", channel_moment: torch.Tensor | None = None,
                     factors: tuple[float, ...] = FP8_FACTORS) -> torch.Tensor:
    """Per-tensor FP8 weight scale (fp32 scalar): amax/448 (max) or the best of amax/448 * f (mse; local-hessian
    weights each input channel's squared error by its second moment `channel_moment` [in])."""
    wf = w.detach().float()
    base = formats.fp8_scale(wf.abs().amax())
    if method == "max" or float(base) == 0.0:
        return base
    if method not in ("mse", "local-hessian"):
        raise ValueError(f"unknown FP8 weight-scale method {method!r}")
    weight = None
    if method == "local-hessian":
        if channel_moment is None:
            raise ValueError("local-hessian needs the input channels' second moments")
        weight = channel_moment.float()
    best, best_err = base, None
    for f in sorted(factors, reverse=True):          # 1.0 (= max) first: ties keep the larger scale
        s = (base * f).reshape(())
        d = wf - formats.fp8_dequantize(formats.cast_e4m3(wf / s), s)
        err = float((d.square() * weight).sum()) if weight is not None else float(d.square().sum())
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def block_hessians(hessian: torch.Tensor, block: int = formats.NVFP4_BLOCK) -> torch.Tensor:
    """Full input Hessian [in, in] -> its block-diagonal 16 x 16 slices [in/16, 16, 16]."""
    n = hessian.shape[0]
    nb = n // block
    h = hessian[: nb * block, : nb * block].reshape(nb, block, nb, block)
    return h.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
