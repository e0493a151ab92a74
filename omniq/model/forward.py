"""A plain-torch NemotronH forward over hub-layout tensors (no cache, float32), for CPU.

Used to train the bundled model and, in `validate`, to evaluate both the BF16 reference and a candidate read
from its files: the candidate passes a `linear` that dequantizes weights and simulates activation
quantization, and a `kv` hook that simulates the FP8 KV cache. Its Mamba-2 scan is `mamba2.ssd_chunked`,
right at any sequence length. Tests tie it to transformers' `NemotronHForCausalLM` on short sequences.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from omniq.model.arch import ATTENTION, MAMBA, MLP, MOE, Arch
from omniq.model.mamba2 import mixer_scan

LinearFn = Callable[[str, torch.Tensor], torch.Tensor]
KvFn = Callable[[int, str, torch.Tensor], torch.Tensor]


def rms_norm(x, weight, eps):
    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def plain_linear(weights: Mapping[str, torch.Tensor]) -> LinearFn:
    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        bias = weights.get(f"{name}.bias")
        return F.linear(x, weights[f"{name}.weight"].float(), None if bias is None else bias.float())
    return linear


def route(arch: Arch, weights, p: str, x: torch.Tensor):
    """Sigmoid router with score-correction bias used only for choosing; returns (top-k idx, weights)."""
    logits = F.linear(x.float(), weights[f"{p}.gate.weight"].float())
    scores = logits.sigmoid()
    bias = weights.get(f"{p}.gate.e_score_correction_bias")
    choice = scores + bias.float() if bias is not None else scores
    if arch.n_group > 1:
        g = choice.view(-1, arch.n_group, arch.n_routed_experts // arch.n_group)
        group_scores = g.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(arch.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(g.shape[-1], dim=1), float("-inf"))
    idx = choice.topk(arch.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    if arch.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * arch.routed_scaling_factor


def relu2(x):
    return torch.relu(x).square()


def moe(arch: Arch, weights, p: str, x: torch.Tensor, linear: LinearFn, stats: dict | None, layer: int):
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    idx, w = route(arch, weights, p, flat)
    out = torch.zeros_like(flat)
    counts = torch.bincount(idx.flatten(), minlength=arch.n_routed_experts)
    if stats is not None:
        stats[layer] = stats.get(layer, 0) + counts
    for e in torch.nonzero(counts).flatten().tolist():
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        h = linear(f"{p}.experts.{e}.down_proj", relu2(linear(f"{p}.experts.{e}.up_proj", flat[tok])))
        out.index_add_(0, tok, h * w[tok, slot, None])
    if arch.n_shared_experts:
        out = out + linear(f"{p}.shared_experts.down_proj", relu2(linear(f"{p}.shared_experts.up_proj", flat)))
    return out.view(shape)


def attention(arch: Arch, p: str, x: torch.Tensor, linear: LinearFn, kv: KvFn | None, layer: int):
    b, L, _ = x.shape
    q = linear(f"{p}.q_proj", x).view(b, L, arch.num_attention_heads, arch.head_dim).transpose(1, 2)
    k = linear(f"{p}.k_proj", x).view(b, L, arch.num_key_value_heads, arch.head_dim)
    v = linear(f"{p}.v_proj", x).view(b, L, arch.num_key_value_heads, arch.head_dim)
    if kv is not None:
        k, v = kv(layer, "k", k), kv(layer, "v", v)
    rep = arch.num_attention_heads // arch.num_key_value_heads
    k = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=arch.head_dim ** -0.5)
    return linear(f"{p}.o_proj", o.transpose(1, 2).reshape(b, L, -1))


def mamba(arch: Arch, weights, p: str, x: torch.Tensor, linear: LinearFn, recurrent: bool):
    y = mixer_scan(
        linear(f"{p}.in_proj", x), weights[f"{p}.conv1d.weight"], weights.get(f"{p}.conv1d.bias"),
        weights[f"{p}.A_log"], weights[f"{p}.D"], weights[f"{p}.dt_bias"], weights[f"{p}.norm.weight"],
        num_heads=arch.mamba_num_heads, head_dim=arch.mamba_head_dim, n_groups=arch.n_groups,
        state_size=arch.ssm_state_size, chunk_size=arch.chunk_size, eps=arch.norm_eps,
        dt_limit=arch.time_step_limit, recurrent=recurrent)
    return linear(f"{p}.out_proj", y)


def hidden_states(arch: Arch, weights: Mapping[str, torch.Tensor], input_ids=None, *, inputs_embeds=None,
                  linear: LinearFn | None = None, kv: KvFn | None = None, route_stats: dict | None = None,
                  recurrent: bool = False) -> torch.Tensor:
    """Final normed hidden states (b, L, hidden) in float32."""
    linear = linear or plain_linear(weights)
    pre = arch.prefix
    if inputs_embeds is None:
        inputs_embeds = F.embedding(input_ids, weights[f"{pre}backbone.embeddings.weight"])
    x = inputs_embeds.float()
    for i in range(len(arch.kinds)):
        x = block(arch, weights, i, x, linear, kv=kv, route_stats=route_stats, recurrent=recurrent)
    return rms_norm(x, weights[f"{pre}backbone.norm_f.weight"], arch.norm_eps)


def block(arch: Arch, weights: Mapping[str, torch.Tensor], i: int, x: torch.Tensor, linear: LinearFn, *,
          kv: KvFn | None = None, route_stats: dict | None = None, recurrent: bool = False) -> torch.Tensor:
    """Decoder layer `i`: x + mixer(norm(x)) (float32); a layer-by-layer caller runs these in order."""
    kind = arch.kinds[i]
    lp = arch.layer_prefix(i)
    h = rms_norm(x, weights[f"{lp}.norm.weight"], arch.norm_eps)
    p = f"{lp}.mixer"
    if kind == MAMBA:
        h = mamba(arch, weights, p, h, linear, recurrent)
    elif kind == ATTENTION:
        h = attention(arch, p, h, linear, kv, i)
    elif kind == MOE:
        h = moe(arch, weights, p, h, linear, route_stats, i)
    elif kind == MLP:
        h = linear(f"{p}.down_proj", relu2(linear(f"{p}.up_proj", h)))
    return x + h


def logits(arch: Arch, weights: Mapping[str, torch.Tensor], input_ids=None, *, linear: LinearFn | None = None,
           **kw) -> torch.Tensor:
    linear = linear or plain_linear(weights)
    h = hidden_states(arch, weights, input_ids, linear=linear, **kw)
    if arch.tie_word_embeddings:
        return F.linear(h, weights[f"{arch.prefix}backbone.embeddings.weight"].float())
    return linear(f"{arch.prefix}lm_head", h)
