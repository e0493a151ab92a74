"""Channel reordering of a NemotronH checkpoint: permutations folded exactly into its tensors.

NVFP4 quantizes a linear's input in blocks of 16 consecutive input channels, each with its own scale. Which
channels share a block is the checkpoint's channel order; a permutation of a linear's input channels,
applied both where that input is produced and to the weight's columns, leaves the function unchanged and
changes only which channels share a block (of the activation and of the weight). Unlike a rotation it is
exact in BF16: values are only moved, never rounded, and no tensor changes name, shape or dtype.

Three kinds of permutation are exact in NemotronH:
- `hidden` (hidden_size): the residual stream, one order for the whole model. The embedding's columns,
  every residual RMSNorm weight (each layer's pre-mixer norm and the final norm: RMS is order-invariant, so
  the norm weights are permuted, not folded), the columns of every reader (Mamba in_proj, q / k / v, the
  router gate, routed / shared experts' and the dense MLP's up, lm_head) and the rows (and bias) of every
  writer (Mamba out_proj, o_proj, the experts' and the MLP's down). Tied embeddings stay tied: the one
  matrix is permuted once and serves both ends.
- `("inner", layer)` (mamba_inner): a Mamba mixer's d_inner channels, only within each head (channel p of
  head h shares dt[h], A[h], D[h] and its group's B / C; the gated norm's groups are whole heads): the z and
  x rows of in_proj (layout [z, x, B, C, dt]), conv1d's weight and bias channels of x, the gated norm's
  weight and out_proj's columns.
- `("intermediate", up)` (the up projection's out_features): a routed expert's, the shared expert's or the
  dense MLP's intermediate channels (ReLU^2 acts on each alone): up's rows (and bias), down's columns.

Not covered: attention's v / o heads (small in the NVFP4 error split) and an Omni checkpoint's projectors,
which write the residual stream too (`check` refuses a prefixed language model).

An order is a 1-D int64 tensor `p` with new channel k = old channel p[k].
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from omniq.model.arch import MAMBA, Arch

HIDDEN = "hidden"
READERS = ("mamba_in", "attn_q", "attn_k", "attn_v", "expert_up", "shared_up", "mlp_up", "lm_head")
WRITERS = ("mamba_out", "attn_o", "expert_down", "shared_down", "mlp_down")
UPS = {"expert_up": "expert_down", "shared_up": "shared_down", "mlp_up": "mlp_down"}

# tensor name -> [(dim, start, length, order key)]
Layout = dict[str, list[tuple[int, int, int, Hashable]]]


def inner_key(layer: int) -> tuple[str, int]:
    return ("inner", layer)


def intermediate_key(up: str) -> tuple[str, str]:
    """The order of the intermediate channels between `up` (a module name) and its down projection."""
    return ("intermediate", up)


def layout(arch: Arch) -> Layout:
    """Every tensor an order moves, with the axis span each order key moves."""
    h = arch.hidden_size
    out: Layout = {}

    def add(name: str, dim: int, start: int, length: int, key: Hashable) -> None:
        out.setdefault(name, []).append((dim, start, length, key))

    add(arch.embedding_weight, 1, 0, h, HIDDEN)
    add(arch.norm_f, 0, 0, h, HIDDEN)
    downs: dict[tuple[int, int | None, str], str] = {}
    for lin in arch.linears:
        if lin.role in UPS:
            downs[(lin.layer, lin.expert, UPS[lin.role])] = lin.name
    for lin in arch.linears:
        w, b = f"{lin.name}.weight", f"{lin.name}.bias"
        if lin.role in READERS and not (lin.role == "lm_head" and arch.tie_word_embeddings):
            add(w, 1, 0, h, HIDDEN)
        if lin.role in WRITERS:
            add(w, 0, 0, h, HIDDEN)
            add(b, 0, 0, h, HIDDEN)
        if lin.role in UPS:
            add(w, 0, 0, lin.out_features, intermediate_key(lin.name))
            add(b, 0, 0, lin.out_features, intermediate_key(lin.name))
        if lin.role in UPS.values():
            up = downs[(lin.layer, lin.expert, lin.role)]
            add(w, 1, 0, lin.in_features, intermediate_key(up))
    inner = arch.mamba_inner
    for i, kind in enumerate(arch.kinds):
        lp = arch.layer_prefix(i)
        add(f"{lp}.norm.weight", 0, 0, h, HIDDEN)
        add(f"{lp}.mixer.gate.weight", 1, 0, h, HIDDEN)
        if kind == MAMBA:
            p, key = f"{lp}.mixer", inner_key(i)
            for t in (f"{p}.in_proj.weight", f"{p}.in_proj.bias"):
                add(t, 0, 0, inner, key)           # z
                add(t, 0, inner, inner, key)       # x (the head of xBC)
            add(f"{p}.conv1d.weight", 0, 0, inner, key)
            add(f"{p}.conv1d.bias", 0, 0, inner, key)
            add(f"{p}.norm.weight", 0, 0, inner, key)
            add(f"{p}.out_proj.weight", 1, 0, inner, key)
    return out


def check(arch: Arch, orders: Mapping[Hashable, torch.Tensor]) -> None:
    """ValueError unless every order is a permutation of its span and Mamba orders stay within heads."""
    if arch.prefix:
        raise ValueError("channel reordering of an Omni checkpoint would need its projectors' output rows "
                         "permuted too; only a plain NemotronH language model is handled")
    spans = {key: length for entries in layout(arch).values() for _, _, length, key in entries}
    for key, p in orders.items():
        if key not in spans:
            raise ValueError(f"order {key!r}: not a channel span of this model")
        if p.dim() != 1 or p.numel() != spans[key] or not torch.equal(p.sort().values, torch.arange(spans[key])):
            raise ValueError(f"order {key!r}: not a permutation of {spans[key]} channels")
        if isinstance(key, tuple) and key[0] == "inner":
            hd = arch.mamba_head_dim
            if not torch.equal(p // hd, torch.arange(p.numel()) // hd):
                raise ValueError(f"order {key!r}: moves channels between Mamba heads")


def permute_tensor(entries: list[tuple[int, int, int, Hashable]] | None, t: torch.Tensor,
                   orders: Mapping[Hashable, torch.Tensor]) -> torch.Tensor:
    """`t` with the orders of its layout entries applied (values moved, never changed; same dtype)."""
    for dim, start, length, key in entries or ():
        p = orders.get(key)
        if p is None:
            continue
        idx = torch.arange(t.shape[dim])
        idx[start:start + length] = p + start
        t = t.index_select(dim, idx)
    return t


def permute(arch: Arch, tensors: Mapping[str, torch.Tensor],
            orders: Mapping[Hashable, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All of `tensors` (a checkpoint's, by hub name) with `orders` applied."""
    check(arch, orders)
    lay = layout(arch)
    return {name: permute_tensor(lay.get(name), t, orders) for name, t in tensors.items()}
