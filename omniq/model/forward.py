"""A plain-torch NemotronH forward over hub-layout tensors (no cache, float32), on any device.

Used to train the bundled model and, in `validate`, to evaluate both the BF16 reference and a candidate read
from its files: the candidate passes a `linear` that dequantizes weights and simulates activation
quantization, and a `kv` hook that simulates the FP8 KV cache. Its Mamba-2 scan is `mamba2.ssd_chunked`,
right at any sequence length. Tests tie it to transformers' `NemotronHForCausalLM` on short sequences.
`decoder_layer` runs one layer, so a caller can hold one layer's weights at a time (the layer-streamed
validate); every tensor made here is made on the inputs' device (tests/model/test_devices.py runs it on the
`meta` device).

A `linear` hook is a callable `linear(name, x)`; a hook that quantizes activations may also offer
`input_key(name)` (equal keys: the same input transformation), `prepare(name, x)` (that transformation) and
`matmul(name, x_prepared)` (what such a hook returns, from `matmul` or a call, is a new tensor the caller
may modify in place), so the MoE quantizes a layer input once for
all its routed and shared experts (and the experts' down-projection inputs once for all of them), and
attention its q / k / v input once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from omniq.model import names
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


def expert_counts(counts: torch.Tensor, total: int) -> list[int]:
    """Tokens per expert as Python ints (the loop bounds of the expert loop: one device-to-host copy per MoE
    layer). Tensors on the `meta` device carry no values (the device test, tests/model/test_devices.py): there
    every expert gets an even share of the `total` token-slots, so the whole expert loop still runs."""
    if counts.device.type == "meta":
        n = counts.numel()
        return [total // n + (e < total % n) for e in range(n)]
    return counts.tolist()


def _input_once(linear: LinearFn, modules: list[str], x: torch.Tensor) -> torch.Tensor | None:
    """`x` as every one of `modules` quantizes its input, computed once, when the hook says they quantize it
    alike (`input_key`, e.g. one shared input_scale for a layer's routed experts); else None. Per-tensor FP8
    and per-row-block NVFP4 act on each token row alone, so quantizing the layer input once and then taking an
    expert's rows is exactly quantizing the expert's rows."""
    return linear.prepare(modules[0], x) if _alike(linear, modules) else None


def _alike(linear: LinearFn, modules: list[str]) -> bool:
    """The hook transforms the inputs of all of `modules` the same way (`input_key`); False for plain hooks."""
    key = getattr(linear, "input_key", None)
    return key is not None and len({key(n) for n in modules}) == 1


def moe(arch: Arch, weights, p: str, x: torch.Tensor, linear: LinearFn, stats: dict | None, layer: int):
    """Routed experts (tokens grouped by expert once: a stable sort of the chosen experts, so each expert sees
    its tokens in ascending order, as one contiguous slice of the gathered rows) plus the shared expert. With
    a hook that quantizes inputs (`input_key`), the layer input is quantized once for every up projection
    that quantizes it alike (routed and shared), and the routed experts' down-projection inputs once for all
    of them when they are alike; a plain hook sees each expert's rows in its own call."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    idx, w = route(arch, weights, p, flat)
    k = idx.shape[1]
    chosen = idx.flatten()
    order = chosen.argsort(stable=True)
    tok = order // k
    w_sorted = w.reshape(-1)[order, None]               # the routing weight of each gathered row
    counts = torch.zeros(arch.n_routed_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, chosen, torch.ones_like(chosen))
    if stats is not None:
        stats[layer] = stats.get(layer, 0) + counts
    ups = [f"{p}.experts.{e}.up_proj" for e in range(arch.n_routed_experts)]
    downs = [f"{p}.experts.{e}.down_proj" for e in range(arch.n_routed_experts)]
    shared_up = f"{p}.shared_experts.up_proj"
    shared_input = _input_once(linear, ups, flat)
    spans, start = [], 0
    for e, c in enumerate(expert_counts(counts, chosen.numel())):
        if c:
            spans.append((e, slice(start, start + c)))
        start += c
    xs = (flat if shared_input is None else shared_input)[tok]          # every expert's rows, grouped
    up = linear.matmul if shared_input is not None else linear
    out = torch.zeros_like(flat)
    if _alike(linear, downs):
        hidden = flat.new_empty(tok.shape[0], arch.moe_intermediate_size)
        for e, r in spans:
            torch.square(torch.relu_(up(ups[e], xs[r])), out=hidden[r])
        del xs                                          # (the gathered inputs or the quantized hidden: two at once)
        hidden = linear.prepare(downs[0], hidden)
        for e, r in spans:
            out.index_add_(0, tok[r], linear.matmul(downs[e], hidden[r]).mul_(w_sorted[r]))
    else:
        for e, r in spans:
            out.index_add_(0, tok[r], linear(downs[e], relu2(up(ups[e], xs[r]))) * w_sorted[r])
    if arch.n_shared_experts:
        if shared_input is not None and _alike(linear, [ups[0], shared_up]):
            h = linear.matmul(shared_up, shared_input)
        else:
            h = linear(shared_up, flat)
        out = out + linear(f"{p}.shared_experts.down_proj", relu2(h))
    return out.view(shape)


def attention(arch: Arch, p: str, x: torch.Tensor, linear: LinearFn, kv: KvFn | None, layer: int):
    b, L, _ = x.shape
    qkv = names.qkv(p)
    xq = _input_once(linear, qkv, x)          # the fused QKV GEMM's one input quantization, when they share it
    q, k, v = (linear(n, x) if xq is None else linear.matmul(n, xq) for n in qkv)
    q = q.view(b, L, arch.num_attention_heads, arch.head_dim).transpose(1, 2)
    k = k.view(b, L, arch.num_key_value_heads, arch.head_dim)
    v = v.view(b, L, arch.num_key_value_heads, arch.head_dim)
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


def decoder_layer(arch: Arch, weights: Mapping[str, torch.Tensor], i: int, x: torch.Tensor, *,
                  linear: LinearFn | None = None, kv: KvFn | None = None, route_stats: dict | None = None,
                  recurrent: bool = False) -> torch.Tensor:
    """Decoder layer `i` (pre-norm mixer plus residual) on float32 hidden states (b, L, hidden). `weights`
    needs only this layer's tensors: the layer-streamed validate passes one layer at a time."""
    linear = linear or plain_linear(weights)
    lp = arch.layer_prefix(i)
    kind = arch.kinds[i]
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


def embed(arch: Arch, weights: Mapping[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(input_ids, weights[arch.embedding_weight]).float()


def final_norm(arch: Arch, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, weights[arch.norm_f], arch.norm_eps)


def lm_head(arch: Arch, weights: Mapping[str, torch.Tensor], h: torch.Tensor,
            linear: LinearFn | None = None) -> torch.Tensor:
    """Logits from final normed hidden states (the embedding matrix when tied)."""
    if arch.tie_word_embeddings:
        return F.linear(h, weights[arch.embedding_weight].float())
    return (linear or plain_linear(weights))(arch.lm_head, h)


def hidden_states(arch: Arch, weights: Mapping[str, torch.Tensor], input_ids=None, *, inputs_embeds=None,
                  linear: LinearFn | None = None, kv: KvFn | None = None, route_stats: dict | None = None,
                  recurrent: bool = False) -> torch.Tensor:
    """Final normed hidden states (b, L, hidden) in float32."""
    linear = linear or plain_linear(weights)
    x = embed(arch, weights, input_ids) if inputs_embeds is None else inputs_embeds.float()
    for i in range(arch.num_layers):
        x = decoder_layer(arch, weights, i, x, linear=linear, kv=kv, route_stats=route_stats, recurrent=recurrent)
    return final_norm(arch, weights, x)


def logits(arch: Arch, weights: Mapping[str, torch.Tensor], input_ids=None, *, linear: LinearFn | None = None,
           **kw) -> torch.Tensor:
    linear = linear or plain_linear(weights)
    return lm_head(arch, weights, hidden_states(arch, weights, input_ids, linear=linear, **kw), linear)
