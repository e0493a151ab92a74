"""GPTQ error compensation for one linear weight, for NVFP4 (with its block scales) and per-tensor FP8.

Plain tensors in, plain tensors out: `gptq(w, hessian, fmt, ...)` takes the weight [out, in] and the input
Hessian H = X^T X / n [in, in] of the calibration inputs that reached this linear (for a routed expert, its
own routed tokens), and returns `GPTQResult(values, weight_scale)`: `values` [out, in] float32 are the
error-compensated weights at the moment each column was rounded, so packing them with `weight_scale` by the
usual arithmetic (`weight_search.nvfp4_pack`, `formats.fp8_quantize`) reproduces exactly the codes GPTQ
chose; `dequantized` is what the engines will compute with.

Algorithm (Frantar et al. 2022, the reference implementation's lazy batch updates): H += damping * mean(diag H)
* I (dead input channels get diag 1), U = upper Cholesky factor of H^-1 (`_inverse_cholesky`); columns are
rounded in order and each column's error, divided by U[i, i], is pushed onto the columns not yet rounded
through U[i, i:]: within a 16-column group directly, column by column; onto the rest of its block of
`block_size` columns once per group, and onto later blocks once per block, each as one matrix product (the
same sums in another order: the per-column updates across the whole block were most of the loop's time at
the real width). The loop works on the weight transposed, [in, out], so a column and a group are contiguous
rows. NVFP4 block scales are chosen when a 16-column group is reached, from the compensated weights of that
group (max: amax/6 code, or the `mse` search of `weight_search`), so the scales see the updates; FP8 uses
one per-tensor scale chosen before the loop. `block_size` must be a multiple of 16 for NVFP4. Where the time
goes at the real width, before and after: benchmarks/gptq_expert_profile.py.

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


def _lower_inverse(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]],
    the corner as two matrix products (the n^3 / 3 multiply-adds of a triangular inverse at the matmul's rate,
    where a triangular solve against the identity does n^3), `leaf`-sized diagonal blocks by a triangular solve."""
    n = lower.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = -(-n // 2 // leaf) * leaf if n > 2 * leaf else leaf
    out = lower.new_zeros(lower.shape)
    a_inv = _lower_inverse(lower[:k, :k], leaf)
    d_inv = _lower_inverse(lower[k:, k:], leaf)
    out[k:, :k] = d_inv @ (lower[k:, :k] @ a_inv)
    out[k:, :k].neg_()
    out[:k, :k], out[k:, k:] = a_inv, d_inv
    return out


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, float32, batched over leading dims one
    matrix at a time: the float64 work (about 5 x 8 x in^2 bytes) is one matrix's (0.29 GB at 2,688 inputs,
    where 16 routed experts at once took 4.6 GB), and a matrix that needs more damping gets it alone.

    With J the reversal of the index order (J^2 = I) and J H J = L L^T (lower Cholesky), H^-1 = J L^-T L^-1 J
    = U^T U with U = J L^-1 J, which is upper triangular with a positive diagonal: the factor itself (a
    Cholesky factor is unique), from one Cholesky and one triangular inverse (`_lower_inverse`) instead of a
    Cholesky, the inverse from it and a second Cholesky of that inverse. The Cholesky is float64, the
    triangular inverse float32 (of the float64 factor rounded to float32): at 2,688 inputs and 100 tokens it
    moves U by 1.5e-6 of its largest entry, where the float32 statistics themselves (X^T X summed in another
    order) move it by 2.6e-5, and changes 7e-5 of the GPTQ weights against their 3e-3; a float32 Cholesky
    would move U by 1.9e-4 (benchmarks/gptq_precision.py)."""
    if hessian.dim() > 2:
        flat = hessian.reshape(-1, *hessian.shape[-2:])
        out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        for k in range(flat.shape[0]):
            out[k] = _inverse_cholesky(flat[k], damping)
        return out.reshape(hessian.shape)
    h, mean, _ = _with_dead_channels(hessian)
    h = h.flip(-2, -1)                           # J H J (its diagonal is H's, reversed)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    base = diag.clone()
    for extra in (0.0, 0.1, 1.0, 10.0):          # more damping only if the factorisation fails
        diag.copy_(base + (damping + extra) * mean)
        lower, info = torch.linalg.cholesky_ex(h)
        if bool((info == 0).all()):
            del h
            return _lower_inverse(lower.float()).flip(-2, -1)
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
    Batched over leading dims like `gptq`; float64 inside (float32 products or solves here would move W* by 4e-5
    to 6e-5 of its largest entry, above the 1e-5 of the float32 statistics' own rounding:
    benchmarks/gptq_precision.py), float32 out; the solve by Cholesky (half an LU's work, the same W* to 1e-8)."""
    h, mean, eye = _with_dead_channels(hessian_q)
    c = cross.double().clone()
    dead = torch.diagonal(hessian_q, dim1=-2, dim2=-1) == 0
    torch.diagonal(c, dim1=-2, dim2=-1)[dead] = 1.0        # a channel no row uses keeps its weight (W* = W)
    mu = (damping * mean).unsqueeze(-1) * eye
    rhs = (w.double() @ (c + mu)).transpose(-1, -2)        # (W (C + mu))^T [.., in, out]
    shifted = h + mu
    lower, info = torch.linalg.cholesky_ex(shifted)        # Hq + mu is positive definite (mu > 0) ...
    if bool((info == 0).all()):                            # symmetric: W* = ((Hq + mu)^-1 rhs)^T
        return torch.cholesky_solve(rhs, lower).transpose(-1, -2).float()
    return torch.linalg.solve(shifted, rhs).transpose(-1, -2).float()   # ... unless rounding says otherwise


def _group_codes(gt: torch.Tensor, ws2: torch.Tensor, scales: str) -> torch.Tensor:
    """E4M3 scale codes [B, out] for one 16-column group given transposed, gt [B, 16, out] (ws2 [B, 1, 1]): the
    max code (`formats.nvfp4_block_scales`) or, for `mse`, the candidates of `weight_search`'s sweep (the
    `WINDOW` of codes around it, the first of equal errors kept) by the squared error of the dequantized group,
    as `weight_search._best_codes` chooses them in the [.., 16] layout (the same float32 operations but the
    sum of the 16 squared errors, taken along rows here)."""
    base = formats.nvfp4_block_scales(gt.transpose(-1, -2), ws2)[..., 0]         # [B, out]
    if scales == "max":
        return base
    lo, hi = weight_search.WINDOW
    best, best_err = base.view(torch.uint8), None
    for k in (0, *(k for k in range(lo, hi + 1) if k != 0)):
        codes = base if k == 0 else weight_search._code_offsets(base, k)
        scale = (codes.float() * ws2[..., 0]).unsqueeze(-2)                         # [B, 1, out]
        err = (gt - formats.e2m1_round(gt / scale) * scale).square_().sum(-2)        # [B, out]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, codes.view(torch.uint8), best)
        best_err = torch.where(better, err, best_err)
    return best.view(torch.float8_e4m3fn)


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
    W = w.detach().float()              # read only: the loop works on its own transposed copy
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
    # the weight transposed, [B, in, out]: a column is a contiguous row, a group 16 contiguous rows
    Wt = W.transpose(-1, -2).clone(memory_format=torch.contiguous_format)
    values = torch.empty_like(Wt)
    scale = None
    for b1 in range(0, in_f, block_size):
        b2 = min(b1 + block_size, in_f)
        E = torch.empty(B, b2 - b1, out_f, dtype=Wt.dtype, device=Wt.device)   # the block's scaled errors
        for g1 in range(b1, b2, group):
            g2 = min(g1 + group, b2)
            if g1 > b1:                   # the errors of the block's earlier groups, at once
                Wt[:, g1:g2] -= U[:, b1:g1, g1:g2].transpose(-1, -2) @ E[:, :g1 - b1]
            if fmt == "nvfp4":
                codes = _group_codes(Wt[:, g1:g2], ws2, scales)
                block_codes[:, :, g1 // group] = codes
                scale = codes.float() * ws2[..., 0]                  # [B, out]
            for col in range(g1, g2):
                w_col = Wt[:, col]
                if fmt == "nvfp4":
                    q = formats.e2m1_round(w_col / scale) * scale
                else:
                    q = formats.fp8_dequantize(formats.cast_e4m3(w_col / fp8), fp8)
                values[:, col] = w_col
                err = (w_col - q) / U[:, col, col].unsqueeze(-1)
                E[:, col - b1] = err
                if col + 1 < g2:          # within the group, column by column
                    Wt[:, col + 1:g2] -= U[:, col, col + 1:g2].unsqueeze(-1) * err.unsqueeze(1)
        if b2 < in_f:                     # later blocks: the whole block's errors in one product
            Wt[:, b2:] -= U[:, b1:b2, b2:].transpose(-1, -2) @ E
    del Wt, U
    values = values.transpose(-1, -2).contiguous()
    if fmt == "nvfp4":
        res = GPTQResult(values, block_codes, ws2.reshape(B))
    else:
        res = GPTQResult(values, fp8.reshape(B))
    if single:
        res = GPTQResult(res.values[0], res.weight_scale[0],
                         None if res.weight_scale_2 is None else res.weight_scale_2[0])
    return res
