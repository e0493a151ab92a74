"""`omniq validate REFERENCE CANDIDATE`: compare what ships with what it was made from, from the files.

Both checkpoints are read by `artifact.read_artifact` (the candidate dequantized, its activations and KV
cache quantized as an engine would) and run through the same float32 forward (`omniq.model.forward`,
whose Mamba-2 scan is right at any length) on held-out text: documents wrapped `<s> doc </s>`, tokenized
with the reference's tokenizer, concatenated and cut into rows of `seq_len` inputs (plus the next token as
the last target). The report's top-level keys are fixed: `kl_mean`, `kl_p95`, `top1_agreement`,
`ppl_reference`, `ppl_candidate`, `ppl_ratio`, `tokens`, `passed`; the rest (`gates`, `failures`, `format`,
`layers_sqnr`, ...) add detail.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch

from omniq.atomic import write_atomic
from omniq.calib import docstrings
from omniq.errors import OmniqError
from omniq.model import forward
from omniq.validate import binding, gates as gates_mod, generate as generate_mod
from omniq.validate.artifact import (Artifact, bf16_compute_hooks, changed_unquantized, check_same_model,
                                     read_artifact)
from omniq.validate.metrics import Comparison, layers_sqnr

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
BATCH_ROWS = 8

Progress = Callable[[int, int], None]


# ----- evaluation text ------------------------------------------------------------------------------------
def eval_texts(eval_set: str | os.PathLike | None) -> tuple[str, list[str]]:
    """(label, documents): a bundled split name (`eval`, `eval2`, `calib`), a .jsonl file with a "text"
    field per line, or a text file whose documents are separated by blank lines."""
    if eval_set is None:
        eval_set = "eval"
    if str(eval_set) in docstrings.SPLITS and not Path(str(eval_set)).exists():
        if str(eval_set) == "train":
            raise OmniqError("--eval train: the bundled model was trained on it; use eval, eval2 or a file")
        return f"bundled:{eval_set}", list(docstrings.texts(str(eval_set)))
    path = Path(eval_set).expanduser()
    if not path.is_file():
        raise OmniqError(f"--eval {eval_set}: no such file and not a bundled set "
                         "(eval, eval2, calib); pass a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OmniqError(f"--eval {path}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise OmniqError(f"--eval {path}: line {i} is not a JSON object with a \"text\" field") from None
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise OmniqError(f"--eval {path}: no text in it")
    return str(path), docs


def token_rows(tokenizer, docs: Iterable[str], samples: int, seq_len: int) -> torch.Tensor:
    """(rows, seq_len + 1) token ids: `<s> doc </s>` documents concatenated and cut into rows; row r holds
    inputs ids[r*L : r*L+L] and targets shifted by one."""
    if samples < 1 or seq_len < 2:
        raise OmniqError("--samples must be at least 1 and --seq-len at least 2")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    need = samples * seq_len + 1
    ids: list[int] = []
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids += ([bos] if bos is not None else []) + enc + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    rows = min(samples, (len(ids) - 1) // seq_len)
    if rows < 1:
        raise OmniqError(f"evaluation text has {len(ids)} tokens, fewer than one row of --seq-len {seq_len}; "
                         "pass more text or a shorter --seq-len")
    t = torch.tensor(ids[: rows * seq_len + 1], dtype=torch.long)
    return torch.stack([t[r * seq_len: r * seq_len + seq_len + 1] for r in range(rows)])


# ----- the comparison -------------------------------------------------------------------------------------
@torch.inference_mode()
def compare(reference: Artifact, candidate: Artifact, rows: torch.Tensor, *, positions: bool = False,
            progress: Progress | None = None, noise_floor: bool = False) -> dict:
    """Metrics of the candidate against the reference on the given token rows; with `noise_floor`, also
    those of the reference run as a BF16 engine runs it (`bf16_compute_hooks`) on the same rows, as
    `noise_floor`."""
    linear, kv = candidate.linear(), candidate.kv()
    kv_amax: dict = {}
    if kv is not None:
        kv = gates_mod.recording_kv(kv, kv_amax)
    floor_hooks = bf16_compute_hooks(reference.weights) if noise_floor else None
    cmp, floor_cmp = Comparison(), Comparison()
    n = rows.shape[0]
    for start in range(0, n, BATCH_ROWS):
        batch = rows[start: start + BATCH_ROWS]
        x, y = batch[:, :-1], batch[:, 1:]
        ref = forward.logits(reference.arch, reference.weights, x)
        cand = forward.logits(candidate.arch, candidate.weights, x, linear=linear, kv=kv)
        cmp.add(ref, cand, y)
        if floor_hooks is not None:
            floor_cmp.add(ref, forward.logits(reference.arch, reference.weights, x, linear=floor_hooks[0],
                                              kv=floor_hooks[1]), y)
        if progress is not None:
            progress(min(n, start + BATCH_ROWS), n)
    out = cmp.summary(position_buckets=positions)
    out["kv_amax"] = kv_amax
    if floor_hooks is not None:
        out["noise_floor"] = {k: v for k, v in floor_cmp.summary().items() if k in gates_mod.FLOOR_KEYS}
    return out


def _finite(obj):
    """JSON has no infinities: an identical layer's SQNR becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the JSON report atomically (a temporary sibling renamed into place)."""
    path = Path(path).expanduser()
    if path.parent and not path.parent.is_dir():
        raise OmniqError(f"--report {path}: directory {path.parent} does not exist")
    write_atomic(path, json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    return path


def _sqnr_by_role(reference: Artifact, sqnr: dict[str, float]) -> dict[str, dict]:
    by_role: dict[str, list[float]] = {}
    for name, db in sqnr.items():
        lin = reference.arch.linear_by_name.get(name)
        by_role.setdefault(lin.role if lin else "other", []).append(db)
    return {role: {"min": min(v), "median": statistics.median(v), "layers": len(v)} for role, v in by_role.items()}


def validate(reference, candidate, *, eval_set=None, samples: int = DEFAULT_SAMPLES,
             seq_len: int = DEFAULT_SEQ_LEN, max_kl: float | None = None, min_top1: float | None = None,
             max_ppl_ratio: float | None = None, report_path=None, positions: bool = False,
             progress: Progress | None = None, media_samples: int | None = None, gates_file=None,
             noise_floor: bool = True, generate: int = 0,
             max_new_tokens: int = generate_mod.DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Read both checkpoints from their files, compare next-token distributions, apply the gates.

    The gates come from the noise floor measured on the same rows (`gates.from_floor`; `noise_floor=False`:
    the bundled model's constant floor), the `gates_file` (`gates.load_file`) and the flags, in that order.
    Returns the report (and writes it to `report_path` when given); `report["passed"]` says whether every
    gate held. Raises OmniqError (exit 2) for input that cannot be compared."""
    t0 = time.perf_counter()
    cand_path = Path(candidate)
    binding.check_target(report_path, cand_path if cand_path.is_dir() else str(candidate))
    gfile = gates_mod.load_file(gates_file) if gates_file is not None else None
    flags = {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio}
    ref = read_artifact(reference)
    cand = read_artifact(candidate)
    check_same_model(ref, cand)
    label, docs = eval_texts(eval_set)
    rows = token_rows(ref.tokenizer, docs, samples, seq_len)
    t_eval = time.perf_counter()
    metrics = compare(ref, cand, rows, positions=positions, progress=progress, noise_floor=noise_floor)
    eval_seconds = time.perf_counter() - t_eval

    fmt = gates_mod.gate_format(cand)

    floor = metrics.get("noise_floor")

    def gate_of(modality: str, own: dict | None) -> gates_mod.Gates:
        used = own if modality == "text" else gates_mod.at_least(own, floor)   # media: never below text's
        return gates_mod.from_floor(used, fmt, gates_mod.overrides_for(gfile, fmt, modality, flags))

    gate = gate_of("text", floor)
    failures = gates_mod.check(metrics, gate)
    # Omni: image+text and audio+text evaluation sets, each with its own floor and gates (validate.multimodal)
    from omniq.validate import multimodal

    by_modality, mm_warnings = multimodal.evaluate(
        ref, cand, samples=multimodal.DEFAULT_MEDIA_SAMPLES if media_samples is None else media_samples,
        gate_of=gate_of, noise_floor=noise_floor)
    if by_modality:
        failures = [f"text: {f}" for f in failures]
    text_failures = list(failures)
    sqnr = layers_sqnr(ref.weights, cand.weights, sorted(cand.quantized))
    layer_failures = gates_mod.check_layers(sqnr, {n: q.weight_format for n, q in cand.quantized.items()}, gate)
    layer_failures += gates_mod.check_kv(metrics["kv_amax"], cand.kv_scales)
    failures += layer_failures
    for m in by_modality.values():
        failures += m["failures"]
    generation = None
    if generate:
        generation = generate_mod.compare(ref, cand, docs, generate, max_new_tokens,
                                          gates_mod.length_ratio_for(gfile, fmt))
        failures += generation["failures"]
    changed = changed_unquantized(ref, cand)
    warnings = ref.warnings + cand.warnings + mm_warnings
    if changed:
        first = max(changed, key=changed.get)
        warnings.append(f"{len(changed)} unquantized tensors differ from the reference (largest: {first}, "
                        f"{changed[first]:.3g}); the metrics include their effect")
    report = {
        **{k: metrics[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate",
                                   "ppl_ratio", "tokens")},
        "passed": not failures,
        "gates": gate.as_dict(),
        "noise_floor": floor,
        "gate_table": {"text": gates_mod.side_by_side(metrics, floor, gate),
                       **{m: v["gate_table"] for m, v in by_modality.items()}},
        "gates_file": gfile,
        "failures": failures,
        "layer_failures": layer_failures,
        "format": cand.format,
        "gate_format": fmt,
        "kv_cache": cand.kv_cache,
        "layer_formats": cand.format_counts(),
        "reference": str(ref.path),
        "candidate": str(cand.path),
        "eval": {"set": label, "rows": int(rows.shape[0]), "seq_len": int(rows.shape[1] - 1)},
        "layers_sqnr": sqnr,
        "sqnr_by_role": _sqnr_by_role(ref, sqnr),
        "unquantized_changed": changed,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens_per_second": round(metrics["tokens"] / eval_seconds, 1) if eval_seconds > 0 else None,
        binding.KEY: binding.for_validation(cand.path, ref.path),
    }
    if by_modality:
        text = {k: report[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate",
                                       "ppl_ratio", "tokens")}
        report["modalities"] = {"text": {**text, "passed": not text_failures, "gates": gate.as_dict(),
                                         "noise_floor": floor, "failures": text_failures, "eval": report["eval"]},
                                **by_modality}
    if positions:
        report["positions"] = metrics["positions"]
    if generation is not None:
        report["generation"] = generation
    if report_path is not None:
        write_report(report, report_path)
    return report


# ----- the terminal ---------------------------------------------------------------------------------------
@contextmanager
def terminal_progress(enabled: bool):
    """A transient progress bar on stderr (yields the `progress` callback, or None when not enabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("evaluating rows", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def summary_table(report: dict):
    """A rich table of the metrics next to this run's noise floor and their gates, for the terminal."""
    from rich.table import Table

    ok, bad = "[green]pass[/green]", "[red]FAIL[/red]"
    g = report["gates"]
    table = Table(title=f"omniq validate: {report['format']} candidate"
                        f"{' + FP8 KV cache' if report.get('kv_cache') else ''}, {report['tokens']} tokens "
                        f"({report['eval']['set']}); gates: {g['source']} x{g.get('multiplier') or '?'}")
    table.add_column("metric")
    table.add_column("noise floor", justify="right")
    table.add_column("value", justify="right")
    table.add_column("gate", justify="right")
    table.add_column("", justify="center")
    shown = {"kl_mean": ("mean KL(ref || cand)", lambda v: f"{v:.3g}", "<= {:.3g}"),
             "top1_agreement": ("top-1 agreement", lambda v: f"{100 * v:.2f} %", ">= {:.2%}"),
             "ppl_ratio": ("perplexity ratio", lambda v: f"{v:.4f}", "<= {:.4f}")}
    for modality, rows in (report.get("gate_table") or {}).items():
        prefix = "" if modality == "text" and len(report["gate_table"]) == 1 else f"{modality}: "
        for r in rows:
            label, fmt, gate_fmt = shown[r["metric"]]
            table.add_row(prefix + label, "-" if r["floor"] is None else fmt(r["floor"]), fmt(r["value"]),
                          gate_fmt.format(r["gate"]), ok if r["passed"] else bad)
    table.add_row("p95 KL", "", f"{report['kl_p95']:.3g}", "", "")
    table.add_row("perplexity reference / candidate", "",
                  f"{report['ppl_reference']:.3f} / {report['ppl_candidate']:.3f}", "", "")
    for role, s in sorted(report.get("sqnr_by_role", {}).items()):
        fmt = lambda v: "inf" if v is None or v == math.inf else f"{v:.1f}"  # noqa: E731
        table.add_row(f"SQNR {role}, min / median dB", "", f"{fmt(s['min'])} / {fmt(s['median'])}", "", "")
    if report.get("layer_failures"):
        table.add_row("layers below their format's SQNR minimum", "", str(len(report["layer_failures"])),
                      "0", bad)
    gen = report.get("generation")
    if gen:
        for k in ("same_first_16", "same_first_64"):
            if gen.get(k) is not None:
                table.add_row(f"generation: {k.replace('_', ' ')} tokens", "", f"{100 * gen[k]:.0f} %", "", "")
        table.add_row("generation: EOS within budget, ref / cand", "",
                      f"{100 * gen['eos_rate_reference']:.0f} % / {100 * gen['eos_rate_candidate']:.0f} %", "", "")
        g = gen["gates"]
        table.add_row("generation: mean length ratio", "", f"{gen['length_ratio']:.3f}",
                      f"{g['min_length_ratio']:g}-{g['max_length_ratio']:g}", ok if gen["passed"] else bad)
    for name, b in (report.get("positions") or {}).items():
        table.add_row(f"positions {name}: KL / top-1", "",
                      f"{b['kl_mean']:.3g} / {100 * b['top1_agreement']:.1f} %", "", "")
    return table
