"""GPTQ error compensation for one linear weight, for NVFP4 (with its block scales) and per-tensor FP8.

Plain tensors in, plain tensors out: `gptq(w, hessian, fmt, ...)` takes the weight [out, in] and the input
Hessian H = X^T X / n [in, in] of the calibration inputs that reached this linear (for a routed expert, its
own routed tokens), and returns `GPTQResult(values, weight_scale)`: `values` [out, in] float32 are the
error-compensated weights at the moment each column was rounded, so packing them with `weight_scale` by the
usual arithmetic (`weight_search.nvfp4_pack`, `formats.fp8_quantize`) reproduces exactly the codes GPTQ
chose; `dequantized` is what the engines will compute with.

Algorithm (Frantar et al. 2022, the reference implementation's lazy batch updates): H += damping * mean(diag H)
* I (dead input channels get diag 1), U = upper Cholesky factor of H^-1; columns are rounded in order and
each column's error, divided by U[i, i], is pushed onto the columns not yet rounded through U[i, i:];
within a block of `block_size` columns directly, onto later blocks once per block. NVFP4 block scales are
chosen when a 16-column group is reached, from the compensated weights of that group (max: amax/6 code, or
the `mse` search of `weight_search`), so the scales see the updates; FP8 uses one per-tensor scale chosen
before the loop. `block_size` must be a multiple of 16 for NVFP4.

ModelOpt has its own GPTQ (`mtq` algorithm `gptq`, `GPTQCalibConfig`: perc_damp 0.01, block_size 128, the same
defaults as here), run through its quantizer-wrapped model and, fused, as a CUDA Triton kernel; omniq's runs
on CPU on one layer's tensors at a time. A comparison of the two needs a GPU session (untested here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniq.quant import formats, weight_search

DAMPING = 0.01
BLOCK_SIZE = 128
TARGET_DAMPING = 0.1      # gptaq's ridge towards the source weight (`asymmetric_target`)


@dataclass
class GPTQResult:
    values: torch.Tensor          # [..., out, in] float32: pack these with weight_scale
    weight_scale: torch.Tensor    # NVFP4: float8_e4m3fn [..., out, in/16]; FP8: fp32 [...] (a scalar per weight)
    weight_scale_2: torch.Tensor | None = None   # NVFP4 global scale(s) [...] (as given)

    def dequantized(self) -> torch.Tensor:
        if self.weight_scale_2 is not None:
            scale = (self.weight_scale.float() * self.weight_scale_2.reshape(*self.weight_scale_2.shape, 1, 1))
            vb = weight_search._blocks(self.values)
            return (formats.e2m1_round(vb / scale.unsqueeze(-1)) * scale.unsqueeze(-1)).flatten(-2)
        s = self.weight_scale.reshape(*self.weight_scale.shape, 1, 1)
        return formats.fp8_dequantize(formats.cast_e4m3(self.values / s), s)


def _with_dead_channels(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 copy of H with diag 1 for dead input channels, its mean diagonal [..., 1] and the identity."""
    h = hessian.double().clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0                        # dead input channels
    return h, diag.mean(-1, keepdim=True), torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, float32, batched over leading dims one
    matrix at a time: the float64 work (about 5 x 8 x in^2 bytes) is one matrix's (0.29 GB at 2,688 inputs,
    where 16 routed experts at once took 4.6 GB), and a matrix that needs more damping gets it alone."""
    if hessian.dim() > 2:
        flat = hessian.reshape(-1, *hessian.shape[-2:])
        out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        for k in range(flat.shape[0]):
            out[k] = _inverse_cholesky(flat[k], damping)
        return out.reshape(hessian.shape)
    h, mean, eye = _with_dead_channels(hessian)
    for extra in (0.0, 0.1, 1.0, 10.0):          # more damping only if the factorisation fails
        hd = h + ((damping + extra) * mean).unsqueeze(-1) * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if bool((info == 0).all()):
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float()
    raise RuntimeError("GPTQ: the input Hessian is not positive definite even with heavy damping")


def asymmetric_target(w: torch.Tensor, hessian_q: torch.Tensor, cross: torch.Tensor,
                      damping: float = TARGET_DAMPING) -> torch.Tensor:
    """The weight GPTQ should aim at when the layer's inputs will be quantized (`gptaq`).

    With X the calibration inputs [n, in] as they reach the linear and Xq = Q(X) as the engine quantizes them
    (the layer's own input quantizer and input_scale), the goal is min ||X W^T - Xq Wq^T||. Its unconstrained
    minimiser is W C Hq^-1 with C = X^T Xq / n (`cross`) and Hq = Xq^T Xq / n (`hessian_q`); the residual is
    orthogonal to Xq's columns, so ||X W^T - Xq Wq^T||^2 = const + ||Xq (W* - Wq)^T||^2, which is plain GPTQ
    of W* under Hq. (GPTAQ, Li et al. 2025, folds the same cross term into GPTQ's column loop; solving for W*
    first is the same objective in one linear solve.) Unregularised, W* overfits the calibration rows: input
    directions the rows barely use get their weights shrunk towards zero (on tiny, 30 % relative change for a
    shared expert from 4,096 tokens), so the target is pulled towards W by a ridge term mu ||W* - W||^2 with
    mu = `damping` x mean(diag Hq): W* = W (C + mu I) (Hq + mu I)^-1, W itself as `damping` grows.
    Batched over leading dims like `gptq`; float64 inside, float32 out."""
    h, mean, eye = _with_dead_channels(hessian_q)
    c = cross.double().clone()
    dead = torch.diagonal(hessian_q, dim1=-2, dim2=-1) == 0
    torch.diagonal(c, dim1=-2, dim2=-1)[dead] = 1.0        # a channel no row uses keeps its weight (W* = W)
    mu = (damping * mean).unsqueeze(-1) * eye
    rhs = (w.double() @ (c + mu)).transpose(-1, -2)        # (W (C + mu))^T [.., in, out]
    return torch.linalg.solve(h + mu, rhs).transpose(-1, -2).float()   # symmetric: W* = ((Hq + mu)^-1 rhs)^T


def _group_codes(g: torch.Tensor, ws2: torch.Tensor, scales: str) -> torch.Tensor:
    """E4M3 scale codes [B, out, 1] for one 16-column group g [B, out, 16] (ws2 [B, 1, 1])."""
    base = formats.nvfp4_block_scales(g, ws2)
    if scales == "max":
        return base
    lo, hi = weight_search.WINDOW
    cands = [base] + [weight_search._code_offsets(base, k) for k in range(lo, hi + 1) if k != 0]
    return weight_search._best_codes(g.unsqueeze(-2), cands, ws2, None)


def act_order_permutation(hessian: torch.Tensor, fmt: str) -> torch.Tensor:
    """GPTQ's act-order: the input columns by descending diag(H) (the channels with the largest input energy
    rounded first, while the most columns are left to absorb their error), [..., in] indices, a stable sort
    (equal diagonals keep their order). NVFP4: whole 16-column groups, by their summed diagonal, and the
    columns inside each group by theirs, so every block scale still belongs to one original 16-column group
    of the exported layout (engines load one E4M3 scale per 16 consecutive input columns and have no column
    permutation (no `g_idx`) for NVFP4, so per-column act-order across groups would not be loadable)."""
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1).float()
    if fmt != "nvfp4":
        return torch.sort(diag, dim=-1, descending=True, stable=True).indices
    group = formats.NVFP4_BLOCK
    if diag.shape[-1] % group:
        raise ValueError(f"NVFP4 GPTQ needs in_features divisible by {group}, not {diag.shape[-1]}")
    g = diag.reshape(*diag.shape[:-1], -1, group)
    order = torch.sort(g.sum(-1), dim=-1, descending=True, stable=True).indices            # [..., in/16]
    inner = torch.sort(g, dim=-1, descending=True, stable=True).indices                    # [..., in/16, 16]
    inner = inner.gather(-2, order.unsqueeze(-1).expand(*order.shape, group))
    return (order.unsqueeze(-1) * group + inner).flatten(-2)


def gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: str, *, weight_scale_2: torch.Tensor | None = None,
         damping: float = DAMPING, block_size: int = BLOCK_SIZE, scales: str = "mse",
         act_order: bool = False) -> GPTQResult:
    """GPTQ-quantize `w` [out, in] (or a stack [B, out, in] of same-shaped weights, e.g. one projection of
    every routed expert of a layer, with hessians [B, in, in] and weight_scale_2 [B]) for `fmt` (nvfp4 |
    fp8). `scales`: how an NVFP4 group's block scales (or FP8's tensor scale) are chosen from the
    compensated weights: `mse` (the `weight_search` sweep) or `max`. `act_order`: columns rounded in
    `act_order_permutation`'s order (each weight its own), the results permuted back to the layout's."""
    if act_order:
        perm = act_order_permutation(hessian, fmt)
        single = w.dim() == 2
        p = perm.unsqueeze(0) if single else perm
        W = w.detach().float().unsqueeze(0) if single else w.detach().float()
        H = hessian.unsqueeze(0) if single else hessian
        rows = p.unsqueeze(-1).expand(*p.shape, H.shape[-1])
        Hp = H.gather(-2, rows).gather(-1, p.unsqueeze(-2).expand(*p.shape[:-1], p.shape[-1], p.shape[-1]))
        Wp = W.gather(-1, p.unsqueeze(-2).expand_as(W))
        r = gptq(Wp, Hp, fmt, weight_scale_2=weight_scale_2, damping=damping, block_size=block_size,
                 scales=scales)
        del Wp, Hp
        values = torch.empty_like(r.values).scatter_(-1, p.unsqueeze(-2).expand_as(r.values), r.values)
        ws = r.weight_scale
        if fmt == "nvfp4":           # block codes: permuted group k is original group p[..., 16 k] / 16
            gp = p[..., ::formats.NVFP4_BLOCK] // formats.NVFP4_BLOCK
            ws = torch.empty_like(ws.view(torch.uint8)).scatter_(
                -1, gp.unsqueeze(-2).expand(ws.shape), ws.view(torch.uint8)).view(torch.float8_e4m3fn)
        res = GPTQResult(values, ws, r.weight_scale_2)
        if single:
            res = GPTQResult(values[0], ws[0], None if r.weight_scale_2 is None else r.weight_scale_2[0])
        return res
    single = w.dim() == 2
    W = w.detach().float().clone()
    H = hessian
    if single:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    B, out_f, in_f = W.shape
    group = formats.NVFP4_BLOCK
    if fmt == "nvfp4":
        if block_size % group:
            raise ValueError(f"GPTQ block_size {block_size} must be a multiple of the NVFP4 group {group}")
        if in_f % group:
            raise ValueError(f"NVFP4 GPTQ needs in_features divisible by {group}, not {in_f}")
        if weight_scale_2 is None:
            weight_scale_2 = formats.nvfp4_global_scale(1.0) * W.abs().amax(dim=(-2, -1))
        ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32).reshape(B, 1, 1)
        block_codes = torch.empty(B, out_f, in_f // group, dtype=torch.float8_e4m3fn, device=W.device)
    elif fmt == "fp8":
        fp8 = torch.stack([weight_search.fp8_search_scale(W[b], scales) for b in range(B)]).reshape(B, 1)
    else:
        raise ValueError(f"GPTQ for format {fmt!r}: expected nvfp4 or fp8")
    U = _inverse_cholesky(H, damping)
    values = torch.empty_like(W)
    scale = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w_col = W1[:, :, i]
            if fmt == "nvfp4":
                if col % group == 0:
                    codes = _group_codes(W1[:, :, i:i + group], ws2, scales)
                    block_codes[:, :, col // group] = codes[..., 0]
                    scale = codes[..., 0].float() * ws2[..., 0]          # [B, out]
                q = formats.e2m1_round(w_col / scale) * scale
            else:
                q = formats.fp8_dequantize(formats.cast_e4m3(w_col / fp8), fp8)
            values[:, :, col] = w_col
            err = (w_col - q) / U1[:, i, i].unsqueeze(-1)
            W1[:, :, i:] -= err.unsqueeze(-1) * U1[:, i, i:].unsqueeze(1)
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    if fmt == "nvfp4":
        res = GPTQResult(values, block_codes, ws2.reshape(B))
    else:
        res = GPTQResult(values, fp8.reshape(B))
    if single:
        res = GPTQResult(res.values[0], res.weight_scale[0],
                         None if res.weight_scale_2 is None else res.weight_scale_2[0])
    return res
