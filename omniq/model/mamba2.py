"""A numerically right Mamba-2 (SSD) scan in plain torch (CPU or CUDA), at any sequence length.

transformers' CPU fallback (`NemotronHMamba2Mixer.torch_forward`) carries the state between chunks over
the wrong axis, so it is wrong past `chunk_size` (reference notes: transformers issue #47246), and it
materialises 6-D temporaries. This module computes the same state-space duality with two-operand einsums
and a plain loop over chunks for the inter-chunk recurrence; `ssd_recurrent` is the token-by-token
definition the tests check it against.

Shapes: x (b, L, h, p), dt (b, L, h) already discretised (softplus + bias, limited), A (h,) negative,
B and C (b, L, g, n) with h divisible by g, D (h,). Every tensor made here is made on the inputs' device
(tests/model/test_devices.py runs the scan on the `meta` device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, L, g, n) -> (b, L, h, n) by repeating each group for its heads."""
    g = t.shape[2]
    return t.repeat_interleave(num_heads // g, dim=2) if g != num_heads else t


def ssd_recurrent(x, dt, A, B, C, D, initial_state=None):
    """Token-by-token reference: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    b, L, h, p = x.shape
    Bh, Ch = _heads(B, h).float(), _heads(C, h).float()
    x, dt = x.float(), dt.float()
    state = x.new_zeros(b, h, p, Bh.shape[-1]) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)                                    # (b, h)
        state = state * decay[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), state


def ssd_chunked(x, dt, A, B, C, D, chunk_size: int, initial_state=None):
    """Chunked SSD, exact up to float rounding. Returns (y (b, L, h, p) float32, final state (b, h, p, n))."""
    b, L, h, p = x.shape
    Q = chunk_size
    pad = (-L) % Q
    x, dt = x.float(), dt.float()
    Bh, Ch = _heads(B, h).float(), _heads(C, h).float()
    n = Bh.shape[-1]
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))          # dt 0 on padding: no decay, no input
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    c = (L + pad) // Q
    x = x.view(b, c, Q, h, p)
    dt = dt.view(b, c, Q, h)
    Bh = Bh.view(b, c, Q, h, n)
    Ch = Ch.view(b, c, Q, h, n)

    dA = dt * A.float()                          # (b, c, Q, h)
    cs = torch.cumsum(dA, dim=2)                 # running log-decay inside each chunk
    xdt = x * dt[..., None]

    # Intra-chunk (diagonal blocks): y_i = sum_{j<=i} C_i.B_j exp(cs_i - cs_j) dt_j x_j
    cs_h = cs.permute(0, 1, 3, 2)                # (b, c, h, Q)
    diff = cs_h[..., :, None] - cs_h[..., None, :]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))           # (b, c, h, Q, Q)
    scores = torch.einsum("bcihn,bcjhn->bchij", Ch, Bh) * decay
    y = torch.einsum("bchij,bcjhp->bcihp", scores, xdt)

    # State contributed by each chunk, taken to the chunk's end.
    to_end = torch.exp(cs[:, :, -1:, :] - cs)                             # (b, c, Q, h)
    chunk_states = torch.einsum("bcjhn,bcjhp->bchpn", Bh * to_end[..., None], xdt)

    # Inter-chunk recurrence over chunks (sequential and exact), then the off-diagonal contribution.
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(cs[:, :, -1, :])                               # (b, c, h)
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * chunk_decay[:, k, :, None, None] + chunk_states[:, k]
    entering = torch.stack(entering, dim=1)                                # (b, c, h, p, n)
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ch, entering) * torch.exp(cs)[..., None]

    y = y.reshape(b, c * Q, h, p)[:, :L] + D.float()[:, None] * x.reshape(b, c * Q, h, p)[:, :L]
    return y, state


def causal_depthwise_conv(x, weight, bias):
    """x (b, L, d), weight (d, 1, k), bias (d,) or None -> (b, L, d): causal depthwise conv1d."""
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight.to(x.dtype),
                   None if bias is None else bias.to(x.dtype), groups=x.shape[-1])
    return out.transpose(1, 2)


def gated_rms_norm(y, gate, weight, group_size: int, eps: float):
    """NemotronH's gated RMSNorm: y * silu(gate), normalised per group of `group_size`, times weight."""
    y = y.float() * F.silu(gate.float())
    shape = y.shape
    y = y.view(*shape[:-1], shape[-1] // group_size, group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * y.view(shape)


def mixer_scan(zxbcdt: torch.Tensor, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, *,
               num_heads: int, head_dim: int, n_groups: int, state_size: int, chunk_size: int,
               eps: float, dt_limit=(0.0, float("inf")), recurrent: bool = False) -> torch.Tensor:
    """Everything of a Mamba-2 mixer between `in_proj` and `out_proj` (no cache), in float32.

    zxbcdt: in_proj output (b, L, inner + conv_dim + heads) -> gated, normalised scan output (b, L, inner).
    """
    b, L, _ = zxbcdt.shape
    inner = num_heads * head_dim
    gn = n_groups * state_size
    conv_dim = inner + 2 * gn
    extra = zxbcdt.shape[-1] - inner - conv_dim - num_heads
    if extra:  # some NemotronH variants carry a (zero-width here) gated-MLP slice at the front
        zxbcdt = zxbcdt[..., extra:]
    z, xBC, dt = zxbcdt.float().split([inner, conv_dim, num_heads], dim=-1)
    xBC = F.silu(causal_depthwise_conv(xBC, conv_weight.float(), None if conv_bias is None else conv_bias.float()))
    xs, B, C = xBC.split([inner, gn, gn], dim=-1)
    dt = F.softplus(dt + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    A = -torch.exp(A_log.float())
    args = (xs.view(b, L, num_heads, head_dim), dt, A, B.view(b, L, n_groups, state_size),
            C.view(b, L, n_groups, state_size), D.float())
    y, _ = ssd_recurrent(*args) if recurrent else ssd_chunked(*args, chunk_size=chunk_size)
    return gated_rms_norm(y.reshape(b, L, inner), z, norm_weight, inner // n_groups, eps)
