"""Mixed-precision search: layer groups, their sizes per format, and the exact choice under a size budget.

Groups (the units a recipe can give a format to, named in the model's terms, from `Arch`):
    mamba.<i>            in_proj + out_proj of Mamba layer i
    attention.<i>        q / k / v / o of attention layer i
    shared_experts.<i>   the shared expert of MoE layer i
    routed_experts.<i>   every routed expert of MoE layer i (one format per layer: one ModelOpt input
                         quantizer serves them all, `plan.check_experts_share_formats`)
    mlp.<i>              a dense `-` layer's up / down
`lm_head` is always BF16 in omniq (recipes refuse to quantize it), so it is a fixed cost, not a choice.

The choice: minimise the summed sensitivity (KL when that group alone takes a format; BF16 costs 0) subject to
bytes <= budget. An exact multiple-choice knapsack, solved by dynamic programming over the groups that keeps
every Pareto-optimal partial assignment (bytes, summed KL): a dominated partial assignment (more bytes and
no less KL) can never complete into a better solution, so pruning it loses nothing, and no size is rounded
(a DP over a byte grid would have to round sizes, an ILP would need a solver dependency for a problem this
small: 14 groups on tiny, 76 on Nemotron 3 Nano, with at most 3 choices each). The frontier it keeps is also
the size-vs-predicted-KL curve for every budget at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniq.errors import OmniqError
from omniq.model import names
from omniq.model.arch import Arch, Linear
from omniq.quant.plan import LayerPlan, weight_bytes
from omniq.quant.recipe import ALGORITHMS, FORMATS, parse

GROUP_OF_ROLE = {"mamba_in": "mamba", "mamba_out": "mamba", "attn_q": "attention", "attn_k": "attention",
                 "attn_v": "attention", "attn_o": "attention", "shared_up": "shared_experts",
                 "shared_down": "shared_experts", "expert_up": "routed_experts", "expert_down": "routed_experts",
                 "mlp_up": "mlp", "mlp_down": "mlp"}
MAX_FRONTIER = 2_000_000       # Pareto states kept at once before the search refuses (never near on NemotronH)


@dataclass(frozen=True)
class Group:
    name: str                       # e.g. "mamba.0", "routed_experts.1"
    kind: str                       # mamba | attention | shared_experts | routed_experts | mlp
    layer: int
    linears: tuple[Linear, ...]

    def bytes(self, fmt: str) -> int:
        return sum(weight_bytes(fmt, lin.out_features, lin.in_features) for lin in self.linears)

    @property
    def modules(self) -> list[str]:
        """Recipe `modules` globs naming exactly this group."""
        if self.kind == "routed_experts":
            return [names.experts_glob(self.linears[0].name)]
        return [lin.name for lin in self.linears]


def groups(arch: Arch) -> list[Group]:
    found: dict[tuple[str, int], list[Linear]] = {}
    for lin in arch.linears:
        if lin.role == "lm_head":
            continue
        found.setdefault((GROUP_OF_ROLE[lin.role], lin.layer), []).append(lin)
    return [Group(f"{kind}.{layer}", kind, layer, tuple(lins)) for (kind, layer), lins in found.items()]


def fixed_bytes(arch: Arch) -> int:
    """Bytes no choice changes: every non-linear tensor plus lm_head in BF16."""
    plan = LayerPlan(arch, parse({"name": "bf16", "default": "bf16"}, "search"))
    head = sum(weight_bytes("bf16", lin.out_features, lin.in_features) for lin in arch.linears
               if lin.role == "lm_head")
    return plan.bytes_by_format["other"] + head


@dataclass(frozen=True)
class Choice:
    formats: dict[str, str]          # group name -> format
    bytes: int                       # predicted total bytes of the language model
    kl: float                        # predicted KL: summed sensitivities

    def bits_per_weight(self, params: int) -> float:
        return 8 * self.bytes / params


def frontier(gs: list[Group], sensitivity: dict[str, dict[str, float]], fmts: tuple[str, ...],
             base_bytes: int) -> list[Choice]:
    """Every Pareto-optimal assignment (bytes ascending, KL strictly descending)."""
    states: list[tuple[int, float, tuple[str, ...]]] = [(base_bytes, 0.0, ())]
    for g in gs:
        options = [(f, g.bytes(f), 0.0 if f == "bf16" else sensitivity[g.name][f]) for f in fmts]
        new = [(b + gb, kl + gkl, picks + (f,)) for b, kl, picks in states for f, gb, gkl in options]
        new.sort(key=lambda s: (s[0], s[1]))
        states = []
        best = float("inf")
        for s in new:
            if s[1] < best:
                states.append(s)
                best = s[1]
        if len(states) > MAX_FRONTIER:
            raise OmniqError(f"search: {len(states)} Pareto-optimal partial assignments after {g.name}; too many "
                             "groups for the exact search (choose fewer --formats)")
    return [Choice(dict(zip((g.name for g in gs), picks)), b, kl) for b, kl, picks in states]


def size_bounds(gs: list[Group], fmts: tuple[str, ...], base_bytes: int) -> tuple[int, int]:
    """(smallest, BF16) total bytes: every group in its smallest allowed format, and every group BF16."""
    low = base_bytes + sum(min(g.bytes(f) for f in fmts) for g in gs)
    high = base_bytes + sum(g.bytes("bf16") for g in gs)
    return low, high


def pick(choices: list[Choice], budget_bytes: float) -> Choice:
    """The least-KL assignment within the budget (the frontier is sorted by bytes, KL descending)."""
    fitting = [c for c in choices if c.bytes <= budget_bytes]
    if not fitting:
        raise OmniqError("search: no assignment fits the budget")
    return fitting[-1]


def check_formats(fmts: tuple[str, ...]) -> tuple[str, ...]:
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise OmniqError(f"--formats {','.join(fmts)}: expected a comma-separated subset of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(fmts))


def recipe_dict(choice: Choice, gs: list[Group], algorithm: str, name: str, description: str) -> dict:
    """A normal recipe (YAML data) for the choice: BF16 by default, one `modules` rule per quantized group."""
    rules = []
    for g in gs:
        fmt = choice.formats[g.name]
        if fmt != "bf16":
            rule = {"modules": g.modules, "format": fmt}
            if algorithm != "max" and fmt not in ALGORITHMS[algorithm]:
                rule["algorithm"] = "max"                    # four-over-six is NVFP4's only
            rules.append(rule)
    d = {"name": name, "description": description, "kv_cache": "none", "default": "bf16", "rules": rules}
    if algorithm != "max":
        d["algorithm"] = algorithm
    return d
