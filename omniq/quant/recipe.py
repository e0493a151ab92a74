"""Recipes are data: a YAML file that says which linear layers of NemotronH get which format.

    name: nano3-nvfp4
    description: ...
    kv_cache: fp8            # none | fp8
    default: nvfp4           # format of every linear layer no rule matches
    rules:                   # first match wins
      - select: [lm_head, attention, mamba_feeding_attention]
        format: bf16
      - modules: ["backbone.layers.1.mixer.experts.*"]   # glob on hub-layout names (user recipes)
        format: fp8
        algorithm: gptq                                   # weight calibration of this rule's layers
    algorithm: mse           # weight calibration of every quantized layer no rule's `algorithm` names

Weight calibration (`algorithm:`, top level and per rule; `omniq.quant.weight_calibration`): `max` (default:
ModelOpt's max calibration, the artifacts of before), `mse`, `local-hessian`, `gptq`, `gptaq` (GPTQ aiming at
the output the engine computes from quantized inputs), `four-over-six` (NVFP4 only), as a name or a mapping
`{name: gptq, damping: 0.01, block_size: 128, min_tokens: 64, act_order: false}` (`act_order`: gptq / gptaq
only, true or false; GPTQ's descending-diag(H) column order, NVFP4 in whole 16-column groups). An algorithm
that does not apply to a rule's format (anything but `max` on bf16, `four-over-six` on fp8) is refused.
`activation_calibration: mse` (top level; default `max`, ModelOpt's) picks each quantized layer's
input_scale as max's times the factor with the least squared input error on the calibration inputs.
`compensation: norm-tweak` (top level; or `{name: norm-tweak, steps: 200, lr: 0.002, params: [norm,
mixer-norm]}`; default none) fits each decoder layer's BF16 norms to the quantized layer's error, layer by
layer on the calibration rows (`omniq.quant.compensation`); the artifact's format is unchanged.

Selectors name parts of the model, derived from the architecture (never layer indices), so one recipe fits
every NemotronH layout: a role (`mamba_in`, `mamba_out`, `attn_q`, `attn_k`, `attn_v`, `attn_o`,
`expert_up`, `expert_down`, `shared_up`, `shared_down`, `mlp_up`, `mlp_down`, `lm_head`), a group of roles
(`mamba`, `attention`, `attn_qkv`, `routed_experts`, `shared_experts`, `experts`, `mlp`), or
`mamba_feeding_attention` (in_proj/out_proj of the Mamba layer directly before each attention layer, from
the layer pattern). A selector may match nothing on a given layout (no `-` layers, no shared experts);
a `modules` glob that matches nothing is an error.

Validation on load (`OmniqError`, exit 2): unknown keys, unknown formats or kv_cache, unknown selectors,
rules without a format or without anything to select, and a rule that quantizes `lm_head`; against the
model (`check_against`, called by `make_plan`): module globs that match no linear layer, or that name only
`lm_head` in a quantizing rule.

The router, Mamba conv1d, norms and embeddings are not linear layers of the plan and are never quantized;
`lm_head` is always kept in BF16.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from omniq.errors import OmniqError
from omniq.model.arch import ROLES, Arch, Linear

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
FORMATS = ("bf16", "fp8", "nvfp4")
KV_CACHE = ("none", "fp8")
GROUPS = {
    "mamba": {"mamba_in", "mamba_out"},
    "attention": {"attn_q", "attn_k", "attn_v", "attn_o"},
    "attn_qkv": {"attn_q", "attn_k", "attn_v"},
    "routed_experts": {"expert_up", "expert_down"},
    "shared_experts": {"shared_up", "shared_down"},
    "experts": {"expert_up", "expert_down", "shared_up", "shared_down"},
    "mlp": {"mlp_up", "mlp_down"},
}
QUALIFIERS = ("mamba_feeding_attention",)
SELECTORS = tuple(ROLES) + tuple(GROUPS) + QUALIFIERS
_RECIPE_KEYS = {"name", "description", "kv_cache", "default", "rules", "notes", "reference", "algorithm",
                "activation_calibration", "compensation"}
# Activation (input_scale) calibration of every quantized layer: ModelOpt's max, or max x the factor in
# `weight_calibration.ACT_FACTORS` with the least squared input error over the calibration inputs.
ACTIVATION_CALIBRATIONS = ("max", "mse")
_RULE_KEYS = {"select", "modules", "format", "algorithm"}
# Weight calibration algorithms and the formats each applies to.
ALGORITHMS = {"max": ("bf16", "fp8", "nvfp4"), "mse": ("fp8", "nvfp4"), "local-hessian": ("fp8", "nvfp4"),
              "gptq": ("fp8", "nvfp4"), "gptaq": ("fp8", "nvfp4"), "four-over-six": ("nvfp4",)}
GPTQ_LIKE = ("gptq", "gptaq")     # take damping, block_size, min_tokens
_ALGORITHM_KEYS = {"name", "damping", "block_size", "min_tokens", "target_damping", "act_order"}
COMPENSATIONS = ("none", "norm-tweak")
# compensation params: the kinds of BF16 tensor a layer's fit may change (omniq.quant.compensation.KINDS)
COMPENSATION_PARAMS = ("norm", "mixer-norm", "D", "dt_bias", "A_log", "conv")
_COMPENSATION_KEYS = {"name", "steps", "lr", "params"}


@dataclass(frozen=True)
class Compensation:
    """A recipe's `compensation:`: `none`, or `norm-tweak` with Adam's steps and learning rate (relative to
    each tensor's mean magnitude) and the kinds of BF16 tensor fitted (`omniq.quant.compensation`)."""
    name: str = "none"
    steps: int = 200
    lr: float = 0.002
    params: tuple[str, ...] = ("norm", "mixer-norm")

    def as_dict(self) -> dict | str:
        if self.name == "none":
            return "none"
        return {"name": self.name, "steps": self.steps, "lr": self.lr, "params": list(self.params)}


NO_COMPENSATION = Compensation()


@dataclass(frozen=True)
class Algorithm:
    """Weight calibration of a layer. `damping` and `block_size` are GPTQ's (and gptaq's); `min_tokens`: a
    routed expert with fewer calibration tokens than this falls back to `mse` under local-hessian, gptq and
    gptaq."""
    name: str = "max"
    damping: float = 0.01
    block_size: int = 128
    min_tokens: int = 64
    target_damping: float = 0.1     # gptaq only: ridge of its target towards the source weight
    act_order: bool = False         # gptq / gptaq: columns by descending diag(H) (NVFP4: whole 16-column groups)

    def as_dict(self) -> dict | str:
        if self.name in GPTQ_LIKE:
            return {"name": self.name, "damping": self.damping, "block_size": self.block_size,
                    "min_tokens": self.min_tokens,
                    **({"target_damping": self.target_damping} if self.name == "gptaq" else {}),
                    **({"act_order": True} if self.act_order else {})}
        if self.name == "local-hessian" and self.min_tokens != 64:
            return {"name": self.name, "min_tokens": self.min_tokens}
        return self.name


MAX = Algorithm()


@dataclass(frozen=True)
class Rule:
    format: str
    select: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    algorithm: Algorithm | None = None        # None: the recipe's algorithm

    def matches(self, lin: Linear, arch: Arch) -> bool:
        for s in self.select:
            if s == lin.role or lin.role in GROUPS.get(s, ()):
                return True
            if s == "mamba_feeding_attention" and lin.role in GROUPS["mamba"] \
                    and lin.layer in arch.mamba_feeding_attention:
                return True
        local = lin.name[len(arch.prefix):] if arch.prefix else lin.name
        return any(fnmatch.fnmatchcase(local, pat) or fnmatch.fnmatchcase(lin.name, pat) for pat in self.modules)


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str
    kv_cache: str = "none"
    rules: tuple[Rule, ...] = ()
    description: str = ""
    source: str = ""                   # file it came from
    raw: dict = field(default_factory=dict, compare=False, hash=False)
    algorithm: Algorithm = MAX         # weight calibration of quantized layers no rule's algorithm names
    activation_calibration: str = "max"   # input_scale of every quantized layer: max | mse
    compensation: Compensation = NO_COMPENSATION

    def with_kv_cache(self, kv: str | None) -> "Recipe":
        if kv is None:
            return self
        if kv not in KV_CACHE:
            raise OmniqError(f"--kv-cache {kv!r}: expected one of {', '.join(KV_CACHE)}")
        from dataclasses import replace
        raw = dict(self.raw, kv_cache=kv)
        return replace(self, kv_cache=kv, raw=raw)

    def format_of(self, lin: Linear, arch: Arch) -> str:
        if lin.role == "lm_head":
            return "bf16"
        for rule in self.rules:
            if rule.matches(lin, arch):
                return rule.format
        return self.default

    def algorithm_of(self, lin: Linear, arch: Arch) -> Algorithm:
        """Weight calibration of a layer: its deciding rule's `algorithm`, else the recipe's (max for bf16)."""
        i = self.decided_by(lin, arch)
        fmt = self.format_of(lin, arch)
        if fmt == "bf16":
            return MAX
        rule_algo = self.rules[i].algorithm if i is not None else None
        return rule_algo or self.algorithm

    @property
    def algorithms(self) -> list[str]:
        """Every weight-calibration algorithm the recipe names."""
        names = {self.algorithm.name} | {r.algorithm.name for r in self.rules if r.algorithm is not None}
        return sorted(names)

    def check_against(self, arch: Arch) -> None:
        """Module patterns must match at least one linear layer of this model, and a rule that quantizes
        must not name only `lm_head` (omniq keeps it BF16; a broad glob that also covers it is fine).

        Selectors are not checked here: they name parts of NemotronH that a given layout may lack (a
        model without shared experts, or without `-` MLP layers), so one recipe fits every layout."""
        for i, rule in enumerate(self.rules):
            for pat in rule.modules:
                hits = [lin for lin in arch.linears if Rule("bf16", modules=(pat,)).matches(lin, arch)]
                if not hits:
                    raise OmniqError(f"recipe {self.name}: rules[{i}] pattern {pat!r} matches no linear layer "
                                     f"of this model (names look like {arch.linears[0].name})")
                if rule.format != "bf16" and all(lin.role == "lm_head" for lin in hits):
                    raise OmniqError(f"recipe {self.name}: rules[{i}] quantizes lm_head ({pat!r} -> "
                                     f"{rule.format}); omniq always keeps lm_head in BF16")

    def decided_by(self, lin: Linear, arch: Arch) -> int | None:
        """Index of the rule that decides this layer's format; None for the default (and for lm_head,
        which is always BF16)."""
        if lin.role == "lm_head":
            return None
        for i, rule in enumerate(self.rules):
            if rule.matches(lin, arch):
                return i
        return None

    def as_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "kv_cache": self.kv_cache,
             "default": self.default,
             "rules": [{k: v for k, v in (("select", list(r.select)), ("modules", list(r.modules)),
                                          ("format", r.format),
                                          ("algorithm", r.algorithm.as_dict() if r.algorithm else None)) if v}
                       for r in self.rules]}
        if self.algorithm != MAX:
            d["algorithm"] = self.algorithm.as_dict()
        if self.activation_calibration != "max":
            d["activation_calibration"] = self.activation_calibration
        if self.compensation.name != "none":
            d["compensation"] = self.compensation.as_dict()
        return d


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _fail(where: str, msg: str):
    raise OmniqError(f"recipe {where}: {msg}")


def _named(value, where: str, what: str, names, keys) -> dict:
    """A recipe value given as a name or a mapping with `name` and some of `keys`, the name one of `names`."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        _fail(where, f"{what} must be a name ({', '.join(names)}) or a mapping with name, not {value!r}")
    unknown = set(value) - keys
    if unknown:
        _fail(where, f"{what} has unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(keys))}")
    if value["name"] not in names:
        _fail(where, f"{what} {value['name']!r} is unknown; expected one of {', '.join(names)}")
    return value


def parse_algorithm(value, where: str) -> Algorithm:
    """`algorithm:` as a name or a mapping with GPTQ's parameters."""
    value = _named(value, where, "algorithm", ALGORITHMS, _ALGORITHM_KEYS)
    name = value["name"]
    params = {k: v for k, v in value.items() if k != "name"}
    allowed = ({"damping", "block_size", "min_tokens", "act_order"} | ({"target_damping"} if name == "gptaq" else set())
               if name in GPTQ_LIKE else {"min_tokens"} if name == "local-hessian" else set())
    if set(params) - allowed:
        _fail(where, f"algorithm {name} takes no {sorted(set(params) - allowed)[0]} parameter")
    for key, default, top in (("damping", 0.01, 1), ("target_damping", 0.1, 100)):
        d = params.get(key, default)
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= top:
            _fail(where, f"algorithm {key} {d!r} must be a number in (0, {top}]")
    for key, default in (("block_size", 128), ("min_tokens", 64)):
        v = params.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (key == "block_size" and v % 16):
            _fail(where, f"algorithm {key} {v!r} must be a positive integer" +
                  (" and a multiple of 16 (the NVFP4 group)" if key == "block_size" else ""))
    act_order = params.get("act_order", False)
    if not isinstance(act_order, bool):
        _fail(where, f"algorithm act_order {act_order!r} must be true or false")
    return Algorithm(name, float(params.get("damping", 0.01)), int(params.get("block_size", 128)),
                     int(params.get("min_tokens", 64)), float(params.get("target_damping", 0.1)), act_order)


def parse_compensation(value, where: str) -> Compensation:
    """`compensation:` as a name or a mapping with steps / lr / params."""
    if value is None or value is False:
        return NO_COMPENSATION
    value = _named(value, where, "compensation", COMPENSATIONS, _COMPENSATION_KEYS)
    name = value["name"]
    if name == "none":
        if len(value) > 1:
            _fail(where, "compensation none takes no parameters")
        return NO_COMPENSATION
    steps = value.get("steps", 200)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100_000:
        _fail(where, f"compensation steps {steps!r} must be an integer in 1..100000")
    lr = value.get("lr", 0.002)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1:
        _fail(where, f"compensation lr {lr!r} must be a number in (0, 1]")
    params = value.get("params", ["norm", "mixer-norm"])
    params = [params] if isinstance(params, str) else params
    if not isinstance(params, list) or not params:
        _fail(where, "compensation params must be a non-empty list")
    for k in params:
        if k not in COMPENSATION_PARAMS:
            _fail(where, f"compensation param {k!r} is unknown; expected some of {', '.join(COMPENSATION_PARAMS)}")
    return Compensation(name, steps, float(lr), tuple(dict.fromkeys(params)))


def _check_applies(algo: Algorithm, fmt: str, where: str, what: str) -> None:
    if fmt not in ALGORITHMS[algo.name]:
        _fail(where, f"{what}algorithm {algo.name} does not apply to {fmt} "
                     f"(it applies to {', '.join(ALGORITHMS[algo.name])})")


def parse(data, where: str) -> Recipe:
    if not isinstance(data, dict):
        _fail(where, "expected a mapping at the top level")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        _fail(where, f"unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_RECIPE_KEYS))}")
    for key in ("name", "default"):
        if key not in data:
            _fail(where, f"missing required key {key!r}")
    if not isinstance(data["name"], str) or not data["name"].strip():
        _fail(where, f"name must be a non-empty string, not {data['name']!r}")
    default = data["default"]
    if default not in FORMATS:
        _fail(where, f"default format {default!r} is unknown; expected one of {', '.join(FORMATS)}")
    kv = data.get("kv_cache", "none")
    if kv is None or kv is False:
        kv = "none"
    if kv not in KV_CACHE:
        _fail(where, f"kv_cache {kv!r} is unknown; expected one of {', '.join(KV_CACHE)}")
    rules = []
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        _fail(where, "rules must be a list")
    for i, r in enumerate(raw_rules):
        if not isinstance(r, dict):
            _fail(where, f"rules[{i}] must be a mapping with select/modules and format")
        unknown = set(r) - _RULE_KEYS
        if unknown:
            _fail(where, f"rules[{i}] has unknown key {sorted(unknown)[0]!r}; allowed: select, modules, format, "
                         "algorithm")
        if "format" not in r:
            _fail(where, f"rules[{i}] has no format; expected one of {', '.join(FORMATS)}")
        fmt = r.get("format")
        if fmt not in FORMATS:
            _fail(where, f"rules[{i}] format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
        select = r.get("select") or []
        modules = r.get("modules") or []
        select = [select] if isinstance(select, str) else select
        modules = [modules] if isinstance(modules, str) else modules
        if not select and not modules:
            _fail(where, f"rules[{i}] selects nothing: give select (parts of the model) or modules (name globs)")
        if not isinstance(select, list) or not isinstance(modules, list) \
                or not all(isinstance(m, str) and m for m in modules):
            _fail(where, f"rules[{i}] select and modules must be a name or a list of names")
        for s in select:
            if not isinstance(s, str) or s not in SELECTORS:
                _fail(where, f"rules[{i}] selector {s!r} is unknown; expected one of {', '.join(SELECTORS)}")
        if "lm_head" in select and fmt != "bf16":
            _fail(where, f"rules[{i}] quantizes lm_head; omniq always keeps lm_head in BF16")
        algo = parse_algorithm(r["algorithm"], where) if r.get("algorithm") is not None else None
        if algo is not None:
            _check_applies(algo, fmt, where, f"rules[{i}] ")
        rules.append(Rule(fmt, tuple(select), tuple(str(m) for m in modules), algo))
    top = parse_algorithm(data["algorithm"], where) if data.get("algorithm") is not None else MAX
    for fmt in {default} | {r.format for r in rules if r.algorithm is None}:
        if fmt != "bf16":
            _check_applies(top, fmt, where, "")
    act = data.get("activation_calibration", "max")
    if act not in ACTIVATION_CALIBRATIONS:
        _fail(where, f"activation_calibration {act!r} is unknown; expected one of {', '.join(ACTIVATION_CALIBRATIONS)}")
    comp = parse_compensation(data.get("compensation"), where)
    if comp.name != "none" and default == "bf16" and all(r.format == "bf16" for r in rules):
        _fail(where, f"compensation {comp.name} needs quantized layers; the recipe keeps every layer in BF16")
    return Recipe(name=str(data["name"]), default=default, kv_cache=kv, rules=tuple(rules),
                  description=str(data.get("description", "")).strip(), source=where, raw=data, algorithm=top,
                  activation_calibration=act, compensation=comp)


def load(name_or_path: str) -> Recipe:
    """A built-in recipe name (`fp8`, `nvfp4`, ...) or a path to a user's YAML file."""
    import yaml

    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.exists()):
        p = RECIPES_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise OmniqError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())}, "
                             "or pass a path to a YAML file")
    if not p.is_file():
        raise OmniqError(f"recipe file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OmniqError(f"recipe {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse(data, str(p) if p.parent != RECIPES_DIR else p.stem)
