"""What a ModelOpt-style checkpoint declares about its quantization, and which module each declared name means.

A checkpoint declares in one or both of two places, which engines read in different orders (TensorRT-LLM
prefers `hf_quant_config.json`, vLLM and SGLang `config.json` -> `quantization_config`):

    hf_quant_config.json   nested: {"producer", "quantization": {quant_algo, kv_cache_quant_algo, group_size,
                           exclude_modules, quantized_layers (MIXED_PRECISION)}}
    config.json            flat (ModelOpt 1.0, compressed-tensors-like): {quant_method: "modelopt", quant_algo,
                           ignore, kv_cache_scheme, quantized_layers, config_groups}

`parse` turns either shape into one `Declaration`. Names in it may be spelled as the hub names modules
(`backbone.`), as TensorRT-LLM does (`model.`, it rewrites backbone -> model), with or without an Omni
checkpoint's `language_model.` prefix, and with fnmatch wildcards (`*.mixer.conv1d`, `vision_model*`).
`Names` resolves them against the modules that really exist in the safetensors headers.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omniq.model import names, omni

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG_QUANT = "config.json quantization_config"

# Declared (per-layer) algorithm -> (weight format, activation format: None when the input is not quantized).
ALGO_FORMATS = {
    "FP8": ("fp8", "fp8"),
    "NVFP4": ("nvfp4", "nvfp4"),
    "W4A8_NVFP4_FP8": ("nvfp4", "fp8"),
    "W4A16_NVFP4": ("nvfp4", None),
}
MIXED = "MIXED_PRECISION"


@dataclass(frozen=True)
class Declaration:
    source: str                                  # HF_QUANT_CONFIG or CONFIG_QUANT
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int | None
    exclude_modules: tuple[str, ...]
    quantized_layers: dict = field(default_factory=dict, compare=False, hash=False)   # name -> {quant_algo, ...}
    raw: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_mixed(self) -> bool:
        return self.quant_algo == MIXED

    def layer_algo(self, entry) -> str | None:
        """The algorithm of one `quantized_layers` entry (a dict, or a bare algorithm string)."""
        if isinstance(entry, dict):
            algo = entry.get("quant_algo")
        else:
            algo = entry
        return str(algo).upper() if algo else None

    def layer_group_size(self, entry) -> int | None:
        if isinstance(entry, dict) and entry.get("group_size") is not None:
            return _int(entry["group_size"])
        return self.group_size


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _upper(v) -> str | None:
    return str(v).upper() if v else None


def _kv_from_scheme(scheme) -> str | None:
    """`kv_cache_scheme` of the flat shape: {"type": "float", "num_bits": 8} -> FP8, 4 -> NVFP4, or a string."""
    if isinstance(scheme, dict):
        bits, kind = scheme.get("num_bits"), scheme.get("type")
        if kind == "float" and bits == 8:
            return "FP8"
        if kind == "float" and bits == 4:
            return "NVFP4"
        if kind == "int" and bits == 8:
            return "INT8"
        return f"{kind}{bits}".upper() if kind or bits else None
    return _upper(scheme)


def _group_size_of_groups(groups) -> int | None:
    if not isinstance(groups, dict):
        return None
    for g in groups.values():
        w = g.get("weights") if isinstance(g, dict) else None
        if isinstance(w, dict) and w.get("group_size") is not None:
            return _int(w["group_size"])
    return None


def parse(raw: dict, source: str) -> Declaration:
    """Either declaration shape -> a `Declaration`."""
    if isinstance(raw.get("quantization"), dict):
        q = raw["quantization"]
        return Declaration(
            source=source,
            quant_algo=_upper(q.get("quant_algo")),
            kv_cache_quant_algo=_upper(q.get("kv_cache_quant_algo")),
            group_size=_int(q.get("group_size")),
            exclude_modules=tuple(q.get("exclude_modules") or ()),
            quantized_layers=dict(q.get("quantized_layers") or {}),
            raw=raw,
        )
    kv = raw.get("kv_cache_quant_algo")
    kv = _upper(kv) if kv else _kv_from_scheme(raw.get("kv_cache_scheme"))
    group = raw.get("group_size")
    return Declaration(
        source=source,
        quant_algo=_upper(raw.get("quant_algo")),
        kv_cache_quant_algo=kv,
        group_size=_int(group) if group is not None else _group_size_of_groups(raw.get("config_groups")),
        exclude_modules=tuple(raw.get("ignore") or raw.get("exclude_modules") or ()),
        quantized_layers=dict(raw.get("quantized_layers") or {}),
        raw=raw,
    )


def read(path: Path, cfg: dict) -> list[Declaration]:
    """Every declaration the checkpoint carries, `hf_quant_config.json` first (it is what TensorRT-LLM reads).
    A file that is not valid JSON raises `ValueError` with the file's name."""
    out = []
    hq = Path(path) / HF_QUANT_CONFIG
    if hq.is_file():
        try:
            raw = json.loads(hq.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{hq}: not valid JSON ({e})") from None
        if isinstance(raw, dict):
            out.append(parse(raw, HF_QUANT_CONFIG))
    qc = cfg.get("quantization_config")
    if not qc and omni.is_omni(cfg) and isinstance(cfg.get("llm_config"), dict):
        qc = cfg["llm_config"].get("quantization_config")
    if isinstance(qc, dict) and qc:
        out.append(parse(qc, CONFIG_QUANT))
    return out


# ----- names -------------------------------------------------------------------------------------------
_WILDCARD = re.compile(r"[*?\[]")


def is_corrupted(name: str) -> bool:
    """ModelOpt 0.47's export rewrites its own sentinel (`"lm_head.\\u0000backbone.pt_name_sentinel"`)."""
    return "\x00" in name or "pt_name_sentinel" in name


def variants(name: str, is_omni: bool) -> list[str]:
    """The spellings of a declared name in the hub layout: `model.` -> `backbone.` (TensorRT-LLM's rewrite),
    and inside an Omni checkpoint the language model's names with and without `language_model.`."""
    return names.hub_spellings(name, is_omni, omni.component_of)


@dataclass
class Names:
    """The modules and tensors of a checkpoint, for resolving declared names (exact or wildcard)."""

    tensors: list[str]
    is_omni: bool

    @cached_property
    def modules(self) -> set[str]:
        """Every module path: each tensor's owner and all of its ancestors."""
        out: set[str] = set()
        for t in self.tensors:
            parts = t.split(".")
            for k in range(1, len(parts)):
                out.add(".".join(parts[:k]))
        return out

    @cached_property
    def _everything(self) -> set[str]:
        return self.modules | set(self.tensors)

    @cached_property
    def _universe(self) -> list[str]:
        return sorted(self._everything)

    def resolve(self, name: str) -> str | None:
        """The real module or tensor a declared name means (the first one a wildcard matches), or None."""
        if is_corrupted(name):
            return None
        for v in variants(name, self.is_omni):
            if not _WILDCARD.search(v):
                if v in self._everything:
                    return v
                continue
            rx = re.compile(fnmatch.translate(v))
            for n in self._universe:
                if rx.match(n):
                    return n
        return None

    def matcher(self, patterns) -> "Matcher":
        return Matcher([p for p in patterns if isinstance(p, str) and not is_corrupted(p)], self.is_omni)


@dataclass
class Matcher:
    """Does a module fall under any of the declared patterns (exclude_modules / ignore / quantized_layers)? A
    pattern covers a module when it names, or fnmatches, the module or one of its ancestors (engines match
    the module they build: a fused MoE is the `...mixer.experts` module, so `*.mixer.experts` covers every
    expert's projections)."""

    patterns: list[str]
    is_omni: bool

    @cached_property
    def _exact(self) -> dict[str, str]:
        out = {}
        for p in self.patterns:
            for v in variants(p, self.is_omni):
                if not _WILDCARD.search(v):
                    out.setdefault(v, p)
        return out

    @cached_property
    def _wild(self) -> list[tuple[re.Pattern, str]]:
        out = []
        for p in self.patterns:
            for v in variants(p, self.is_omni):
                if _WILDCARD.search(v):
                    out.append((re.compile(fnmatch.translate(v)), p))
        return out

    def match(self, module: str) -> str | None:
        """The declared pattern that covers `module`, or None."""
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            hit = self._exact.get(".".join(parts[:k]))
            if hit is not None:
                return hit
        for rx, p in self._wild:
            if any(rx.match(".".join(parts[:k])) for k in range(len(parts), 0, -1)):
                return p
        return None


def format_of(algo: str | None) -> str:
    """A declared algorithm's weight format: None -> `bf16`, FP8 -> `fp8`, NVFP4 (and W4A*) -> `nvfp4`, an
    unknown algorithm -> itself."""
    if algo is None:
        return "bf16"
    return ALGO_FORMATS[algo][0] if algo in ALGO_FORMATS else algo


def repaired(name: str) -> str:
    """A corrupted name's module: `backbone.layers.1.mixer.experts.\\x00backbone.pt_name_sentinel` ->
    `backbone.layers.1.mixer.experts`."""
    return name.split("\x00")[0].rstrip(".") if is_corrupted(name) else name


# ----- which format is module M in, in this checkpoint -----------------------------------------------------
@dataclass
class Reading:
    """The one answer to "which algorithm does this checkpoint declare for module M" (validate, lint, build and
    the model card all ask it), as an engine resolves it:

    - MIXED_PRECISION: the `quantized_layers` entry naming M or one of its ancestors (ModelOpt lists fused
      experts once, as `...mixer.experts`), exact or fnmatch wildcard, in any spelling `variants` knows;
      a module no entry covers is BF16.
    - one quant_algo: BF16 when an `exclude_modules` / `ignore` pattern covers M (its name or an ancestor's,
      or an fnmatch of it), else the quant_algo for a module the engine builds as a quantizable linear layer
      (`covered`; by default the names in `linears`), else BF16.

    `repair=True` reads ModelOpt 0.47's corrupted sentinel names as the modules they were meant to name (what
    validate does, with a warning); by default they match nothing, as in every engine (what lint and build
    report)."""

    declarations: list[Declaration]
    is_omni: bool
    linears: frozenset[str] = frozenset()

    @property
    def declared(self) -> Declaration | None:
        """The declaration engines read first (hf_quant_config.json, else config.json's)."""
        return self.declarations[0] if self.declarations else None

    def _matcher(self, names, repair: bool) -> tuple[Matcher, dict[str, str]]:
        back: dict[str, str] = {}
        for n in names:
            if not isinstance(n, str) or (is_corrupted(n) and not repair):
                continue
            back.setdefault(repaired(n), n)
        return Matcher(list(back), self.is_omni), back

    @cached_property
    def _matchers(self) -> dict[tuple[str, bool], tuple[Matcher, dict[str, str]]]:
        d = self.declared
        out = {}
        for repair in (False, True):
            out["layers", repair] = self._matcher(d.quantized_layers if d else (), repair)
            out["exclude", repair] = self._matcher(d.exclude_modules if d else (), repair)
        return out

    def _match(self, which: str, module: str, repair: bool) -> str | None:
        matcher, back = self._matchers[which, repair]
        hit = matcher.match(module)
        return None if hit is None else back[hit]

    def layer_entry(self, module: str, *, repair: bool = False) -> str | None:
        """The `quantized_layers` key (as written) that covers `module`, or None."""
        return self._match("layers", module, repair)

    def excluded_by(self, module: str, *, repair: bool = False) -> str | None:
        """The exclude / ignore pattern (as written) that covers `module`, or None."""
        return self._match("exclude", module, repair)

    def algo(self, module: str, *, covered: bool | None = None, repair: bool = False) -> str | None:
        """The declared algorithm of `module` (upper case), None for BF16."""
        d = self.declared
        if d is None or d.quant_algo is None:
            return None
        if d.is_mixed:
            entry = self.layer_entry(module, repair=repair)
            return None if entry is None else d.layer_algo(d.quantized_layers[entry])
        if self.excluded_by(module, repair=repair) is not None:
            return None
        if covered is None:
            covered = module in self.linears
        return d.quant_algo if covered else None

    def format(self, module: str, **kw) -> str:
        """`bf16`, `fp8`, `nvfp4`, or the declared algorithm when omniq does not know it."""
        return format_of(self.algo(module, **kw))

    def corrupted(self) -> dict[str, list[str]]:
        """ModelOpt's corrupted sentinel names, per list (`quantized_layers`, `exclude_modules`)."""
        d = self.declared
        if d is None:
            return {"quantized_layers": [], "exclude_modules": []}
        return {"quantized_layers": [n for n in d.quantized_layers if is_corrupted(n)],
                "exclude_modules": [n for n in d.exclude_modules if isinstance(n, str) and is_corrupted(n)]}


def engine_linears(arch) -> frozenset[str]:
    """The modules an engine quantizes with a checkpoint's one quant_algo: the language model's linear layers
    but lm_head (TensorRT-LLM builds lm_head without a QuantConfig; vLLM and SGLang load it as an embedding)."""
    return frozenset(lin.name for lin in arch.linears if lin.role != "lm_head")


def reading(path: Path, cfg: dict, linears=(), *, is_omni: bool | None = None) -> Reading:
    """The checkpoint's declarations (`read`) as a `Reading`; `linears`: the modules its engine quantizes
    with the checkpoint's one quant_algo (the language model's linear layers but lm_head, in hub names)."""
    return Reading(read(path, cfg), omni.is_omni(cfg) if is_omni is None else is_omni, frozenset(linears))


def of_quantization(quantization: dict | None, is_omni: bool, linears=()) -> Reading:
    """A `Reading` of one declaration dict, either shape (what `Checkpoint.quantization` holds)."""
    decls = [parse(quantization, HF_QUANT_CONFIG if isinstance(quantization.get("quantization"), dict)
                   else CONFIG_QUANT)] if isinstance(quantization, dict) and quantization else []
    return Reading(decls, is_omni, frozenset(linears))
