"""Pass / fail thresholds for `omniq validate`, from this model's noise floor measured in this run.

**The noise floor** is what a lossless deployment of the BF16 reference already costs: the same BF16 weights
run as a BF16 engine runs them (every linear layer's input, weight and output rounded to bfloat16 with fp32
accumulation, K and V kept in bfloat16; `artifact.bf16_compute_hooks`), compared with omniq's float32
forward of those weights, on the same rows as the candidate. Every validate run measures it (per modality
on Omni checkpoints) unless `--no-noise-floor`; then the floor measured on the bundled model stands in
(`BUNDLED_FLOOR`, `source: constant`).

**From floor to gates** (`from_floor`), with one multiplier k per format:

    max_kl        = k * KL_floor
    min_top1      = 1 - sqrt(k) * D_floor          D_floor = max(top-1 disagreement, 0.7 sqrt(KL_floor))
    max_ppl_ratio = 1 + k * E_floor                E_floor = max(|ppl ratio - 1|, KL_floor)

Top-1 disagreement grows like the square root of the KL (bundled model: fp8 KL 15x the floor's,
disagreement 3.8x; nvfp4 98x and 10.4x), and the perplexity excess like the KL itself (for small
perturbations the expected log-likelihood change is the KL); the floor's own perplexity excess is often 0 to
four digits, so the KL stands in for it. D_floor's second term keeps a floor measured on few tokens (where
disagreement may be 0) from giving an impossible top-1 gate (0.7 = 1.1 % / sqrt(2.4e-4) on the bundled model).

**Multipliers** (`MULTIPLIERS`), from `benchmarks/gate_cases.py` (16 x 256 tokens of the bundled `eval`,
floor KL 1.5e-4; and a random non-square NemotronH, floor KL 3.2e-2): each format's honest artifacts sit at
about a third to a half of their KL gate on the bundled model, and every broken case fails (by the KL or
by the per-layer signals below; the figures are in docs/trust.md section 5):

    fp8    60   honest fp8 KL 21x floor (bundled), 12x (random non-square)
    nvfp4  300  honest nvfp4 KL 140x floor (bundled; most of it from the Mamba and attention projections), 45x
    mixed  80   NVFP4 only in the routed experts, FP8 / BF16 elsewhere (NVIDIA's Omni NVFP4 layout): honest
                26x floor (bundled), 18x. A mix with NVFP4 outside the routed experts is gated as `nvfp4`
                (`gate_format`), since that is where NVFP4's loss comes from.
    bf16   4    nothing quantized: rounding only

**Per-layer signal** (`check_layers`): a quantized layer whose weight SQNR against the reference is below
`MIN_LAYER_SQNR_DB` for its format fails the artifact, naming it. E4M3 with a per-tensor scale gives about
31 dB on Gaussian-like weights (26-28 dB for a k_proj re-rounded to the fused QKV scale), E2M1 in 16-blocks
about 20 dB; the minimum is 12 dB under that. A zeroed expert is 0 dB, swapped or transposed experts about
-3 to 0 dB, weight scales x4 -9.5 dB: the aggregate KL can hide one broken expert out of many (an NVFP4
artifact with expert 2 zeroed in every MoE layer passed the old constant gate with KL 1.36e-2), the layer
gate does not.

**Overrides**: `--gates FILE.yaml` (`load_file`: per format, per modality, also the multiplier and the
layer minimum) and `--max-kl` / `--min-top1` / `--max-ppl-ratio` (these win). `Gates.source` says which.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from omniq.errors import OmniqError

FORMATS = ("bf16", "fp8", "nvfp4", "mixed")
MODALITIES = ("text", "image", "audio")
GATE_KEYS = ("max_kl", "min_top1", "max_ppl_ratio")
FLOOR_KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")
METRIC_KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens")

# The floor measured on the bundled model (benchmarks/validate_figures.py, 64 x 256 tokens, worse of eval /
# eval2), used when the run measures none (--no-noise-floor).
BUNDLED_FLOOR = {"kl_mean": 2.43e-4, "kl_p95": 2.0e-4, "top1_agreement": 0.9891, "ppl_ratio": 1.0002,
                 "tokens": 16384}
MULTIPLIERS = {"bf16": 4.0, "fp8": 60.0, "nvfp4": 300.0, "mixed": 80.0}
TOP1_PER_SQRT_KL = 0.7
KL_FLOOR_MIN = 1e-6            # a floor below this (identical forwards) is taken as this
# A floor measured on fewer tokens than this (a quick smoke run: --samples 2 --seq-len 64) is too noisy to gate
# on alone: it is taken as at least the bundled model's floor (source "floor (few tokens) ...").
MIN_FLOOR_TOKENS = 200
MIN_LAYER_SQNR_DB = {"fp8": 19.0, "nvfp4": 8.0}
KV_UTILIZATION = (0.25, 4.0)   # |K| or |V| amax on the evaluation rows / (448 x its scale), allowed range


@dataclass(frozen=True)
class Gates:
    max_kl: float            # mean KL(ref || cand) per token, nats
    min_top1: float          # top-1 agreement, fraction
    max_ppl_ratio: float     # perplexity(candidate) / perplexity(reference)
    source: str = "floor"    # "floor", "constant" (no floor measured), with "+ FILE" / "+ overrides [...]"
    multiplier: float | None = None
    floor: dict | None = None
    min_layer_sqnr_db: dict = field(default_factory=lambda: dict(MIN_LAYER_SQNR_DB))

    def as_dict(self) -> dict:
        return asdict(self)


def gate_format(candidate) -> str:
    """The format whose gates apply: the candidate's, except that a mix with NVFP4 outside the routed
    experts is gated as `nvfp4` (`candidate`: an `artifact.Artifact`)."""
    fmt = candidate.format
    if fmt != "mixed":
        return fmt
    roles = {lin.name: lin.role for lin in candidate.arch.linears}
    if any(layer.weight_format == "nvfp4" and not str(roles.get(name, "")).startswith("expert_")
           for name, layer in candidate.quantized.items()):
        return "nvfp4"
    return "mixed"


def from_floor(floor: dict | None, fmt: str, overrides: dict | None = None) -> Gates:
    """Gates for a `fmt` candidate from a noise floor (a dict with `FLOOR_KEYS`; None: `BUNDLED_FLOOR`,
    source "constant"). `overrides`: {"multiplier", "min_layer_sqnr_db": {fmt: dB}, "max_kl", "min_top1",
    "max_ppl_ratio", "source"} (any subset; gate values replace the derived ones)."""
    if fmt not in MULTIPLIERS:
        raise OmniqError(f"no gates for format {fmt!r}; known: {', '.join(FORMATS)}")
    o = dict(overrides or {})
    source = "floor" if floor is not None else "constant"
    if floor is not None and (floor.get("tokens") or 0) < MIN_FLOOR_TOKENS:
        floor, source = at_least(floor, BUNDLED_FLOOR), "floor (few tokens: at least the bundled floor)"
    floor = dict(BUNDLED_FLOOR if floor is None else floor)
    k = float(o.pop("multiplier", None) or MULTIPLIERS[fmt])
    kl0 = max(float(floor["kl_mean"]), KL_FLOOR_MIN)
    d0 = max(1.0 - float(floor["top1_agreement"]), TOP1_PER_SQRT_KL * math.sqrt(kl0))
    e0 = max(abs(float(floor["ppl_ratio"]) - 1.0), kl0)
    g = Gates(max_kl=float(f"{k * kl0:.3g}"), min_top1=round(max(0.0, 1.0 - math.sqrt(k) * d0), 4),
              max_ppl_ratio=round(1.0 + k * e0, 4), source=source, multiplier=k,
              floor={key: floor.get(key) for key in FLOOR_KEYS})
    layer_min = o.pop("min_layer_sqnr_db", None)
    if layer_min:
        g = replace(g, min_layer_sqnr_db={**g.min_layer_sqnr_db, **layer_min})
    extra = o.pop("source", None)
    values = {key: float(o.pop(key)) for key in GATE_KEYS if o.get(key) is not None}
    if o:
        raise OmniqError(f"unknown gate override {sorted(o)[0]!r}")
    if values:
        g = replace(g, **values)
    if extra:
        g = replace(g, source=f"{g.source} + {extra}")
    return g


def at_least(floor: dict | None, base: dict | None) -> dict | None:
    """A modality's floor, never below `base` (the text set's): a media set scores few caption tokens, often
    near-deterministic ones (image captions of the bundled model: floor KL 5e-5 and no top-1 disagreement on
    84 tokens), so its own floor alone would gate on noise; the engine's rounding noise is the same."""
    if floor is None or base is None:
        return floor if base is None else base
    ppl = max((floor["ppl_ratio"], base["ppl_ratio"]), key=lambda r: abs(r - 1.0))
    return {**floor, "kl_mean": max(floor["kl_mean"], base["kl_mean"]), "ppl_ratio": ppl,
            "top1_agreement": min(floor["top1_agreement"], base["top1_agreement"])}


def gates_for(fmt: str, *, max_kl: float | None = None, min_top1: float | None = None,
              max_ppl_ratio: float | None = None) -> Gates:
    """The constant gates (the bundled model's floor) with the user's overrides."""
    flags = {k: v for k, v in (("max_kl", max_kl), ("min_top1", min_top1), ("max_ppl_ratio", max_ppl_ratio))
             if v is not None}
    return from_floor(None, fmt, {**flags, **({"source": f"overrides {sorted(flags)}"} if flags else {})})


DEFAULTS = {fmt: gates_for(fmt) for fmt in MULTIPLIERS}


def check(metrics: dict, gates: Gates) -> list[str]:
    """The gates that failed, each as one readable line (empty when all passed)."""
    failures = []
    if not metrics["kl_mean"] <= gates.max_kl:
        failures.append(f"kl_mean {metrics['kl_mean']:.3g} > max_kl {gates.max_kl:.3g}")
    if not metrics["top1_agreement"] >= gates.min_top1:
        failures.append(f"top1_agreement {metrics['top1_agreement']:.4f} < min_top1 {gates.min_top1:.4f}")
    if not metrics["ppl_ratio"] <= gates.max_ppl_ratio:
        failures.append(f"ppl_ratio {metrics['ppl_ratio']:.4f} > max_ppl_ratio {gates.max_ppl_ratio:.4f}")
    return failures


def check_layers(sqnr: dict[str, float], formats: dict[str, str], gates: Gates) -> list[str]:
    """One line per quantized layer whose weight SQNR is below its format's minimum (worst first, at most 5
    named, then a count)."""
    bad = sorted((db, name) for name, db in sqnr.items()
                 if formats.get(name) in gates.min_layer_sqnr_db and db is not None
                 and not db >= gates.min_layer_sqnr_db[formats[name]])
    out = [f"layer {name} ({formats[name]}) weight SQNR {db:.1f} dB < min_layer_sqnr_db "
           f"{gates.min_layer_sqnr_db[formats[name]]:g}" for db, name in bad[:5]]
    if len(bad) > 5:
        out.append(f"... and {len(bad) - 5} more layers below their format's minimum SQNR")
    return out


def recording_kv(kv, amax: dict):
    """Wrap a forward's K / V hook so that it also records the largest |K| and |V| per layer in `amax`."""
    def hook(layer: int, which: str, t):
        key = (layer, which)
        amax[key] = max(amax.get(key, 0.0), t.abs().max().item())
        return kv(layer, which, t)

    return hook


def check_kv(amax: dict, scales: dict, lo: float = KV_UTILIZATION[0], hi: float = KV_UTILIZATION[1]) -> list[str]:
    """One line per FP8 KV scale that does not fit the K / V values of the evaluation rows: far too large
    (values crushed into the lowest binades: a k_scale x8 barely moves the KL on small models, but it is not
    the scale the calibration measured) or far too small (values clipped). `scales`: layer -> {"k", "v"}."""
    out = []
    for (layer, which), a in sorted(amax.items()):
        s = scales.get(layer, {}).get(which)
        if s is None:
            continue
        use = a / (448.0 * float(s))
        if not lo <= use <= hi:
            what = "larger" if use < lo else "smaller"
            out.append(f"layer {layer} {which}_scale is {max(use, 1 / use) if use > 0 else float('inf'):.1f}x "
                       f"{what} than its {which.upper()} values on the evaluation rows need (|{which.upper()}| "
                       f"max {a:.3g}, scale x 448 = {448 * float(s):.3g})")
    return out


def side_by_side(metrics: dict, floor: dict | None, gates: Gates) -> list[dict]:
    """[{metric, floor, gate, value, passed}] for the report and the terminal table."""
    rows = []
    for key, gate_key, ok in (("kl_mean", "max_kl", lambda v, g: v <= g),
                              ("top1_agreement", "min_top1", lambda v, g: v >= g),
                              ("ppl_ratio", "max_ppl_ratio", lambda v, g: v <= g)):
        g = getattr(gates, gate_key)
        rows.append({"metric": key, "floor": None if floor is None else floor.get(key), "gate": g,
                     "value": metrics[key], "passed": bool(ok(metrics[key], g))})
    return rows


def section(label: str, metrics: dict, floor: dict | None, gates: Gates) -> dict:
    """The report entry of one evaluation set (a media modality, a reasoning split): its metrics, this run's
    floor on it, its gates side by side, and its failures prefixed with `label`."""
    failures = [f"{label}: {f}" for f in check(metrics, gates)]
    return {**{k: metrics[k] for k in METRIC_KEYS}, "passed": not failures, "gates": gates.as_dict(),
            "noise_floor": floor, "gate_table": side_by_side(metrics, floor, gates), "failures": failures}


# ----- --gates FILE.yaml ---------------------------------------------------------------------------------
LENGTH_KEYS = ("min_length_ratio", "max_length_ratio")
DEFAULT_LENGTH_RATIO = (0.85, 1.15)      # --generate: candidate / reference mean generated length, default band
FILE_FORMAT_KEYS = ("multiplier", "min_layer_sqnr_db", *GATE_KEYS, *LENGTH_KEYS, *MODALITIES)


def _number(v, where: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise OmniqError(f"{where}: {v!r} is not a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise OmniqError(f"{where}: {v!r} is impossible (must be {'>' if lo_open else '>='} {lo:g})")
    if hi is not None and v > hi:
        raise OmniqError(f"{where}: {v!r} is impossible (must be <= {hi:g})")
    return float(v)


def _gate_values(d, where: str) -> dict:
    out = {}
    for key, v in d.items():
        w = f"{where}.{key}"
        if key == "max_kl":
            out[key] = _number(v, w, 0.0, lo_open=True)
        elif key == "min_top1":
            out[key] = _number(v, w, 0.0, 1.0)
        elif key == "max_ppl_ratio":
            out[key] = _number(v, w, 1.0)
    return out


def load_file(path: str | os.PathLike) -> dict:
    """A team's gates: {format: {multiplier, min_layer_sqnr_db, max_kl / min_top1 / max_ppl_ratio (every
    modality), text / image / audio: {max_kl, min_top1, max_ppl_ratio}}}. Unknown keys and impossible values
    raise OmniqError (exit 2). Returns {"path", "formats": {fmt: {...}}}."""
    import yaml

    p = Path(path).expanduser()
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise OmniqError(f"--gates {path}: cannot read it ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OmniqError(f"--gates {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise OmniqError(f"--gates {path}: expected a mapping of format -> gates ({', '.join(FORMATS)})")
    formats = {}
    for fmt, body in raw.items():
        if fmt not in FORMATS:
            raise OmniqError(f"--gates {path}: unknown format {fmt!r}; use {', '.join(FORMATS)}")
        if not isinstance(body, dict):
            raise OmniqError(f"--gates {path}: {fmt} must be a mapping of gate -> value")
        unknown = [k for k in body if k not in FILE_FORMAT_KEYS]
        if unknown:
            raise OmniqError(f"--gates {path}: unknown key {fmt}.{unknown[0]}; use {', '.join(FILE_FORMAT_KEYS)}")
        out: dict = _gate_values({k: v for k, v in body.items() if k in GATE_KEYS}, f"{fmt}")
        for key in LENGTH_KEYS:
            if key in body:
                out[key] = _number(body[key], f"{fmt}.{key}", 0.0, lo_open=True)
        if out.get("min_length_ratio", 0) > out.get("max_length_ratio", float("inf")):
            raise OmniqError(f"--gates {path}: {fmt}.min_length_ratio is above {fmt}.max_length_ratio")
        if "multiplier" in body:
            out["multiplier"] = _number(body["multiplier"], f"{fmt}.multiplier", 0.0, lo_open=True)
        if "min_layer_sqnr_db" in body:
            v = body["min_layer_sqnr_db"]
            if isinstance(v, dict):
                bad = [k for k in v if k not in MIN_LAYER_SQNR_DB]
                if bad:
                    raise OmniqError(f"--gates {path}: unknown key {fmt}.min_layer_sqnr_db.{bad[0]}; use "
                                     f"{', '.join(MIN_LAYER_SQNR_DB)}")
                out["min_layer_sqnr_db"] = {k: _number(x, f"{fmt}.min_layer_sqnr_db.{k}", -100.0, 200.0)
                                            for k, x in v.items()}
            else:
                db = _number(v, f"{fmt}.min_layer_sqnr_db", -100.0, 200.0)
                out["min_layer_sqnr_db"] = {k: db for k in MIN_LAYER_SQNR_DB}
        for m in MODALITIES:
            if m not in body:
                continue
            if not isinstance(body[m], dict):
                raise OmniqError(f"--gates {path}: {fmt}.{m} must be a mapping of gate -> value")
            bad = [k for k in body[m] if k not in GATE_KEYS + LENGTH_KEYS]
            if bad:
                raise OmniqError(f"--gates {path}: unknown key {fmt}.{m}.{bad[0]}; use "
                                 f"{', '.join(GATE_KEYS + LENGTH_KEYS)}")
            out[m] = _gate_values(body[m], f"{fmt}.{m}")
            for key in LENGTH_KEYS:          # --generate's gate for this modality's prompts
                if key in body[m]:
                    out[m][key] = _number(body[m][key], f"{fmt}.{m}.{key}", 0.0, lo_open=True)
        formats[fmt] = out
    return {"path": str(p), "formats": formats}


def overrides_for(gates_file: dict | None, fmt: str, modality: str, flags: dict | None = None) -> dict:
    """The overrides `from_floor` takes for one format and modality: the file's format-wide values, its
    modality's, then the command-line flags (each later one wins)."""
    o: dict = {}
    sources = []
    body = (gates_file or {}).get("formats", {}).get(fmt)
    if body:
        o.update({k: v for k, v in body.items() if k not in MODALITIES and k not in LENGTH_KEYS})
        o.update({k: v for k, v in (body.get(modality) or {}).items() if k not in LENGTH_KEYS})
        sources.append(Path(gates_file["path"]).name)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if flags:
        o.update(flags)
        sources.append(f"overrides {sorted(flags)}")
    if sources:
        o["source"] = " + ".join(sources)
    return o


def length_ratio_for(gates_file: dict | None, fmt: str, modality: str = "text") -> tuple[float, float]:
    """`--generate`'s gate on the mean generated length ratio candidate / reference for a format and the
    prompts of one modality: the file's `<fmt>.<modality>` value, else its `<fmt>` one, else the default."""
    body = (gates_file or {}).get("formats", {}).get(fmt) or {}
    own = body.get(modality) or {}
    lo, hi = (own.get(k, body.get(k, d)) for k, d in zip(LENGTH_KEYS, DEFAULT_LENGTH_RATIO))
    if lo > hi:
        raise OmniqError(f"--gates {gates_file['path']}: {fmt}.{modality} gives min_length_ratio {lo:g} above "
                         f"max_length_ratio {hi:g}")
    return lo, hi


if __name__ == "__main__":      # the default gates at the bundled model's floor (README)
    for _fmt in ("fp8", "mixed", "nvfp4", "bf16"):
        _g = DEFAULTS[_fmt]
        print(f"{_fmt:6s} max_kl {_g.max_kl:.3g}  min_top1 {100 * _g.min_top1:.1f} %  max_ppl_ratio {_g.max_ppl_ratio}")
