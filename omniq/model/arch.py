"""What a NemotronH language model is, computed from its config alone.

This is the one place that knows NemotronH's layout: layer kinds, where attention sits, which Mamba layer
feeds each attention layer, every tensor of the hub layout with its shape, and every linear layer with its
role. Every stage (plan, quantize, export naming, lint, validate) asks this module instead of matching
strings of its own.

Names are the hub layout's (``backbone.layers.{i}.mixer.experts.{e}.up_proj``), which is what NVIDIA's
checkpoints, ModelOpt's export and the serving engines use. ``native_name`` maps them to transformers 5's
module names (``model.layers.{i}.mixer.experts``, fused 3-D experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from omniq.errors import OmniqError
from omniq.model import names

# Layer kind letters of `hybrid_override_pattern` and transformers 5's `layers_block_type` words.
MAMBA, MOE, ATTENTION, MLP = "M", "E", "*", "-"
_WORD_TO_KIND = {
    "mamba": MAMBA, "linear_attention": MAMBA,
    "moe": MOE,
    "attention": ATTENTION, "full_attention": ATTENTION,
    "mlp": MLP,
}
KIND_NAMES = {MAMBA: "mamba", MOE: "moe", ATTENTION: "attention", MLP: "mlp"}

# Roles of linear layers, in the model's own terms.
ROLES = (
    "mamba_in", "mamba_out",
    "attn_q", "attn_k", "attn_v", "attn_o",
    "expert_up", "expert_down",
    "shared_up", "shared_down",
    "mlp_up", "mlp_down",
    "lm_head",
)


@dataclass(frozen=True)
class Linear:
    """One linear layer of the language model, as the checkpoint names it."""

    name: str            # module name in the hub layout, without ".weight"
    role: str            # one of ROLES
    layer: int | None    # decoder layer index (None for lm_head)
    expert: int | None   # routed expert index, for expert_up / expert_down
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Tensor:
    """One tensor of the BF16 checkpoint: name, shape, and what part of the model it belongs to."""

    name: str
    shape: tuple[int, ...]
    component: str       # mamba, attention, routed_experts, shared_experts, router, mlp, embeddings, norms, lm_head
    dtype: str = "BF16"  # as stored by NVIDIA's BF16 release (router bias is F32)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Arch:
    kinds: tuple[str, ...]
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    chunk_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_shared_experts: int
    intermediate_size: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    norm_eps: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False
    mlp_bias: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    prefix: str = ""     # "language_model." inside an Omni checkpoint
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    # ----- layout -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kinds)

    @property
    def pattern(self) -> str:
        return "".join(self.kinds)

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    @property
    def attention_layers(self) -> list[int]:
        return self.layers_of(ATTENTION)

    @property
    def mamba_feeding_attention(self) -> list[int]:
        """The Mamba layer directly before each attention layer (NVIDIA keeps these in BF16 in Nano 3)."""
        return [i - 1 for i in self.attention_layers if i > 0 and self.kinds[i - 1] == MAMBA]

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_out(self) -> int:
        return self.mamba_inner + self.conv_dim + self.mamba_num_heads

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}backbone.layers.{i}"

    def layer_index(self, name: str) -> int | None:
        """The decoder layer a tensor or module name belongs to (None: outside the decoder layers)."""
        head = f"{self.prefix}backbone.layers."
        i = name[len(head):].split(".", 1)[0] if name.startswith(head) else ""
        return int(i) if i.isdigit() else None

    @property
    def embedding_weight(self) -> str:
        """The token embeddings' tensor, before the decoder layers."""
        return f"{self.prefix}backbone.embeddings.weight"

    @property
    def norm_f(self) -> str:
        """The final norm's weight, after the decoder layers."""
        return f"{self.prefix}backbone.norm_f.weight"

    @property
    def lm_head(self) -> str:
        """The output projection's module (its weight is the embeddings' when they are tied)."""
        return f"{self.prefix}lm_head"

    @property
    def head_weight(self) -> str:
        """The tensor the output projection multiplies by: lm_head's weight, or the tied embeddings."""
        return self.embedding_weight if self.tie_word_embeddings else f"{self.lm_head}.weight"

    @property
    def final_tensors(self) -> list[str]:
        """The tensors after the decoder layers: the final norm and (untied) lm_head."""
        return [self.norm_f] + ([] if self.tie_word_embeddings else [self.head_weight])

    # ----- linear layers ------------------------------------------------------------------------------
    @cached_property
    def linears(self) -> tuple[Linear, ...]:
        out: list[Linear] = []
        h = self.hidden_size
        for i, kind in enumerate(self.kinds):
            p = f"{self.layer_prefix(i)}.mixer"
            if kind == MAMBA:
                out.append(Linear(f"{p}.in_proj", "mamba_in", i, None, h, self.in_proj_out))
                out.append(Linear(f"{p}.out_proj", "mamba_out", i, None, self.mamba_inner, h))
            elif kind == ATTENTION:
                q = self.num_attention_heads * self.head_dim
                kv = self.num_key_value_heads * self.head_dim
                out.append(Linear(f"{p}.q_proj", "attn_q", i, None, h, q))
                out.append(Linear(f"{p}.k_proj", "attn_k", i, None, h, kv))
                out.append(Linear(f"{p}.v_proj", "attn_v", i, None, h, kv))
                out.append(Linear(f"{p}.o_proj", "attn_o", i, None, q, h))
            elif kind == MOE:
                inter = self.moe_intermediate_size
                for e in range(self.n_routed_experts):
                    out.append(Linear(f"{p}.experts.{e}.up_proj", "expert_up", i, e, h, inter))
                    out.append(Linear(f"{p}.experts.{e}.down_proj", "expert_down", i, e, inter, h))
                if self.n_shared_experts:
                    s = self.moe_shared_expert_intermediate_size
                    out.append(Linear(f"{p}.shared_experts.up_proj", "shared_up", i, None, h, s))
                    out.append(Linear(f"{p}.shared_experts.down_proj", "shared_down", i, None, s, h))
            elif kind == MLP:
                out.append(Linear(f"{p}.up_proj", "mlp_up", i, None, h, self.intermediate_size))
                out.append(Linear(f"{p}.down_proj", "mlp_down", i, None, self.intermediate_size, h))
        out.append(Linear(f"{self.prefix}lm_head", "lm_head", None, None, h, self.vocab_size))
        return tuple(out)

    @cached_property
    def linear_by_name(self) -> dict[str, Linear]:
        return {lin.name: lin for lin in self.linears}

    # ----- every tensor of the hub layout -------------------------------------------------------------
    @cached_property
    def tensors(self) -> tuple[Tensor, ...]:
        h = self.hidden_size
        out = [Tensor(self.embedding_weight, (self.vocab_size, h), "embeddings")]
        comp = {"mamba_in": "mamba", "mamba_out": "mamba", "attn_q": "attention", "attn_k": "attention",
                "attn_v": "attention", "attn_o": "attention", "expert_up": "routed_experts",
                "expert_down": "routed_experts", "shared_up": "shared_experts", "shared_down": "shared_experts",
                "mlp_up": "mlp", "mlp_down": "mlp", "lm_head": "lm_head"}
        by_layer: dict[int | None, list[Linear]] = {}
        for lin in self.linears:
            by_layer.setdefault(lin.layer, []).append(lin)
        for i, kind in enumerate(self.kinds):
            lp = self.layer_prefix(i)
            out.append(Tensor(f"{lp}.norm.weight", (h,), "norms"))
            p = f"{lp}.mixer"
            if kind == MAMBA:
                nh = self.mamba_num_heads
                out.append(Tensor(f"{p}.conv1d.weight", (self.conv_dim, 1, self.conv_kernel), "mamba"))
                if self.use_conv_bias:
                    out.append(Tensor(f"{p}.conv1d.bias", (self.conv_dim,), "mamba"))
                out += [Tensor(f"{p}.A_log", (nh,), "mamba"), Tensor(f"{p}.D", (nh,), "mamba"),
                        Tensor(f"{p}.dt_bias", (nh,), "mamba"),
                        Tensor(f"{p}.norm.weight", (self.mamba_inner,), "mamba")]
            elif kind == MOE:
                out.append(Tensor(f"{p}.gate.weight", (self.n_routed_experts, h), "router", "F32"))
                out.append(Tensor(f"{p}.gate.e_score_correction_bias", (self.n_routed_experts,), "router", "F32"))
            for lin in by_layer.get(i, []):
                out.append(Tensor(f"{lin.name}.weight", (lin.out_features, lin.in_features), comp[lin.role]))
                if lin.role in ("mamba_in", "mamba_out") and self.use_bias:
                    out.append(Tensor(f"{lin.name}.bias", (lin.out_features,), comp[lin.role]))
                if lin.role.startswith("attn_") and self.attention_bias:
                    out.append(Tensor(f"{lin.name}.bias", (lin.out_features,), comp[lin.role]))
                if lin.role.startswith(("expert_", "shared_", "mlp_")) and self.mlp_bias:
                    out.append(Tensor(f"{lin.name}.bias", (lin.out_features,), comp[lin.role]))
        norm_f, *lm_head = self.final_tensors
        out.append(Tensor(norm_f, (h,), "norms"))
        out += [Tensor(n, (self.vocab_size, h), "lm_head") for n in lm_head]
        return tuple(out)

    @cached_property
    def tensor_by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    def params_by_component(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.component] = counts.get(t.component, 0) + t.numel
        return counts

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def with_prefix(self, prefix: str) -> "Arch":
        from dataclasses import replace
        return replace(self, prefix=prefix)


def native_name(hub_name: str, prefix: str = "") -> str:
    """Hub-layout module name -> transformers 5 module name (the name codec, omniq.model.names)."""
    return names.native_module(hub_name, prefix)


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


def kinds_from_config(cfg: dict) -> tuple[str, ...]:
    """Layer kinds from either config style: NVIDIA's `hybrid_override_pattern` or transformers 5's
    `layers_block_type` (a list of words)."""
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        bad = sorted(set(pattern) - {MAMBA, MOE, ATTENTION, MLP})
        if bad:
            raise OmniqError(f"config: hybrid_override_pattern has unknown layer letters {bad}; "
                             "expected only M, E, * and -")
        return tuple(pattern)
    words = cfg.get("layers_block_type") or cfg.get("layer_types")
    if isinstance(words, list) and words:
        try:
            return tuple(_WORD_TO_KIND[w] for w in words)
        except KeyError as e:
            raise OmniqError(f"config: layers_block_type has unknown layer type {e.args[0]!r}") from None
    raise OmniqError("config: no hybrid_override_pattern or layers_block_type; "
                     "this does not look like a NemotronH config")


NEMOTRON_H_TYPES = {"nemotron_h"}
NEMOTRON_H_ARCHS = {"NemotronHForCausalLM"}


def is_nemotron_h(cfg: dict) -> bool:
    return cfg.get("model_type") in NEMOTRON_H_TYPES or bool(NEMOTRON_H_ARCHS & set(cfg.get("architectures") or []))


def _float(v) -> float:
    """A config number; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def from_config(cfg: dict, prefix: str = "") -> Arch:
    """Build the architecture description from a NemotronH config dict (either style)."""
    if not is_nemotron_h(cfg):
        arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        raise OmniqError(f"unsupported architecture {arch!r}: omniq handles NemotronH "
                         "(model_type nemotron_h) and Nemotron 3 Nano Omni checkpoints")
    kinds = kinds_from_config(cfg)
    n_layers = cfg.get("num_hidden_layers")
    if n_layers is not None and "hybrid_override_pattern" in cfg and n_layers != len(kinds):
        raise OmniqError(f"config: num_hidden_layers is {n_layers} but hybrid_override_pattern has "
                         f"{len(kinds)} layers; fix the config")
    hidden = cfg["hidden_size"]
    n_heads = cfg.get("num_attention_heads", 1)
    limit = cfg.get("time_step_limit") or (0.0, float("inf"))
    try:
        return Arch(
            kinds=kinds,
            hidden_size=hidden,
            vocab_size=cfg["vocab_size"],
            num_attention_heads=n_heads,
            num_key_value_heads=_get(cfg, "num_key_value_heads", default=n_heads),
            head_dim=_get(cfg, "head_dim", "attention_head_dim", default=hidden // n_heads),
            mamba_num_heads=cfg["mamba_num_heads"],
            mamba_head_dim=cfg["mamba_head_dim"],
            n_groups=cfg.get("n_groups", 1),
            ssm_state_size=cfg["ssm_state_size"],
            conv_kernel=cfg.get("conv_kernel", 4),
            chunk_size=cfg.get("chunk_size", 128),
            n_routed_experts=_get(cfg, "n_routed_experts", "num_local_experts", default=0),
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
            moe_intermediate_size=_get(cfg, "moe_intermediate_size", "intermediate_size", default=0),
            moe_shared_expert_intermediate_size=cfg.get("moe_shared_expert_intermediate_size", 0),
            n_shared_experts=cfg.get("n_shared_experts", 0),
            intermediate_size=cfg.get("intermediate_size", 0),
            n_group=cfg.get("n_group", 1),
            topk_group=cfg.get("topk_group", 1),
            norm_topk_prob=cfg.get("norm_topk_prob", True),
            routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
            norm_eps=_get(cfg, "layer_norm_epsilon", "norm_eps", default=1e-5),
            use_conv_bias=cfg.get("use_conv_bias", True),
            use_bias=_get(cfg, "mamba_proj_bias", "use_bias", default=False),
            mlp_bias=cfg.get("mlp_bias", False),
            attention_bias=cfg.get("attention_bias", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            time_step_limit=(_float(limit[0]), _float(limit[1])),
            prefix=prefix,
        )
    except KeyError as e:
        raise OmniqError(f"config: missing required NemotronH key {e.args[0]!r}") from None
