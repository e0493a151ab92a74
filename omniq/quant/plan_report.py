"""What `omniq plan` shows: the layer plan of a recipe on a model, its sizes and its calibration memory.

The model comes from a `config.json` file, a directory holding only a config (sizes from shapes), a
checkpoint directory (tensor sizes of everything the language model's config does not describe, such as
an Omni checkpoint's towers, are read from the safetensors headers; no tensor is loaded), or a bundled
name. Nothing here imports torch, so a config-only plan takes well under a second.

The decision of what is quantized is `omniq.quant.plan.make_plan`, the same call `quantize` makes; this
module only reads the plan and arranges it for people (`render`) and machines (`summarize`, `--json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omniq import __version__
from omniq.errors import OmniqError
from omniq.model import omni
from omniq.model.arch import ATTENTION, KIND_NAMES, MAMBA, MLP, MOE, Arch
from omniq.model.checkpoint import Checkpoint, arch_of, bundled_names, open_checkpoint, resolve
from omniq.quant import memory as mem
from omniq.quant import recipe as recipes
from omniq.quant.plan import LayerPlan, make_plan

GiB = 1024 ** 3
GB = 1000 ** 3
TOWERS_UNKNOWN = "unknown without weights"
CALIB_SEQ_LEN = 256          # `omniq quantize --calib-seq-len` default (a test keeps them equal)
QUANTIZE_SAMPLES = 64        # `omniq quantize --calib-samples` default


@dataclass
class ModelSource:
    """The model a plan is made for, and what is known about its tensors without loading them."""

    label: str                           # what the user typed
    path: Path
    kind: str                            # "config" (shapes only) | "checkpoint" (safetensors headers read)
    config: dict
    arch: Arch
    is_omni: bool
    checkpoint: Checkpoint | None = None

    @property
    def passthrough_bytes(self) -> dict[str, int] | None:
        """Bytes of the tensors the language model's config does not describe (an Omni checkpoint's towers
        and projectors, or extra tensors of a text checkpoint), by component, from the headers; None
        without weights."""
        if self.checkpoint is None:
            return None
        lm = self.arch.tensor_by_name
        out: dict[str, int] = {}
        for name, info in self.checkpoint.headers.items():
            if name in lm:
                continue
            comp = omni.component_of(name) if self.is_omni else "other"
            out[comp] = out.get(comp, 0) + info.nbytes
        return out

    @property
    def stored_bytes(self) -> int | None:
        return None if self.checkpoint is None else self.checkpoint.total_bytes


def _read_config_file(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise OmniqError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise OmniqError(f"{path}: expected a JSON object")
    return cfg


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))


def open_source(name_or_path: str) -> ModelSource:
    """A config.json file, a directory (config only, or a checkpoint), or a bundled name."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        cfg = _read_config_file(p)
        arch, is_omni = arch_of(cfg)
        return ModelSource(str(name_or_path), p.resolve(), "config", cfg, arch, is_omni)
    if p.is_dir() or name_or_path in bundled_names():
        path = resolve(str(name_or_path))
        if not (path / "config.json").is_file():
            raise OmniqError(f"{path}: no config.json; pass a config.json file or a checkpoint directory")
        if not _has_weights(path):
            cfg = _read_config_file(path / "config.json")
            arch, is_omni = arch_of(cfg)
            return ModelSource(str(name_or_path), path, "config", cfg, arch, is_omni)
        ckpt = open_checkpoint(str(path))
        return ModelSource(str(name_or_path), path, "checkpoint", ckpt.config, ckpt.arch, ckpt.is_omni, ckpt)
    names = ", ".join(bundled_names()) or "none"
    raise OmniqError(f"{name_or_path}: no such config file, directory or bundled model ({names})")


# ----- compact display of module lists ---------------------------------------------------------------------
def _format_ints(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:
        return str(values[0])
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            a, b = values[start], values[i - 1]
            runs.append(f"{a}..{b}" if i - start >= 3 else ",".join(map(str, values[start:i])))
            start = i
    return "{" + ",".join(runs) + "}"


def group_names(names: list[str]) -> list[tuple[str, int]]:
    """Collapse module names into patterns, keeping first-seen order:
    `backbone.layers.{4,11,18}.mixer.{in_proj,out_proj}`, `backbone.layers.{1,3}.mixer.experts.{0..127}.up_proj`.
    Returns (pattern, number of names it stands for)."""
    # entries: [tokens, count]; a token is a str or a tuple of ints
    entries: list[list] = []
    for name in names:
        entries.append([tuple(int(t) if t.isdigit() else t for t in name.split(".")), 1])

    def merge(entries, pos_ok, combine):
        """Merge entries equal everywhere except at one position that pos_ok accepts, rightmost first."""
        width = max((len(e[0]) for e in entries), default=0)
        for k in range(width - 1, -1, -1):
            merged: dict[tuple, list] = {}
            order = []
            for toks, n in entries:
                if k < len(toks) and pos_ok(toks[k]):
                    key = (len(toks), k, toks[:k] + toks[k + 1:])
                    if key in merged:
                        merged[key][0].append(toks[k])
                        merged[key][1] += n
                        continue
                    merged[key] = [[toks[k]], n, toks]
                    order.append(("m", key))
                else:
                    order.append(("e", (toks, n)))
            entries = []
            for tag, item in order:
                if tag == "e":
                    entries.append(list(item))
                else:
                    vals, n, toks = merged[item]
                    entries.append([toks[:k] + (combine(vals),) + toks[k + 1:], n])
        return entries

    def is_int(t):
        return isinstance(t, (int, tuple))

    def ints(vals):
        out = []
        for v in vals:
            out += list(v) if isinstance(v, tuple) else [v]
        return tuple(sorted(set(out)))

    entries = merge(entries, is_int, ints)

    def text(toks):
        return ".".join(_format_ints(list(t) if isinstance(t, tuple) else [t]) if is_int(t) else t for t in toks)

    # then names that differ only in their last part: mixer.{q_proj,k_proj,v_proj,o_proj}
    groups: dict[str, list] = {}
    for toks, n in entries:
        if len(toks) == 1:
            groups[text(toks) + "\0"] = [[], n]        # a one-part name stands alone
            continue
        head = text(toks[:-1])
        tails, count = groups.setdefault(head, [[], 0])
        tails.append(text(toks[-1:]))
        groups[head][1] = count + n
    out = []
    for head, (tails, n) in groups.items():
        if not tails:
            out.append((head[:-1], n))
        elif len(tails) == 1:
            out.append((f"{head}.{tails[0]}", n))
        else:
            out.append((f"{head}.{{{','.join(tails)}}}", n))
    return out


# ----- the summary ---------------------------------------------------------------------------------------
def _size(nbytes: int | None) -> dict | None:
    if nbytes is None:
        return None
    return {"bytes": nbytes, "GiB": round(nbytes / GiB, 3), "GB": round(nbytes / GB, 3)}


def layout_text(arch: Arch) -> str:
    counts = [f"{len(arch.layers_of(k))} {KIND_NAMES[k]}" for k in (MAMBA, MOE, ATTENTION, MLP) if arch.layers_of(k)]
    return f"{arch.num_layers} layers ({', '.join(counts)}), pattern {arch.pattern}"


def make(source: ModelSource, recipe_name: str, *, kv_cache: str | None = None, batch: int | None = None,
         seq_len: int | None = None, device: str = "cpu", device_memory: str | None = None,
         tower_bytes: str | None = None, dtype: str = "bf16") -> tuple[LayerPlan, dict]:
    """The plan of `recipe_name` on `source`, and its summary (what `--json` prints). Batch and sequence
    length default to what `omniq quantize` calibrates with."""
    from omniq.quant.calibrate import BATCH_SIZE

    batch = BATCH_SIZE if batch is None else batch
    seq_len = CALIB_SEQ_LEN if seq_len is None else seq_len
    recipe = recipes.load(recipe_name).with_kv_cache(kv_cache)
    plan = make_plan(source.arch, recipe)
    return plan, summarize(source, plan, batch=batch, seq_len=seq_len, device=device,
                           device_memory=device_memory, tower_bytes=tower_bytes, dtype=dtype)


def summarize(source: ModelSource, plan: LayerPlan, *, batch: int = 4, seq_len: int = CALIB_SEQ_LEN,
              device: str = "cpu", device_memory: str | None = None, tower_bytes: str | None = None,
              dtype: str = "bf16") -> dict:
    arch = plan.arch
    warnings = list(plan.warnings)
    passthrough = source.passthrough_bytes
    towers_note = None
    if passthrough is not None:
        extra = sum(passthrough.values())
        if tower_bytes is not None:
            warnings.append("--tower-bytes ignored: the checkpoint's own tower sizes are read from its headers")
    elif tower_bytes is not None:
        if not source.is_omni:
            raise OmniqError("--tower-bytes applies to Omni checkpoints only; this config has no towers")
        extra = mem.parse_size(tower_bytes)
        passthrough = {"towers (given)": extra}
    elif source.is_omni:
        extra = None
        towers_note = f"towers: {TOWERS_UNKNOWN} (pass --tower-bytes, e.g. 2.7GiB, or plan the checkpoint directory)"
    else:
        extra = 0
    if source.checkpoint is not None and source.checkpoint.is_quantized:
        warnings.append(f"{source.path} is already quantized; the plan describes quantizing its BF16 original "
                        "(language-model sizes from the config's shapes)")

    lm_bytes = plan.total_bytes
    by_fmt = plan.bytes_by_format
    params_by_fmt = {f: sum(lin.params for lin in plan.linears(f)) for f in plan.counts}
    estimate = mem.estimate(plan, batch=batch, seq_len=seq_len, device=device, device_memory=device_memory,
                            dtype=dtype, extra_weight_bytes=extra)
    producer = {"name": "omniq", "version": __version__}
    recipe = plan.recipe
    return {
        "source": {"input": source.label, "path": str(source.path), "kind": source.kind,
                   "omni": source.is_omni, "stored_bytes": source.stored_bytes},
        "model": {"layout": layout_text(arch), "pattern": arch.pattern, "prefix": arch.prefix,
                  "attention_layers": arch.attention_layers,
                  "mamba_feeding_attention": arch.mamba_feeding_attention,
                  "params": arch.num_params, "params_by_component": arch.params_by_component()},
        "recipe": {**recipe.as_dict(), "source": recipe.source,
                   "rules_decide": plan.rule_counts},
        "quant_algo": plan.quant_algo,
        "kv_cache": plan.kv_cache,
        "layers": {**plan.counts, "total": len(arch.linears)},
        "params_by_format": params_by_fmt,
        "bytes_by_format": dict(by_fmt),
        "size": {
            "language_model": _size(lm_bytes),
            "language_model_bf16": _size(plan.original_bytes),
            "towers": _size(extra) if source.is_omni else None,
            "passthrough_by_component": passthrough,
            "total": _size(lm_bytes + extra) if extra is not None else None,
        },
        "towers_note": towers_note,
        "bits_per_weight": round(plan.bits_per_weight, 4),
        "memory": estimate.as_dict(),
        # what `omniq quantize` (layer-streamed) peaks at, with its default calibration set of this seq_len
        "memory_streamed": mem.streamed_estimate(
            plan, samples=QUANTIZE_SAMPLES, seq_len=seq_len, batch=batch, device=device,
            algorithms={lin.name: recipe.algorithm_of(lin, arch) for lin in plan.quantized},
            activation=recipe.activation_calibration, compensation=recipe.compensation.name != "none").as_dict(),
        "hf_quant_config": plan.hf_quant_config(producer),
        "formats": dict(plan.formats),
        "warnings": warnings,
    }


# ----- rendering -----------------------------------------------------------------------------------------
def _gib(nbytes: int | None) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below (the bundled model is a few MiB)."""
    if nbytes is None:
        return "?"
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 1024 ** 2:.2f} MiB"


def render(summary: dict, *, max_groups: int = 40):
    """Rich renderables for the terminal: the per-format table, the module lists grouped, memory."""
    from rich.table import Table
    from rich.text import Text

    out = []
    s = summary
    recipe = s["recipe"]
    head = Text()
    head.append(f"{s['source']['input']}", style="bold")
    head.append(f"  ({s['source']['kind']}{', Omni' if s['source']['omni'] else ''}): {s['model']['layout']}\n")
    head.append("recipe ", style="bold")
    head.append(f"{recipe['name']}: quant_algo {s['quant_algo'] or 'none'}, "
                f"KV cache {(s['kv_cache'] or 'none').upper()}")
    out.append(head)

    t = Table(title="layer plan", title_justify="left")
    total_params = s["model"]["params"]
    big = s["size"]["language_model"]["bytes"] >= GiB
    binary, decimal, (params_unit, params_div) = (GiB, GB, ("B", 1e9)) if big else (1024 ** 2, 1000 ** 2, ("M", 1e6))
    for col in ("", "layers", "parameters", "GiB" if big else "MiB", "GB" if big else "MB"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label, layers, params, nbytes, **kw):
        t.add_row(label, layers, "" if params is None else f"{params / params_div:.3f} {params_unit}",
                  "?" if nbytes is None else f"{nbytes / binary:.2f}",
                  "?" if nbytes is None else f"{nbytes / decimal:.2f}", **kw)

    for fmt in ("nvfp4", "fp8", "bf16"):
        if s["layers"][fmt]:
            row(f"{fmt} linear", f"{s['layers'][fmt]:,}", s["params_by_format"][fmt], s["bytes_by_format"][fmt])
    row("other tensors", "", total_params - sum(s["params_by_format"].values()), s["bytes_by_format"]["other"])
    size = s["size"]
    row("language model", f"{s['layers']['total']:,}", total_params, size["language_model"]["bytes"], style="bold")
    passthrough = size["passthrough_by_component"]
    if s["source"]["omni"]:
        row("towers", "", None, size["towers"]["bytes"] if size["towers"] else None)
    elif passthrough:
        row("other (passed through)", "", None, sum(passthrough.values()))
    if s["source"]["omni"] or passthrough:
        row("checkpoint", "", None, size["total"]["bytes"] if size["total"] else None, style="bold")
    out.append(t)
    out.append(Text(f"{s['bits_per_weight']:.2f} bits per weight (language model; BF16 "
                    f"{_gib(size['language_model_bf16']['bytes'])}). other tensors: embeddings, norms, Mamba "
                    "conv1d/SSM parameters, router (fp32), KV scales."))

    q = s["hf_quant_config"]["quantization"]
    excl = q["exclude_modules"]
    out.append(_names_block(f"exclude_modules ({len(excl)})", [(p, n, None) for p, n in group_names(excl)],
                            max_groups))
    rows = []
    for fmt in ("nvfp4", "fp8"):
        names = [m for m, f in s["formats"].items() if f == fmt]
        rows += [(p, n, fmt) for p, n in group_names(names)]
    title = "quantized_layers" if "quantized_layers" in q else f"quantized ({s['quant_algo']}, not written per layer)"
    out.append(_names_block(f"{title} ({sum(n for _, n, _ in rows)})", rows, max_groups))

    m = s["memory"]
    parts = m["activation_parts_bytes"]
    mt = Table(title=f"calibration memory, batch {m['batch']} x {m['seq_len']} tokens, {m['dtype']} weights",
               title_justify="left")
    mt.add_column("")
    mt.add_column("size", justify="right")
    mt.add_column("")
    mt.add_row("weights", _gib(m["weights_bytes"]), "" if m["towers_included"] else "towers unknown, not counted")
    mt.add_row("quantizer state", _gib(m["quantizer_state_bytes"]), "amax + largest |weight| temporary")
    mt.add_row("activations", _gib(m["activations_bytes"]),
               "hidden states + largest of: " + ", ".join(f"{k} {_gib(v)}" for k, v in parts.items()
                                                          if k != "hidden_states"))
    mt.add_row("runtime overhead", _gib(m["overhead_bytes"]), "")
    cap = m["device_bytes"]
    verdict = "" if m["fits"] is None else ("fits" if m["fits"] else "does NOT fit")
    extra = f"; {_gib(m['available_bytes'])} available now" if m.get("available_bytes") else ""
    mt.add_row("peak", _gib(m["peak_bytes"]), f"{m['device']}: {_gib(cap)}, {verdict}{extra}", style="bold")
    st = s.get("memory_streamed")
    if st:
        mt.add_row("omniq quantize peak", _gib(st["peak_bytes"]),
                   f"layer-streamed, {st['samples']} x {st['seq_len']} calibration tokens: largest layer "
                   f"{_gib(st['layer_bytes'])} x{st['layer_copies']}, hidden states {_gib(st['hidden_states_bytes'])}",
                   style="bold")
    out.append(mt)
    if s.get("towers_note"):
        out.append(Text(s["towers_note"], style="yellow"))
    for w in s["warnings"]:
        out.append(Text(f"warning: {w}", style="yellow"))
    return out


def _names_block(title: str, rows: list[tuple[str, int, str | None]], max_groups: int):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    t.add_column("pattern", overflow="fold")
    t.add_column("n", justify="right")
    t.add_column("format")
    for pattern, n, fmt in rows[:max_groups]:
        t.add_row(Text(pattern), str(n), fmt or "")
    if len(rows) > max_groups:
        t.add_row(f"... {len(rows) - max_groups} more groups (full list with --json)", "", "")
    return t
