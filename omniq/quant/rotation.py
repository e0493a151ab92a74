"""Residual-stream rotation of a NemotronH checkpoint (QuaRot / SpinQuant's fused rotation), float-exact.

With h' = h Q (Q orthogonal, hidden x hidden) for every residual-stream state, the model computes the same
function when
- every RMSNorm on the residual stream (each layer's pre-mixer norm, the final norm) has its weight folded
  into the linears that read it and becomes ones (RMS is invariant under Q: norm(h Q) = norm(h) Q);
- every reader of a normed state (Mamba in_proj, q/k/v, routed and shared experts' up, dense MLP up, the
  router gate, lm_head) becomes W diag(w) Q;
- every writer to the residual stream (Mamba out_proj, o_proj, experts' down, dense MLP down) becomes Q^T W
  (its bias b Q); the embedding E Q.
Nothing else changes (Mamba's gated norm, conv1d, D, ...; the router's correction bias), and no tensor
changes name, shape or dtype, so the NVFP4 artifact quantized from the rotated checkpoint is an ordinary
one that the engines load as any other: no online rotation. What it changes is what NVFP4 quantizes: the
inputs of the residual readers (in_proj above all) are rotated, spreading channel outliers over all blocks.
The inputs of out_proj (the gated norm's output, inside the mixer) are not rotated: that would need an
online rotation the engines do not run. Q is a randomized Hadamard matrix (random signs, QuaRot's choice)
when hidden is a power of two, else a random orthogonal matrix (QR of a Gaussian). The rotated weights are
rounded back to the checkpoint's dtype (BF16): that rounding is the only float difference.

ModelOpt has no such rotation for NemotronH (its QuaRot-like `rotate` plugins target Llama-style blocks),
hence omniq's own; it needs no calibration data.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from omniq.model.arch import Arch

READERS = ("mamba_in", "attn_q", "attn_k", "attn_v", "expert_up", "shared_up", "mlp_up", "lm_head")
WRITERS = ("mamba_out", "attn_o", "expert_down", "shared_down", "mlp_down")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), float64, unnormalised."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """The rotation Q (n x n, float64, orthogonal): randomized Hadamard for a power of two, else QR."""
    g = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return (signs[:, None] * hadamard(n)) / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def roles(arch: Arch) -> dict[str, tuple[str, str | None]]:
    """Tensor name -> (reader | writer | embedding | norm, the norm weight a reader folds in)."""
    out: dict[str, tuple[str, str | None]] = {arch.embedding_weight: ("embedding", None)}
    for lin in arch.linears:
        if lin.role in READERS:
            norm = arch.norm_f if lin.layer is None else f"{arch.layer_prefix(lin.layer)}.norm.weight"
            out[f"{lin.name}.weight"] = ("reader", norm)
        elif lin.role in WRITERS:
            out[f"{lin.name}.weight"] = ("writer", None)
            out[f"{lin.name}.bias"] = ("writer-bias", None)
    for i in range(arch.num_layers):
        lp = arch.layer_prefix(i)
        out[f"{lp}.norm.weight"] = ("norm", None)
        gate = f"{lp}.mixer.gate.weight"
        if gate in arch.tensor_by_name:
            out[gate] = ("reader", f"{lp}.norm.weight")
    out[arch.norm_f] = ("norm", None)
    return out


def check(arch: Arch) -> None:
    if arch.tie_word_embeddings:
        raise ValueError("rotation needs an untied lm_head (the final norm is folded into it)")


def rotate_tensor(name: str, t: torch.Tensor, q: torch.Tensor, role: tuple[str, str | None] | None,
                  read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """`t` as the rotated checkpoint stores it (same dtype); `read(name)` gives a norm weight to fold."""
    if role is None:
        return t
    kind, norm = role
    x = t.double()
    if kind == "embedding":
        x = x @ q
    elif kind == "reader":
        x = (x * read(norm).double()[None, :]) @ q
    elif kind == "writer":
        x = q.T @ x
    elif kind == "writer-bias":
        x = x @ q
    elif kind == "norm":
        x = torch.ones_like(x)
    return x.to(t.dtype)
