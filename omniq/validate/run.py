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
from omniq.validate import gates as gates_mod
from omniq.validate.artifact import Artifact, changed_unquantized, check_same_model, read_artifact
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
            progress: Progress | None = None) -> dict:
    """Metrics of the candidate against the reference on the given token rows."""
    linear, kv = candidate.linear(), candidate.kv()
    cmp = Comparison()
    n = rows.shape[0]
    for start in range(0, n, BATCH_ROWS):
        batch = rows[start: start + BATCH_ROWS]
        x, y = batch[:, :-1], batch[:, 1:]
        ref = forward.logits(reference.arch, reference.weights, x)
        cand = forward.logits(candidate.arch, candidate.weights, x, linear=linear, kv=kv)
        cmp.add(ref, cand, y)
        if progress is not None:
            progress(min(n, start + BATCH_ROWS), n)
    return cmp.summary(position_buckets=positions)


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
             progress: Progress | None = None, media_samples: int | None = None, eval_media: str | None = None,
             bad_media: str = "skip") -> dict:
    """Read both checkpoints from their files, compare next-token distributions, apply the gates.

    Returns the report (and writes it to `report_path` when given); `report["passed"]` says whether every
    gate held. Raises OmniqError (exit 2) for input that cannot be compared."""
    t0 = time.perf_counter()
    ref = read_artifact(reference)
    cand = read_artifact(candidate)
    check_same_model(ref, cand)
    label, docs = eval_texts(eval_set)
    rows = token_rows(ref.tokenizer, docs, samples, seq_len)
    t_eval = time.perf_counter()
    metrics = compare(ref, cand, rows, positions=positions, progress=progress)
    eval_seconds = time.perf_counter() - t_eval

    gate = gates_mod.gates_for(cand.format, max_kl=max_kl, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio)
    failures = gates_mod.check(metrics, gate)
    # Omni: image+text and audio+text evaluation sets, each with its own gates (omniq.validate.multimodal)
    from omniq.validate import multimodal

    by_modality, mm_warnings = multimodal.evaluate(
        ref, cand, samples=multimodal.DEFAULT_MEDIA_SAMPLES if media_samples is None else media_samples,
        max_kl=max_kl, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio, eval_media=eval_media,
        bad_media=bad_media)
    if by_modality:
        failures = [f"text: {f}" for f in failures]
    text_failures = list(failures)
    for m in by_modality.values():
        failures += m["failures"]
    sqnr = layers_sqnr(ref.weights, cand.weights, sorted(cand.quantized))
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
        "failures": failures,
        "format": cand.format,
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
    }
    if by_modality:
        text = {k: report[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate",
                                       "ppl_ratio", "tokens")}
        report["modalities"] = {"text": {**text, "passed": not text_failures, "gates": gate.as_dict(),
                                         "failures": text_failures, "eval": report["eval"]}, **by_modality}
    if positions:
        report["positions"] = metrics["positions"]
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
    """A rich table of the metrics next to their gates, for the terminal."""
    from rich.table import Table

    g = report["gates"]
    ok, bad = "[green]pass[/green]", "[red]FAIL[/red]"
    table = Table(title=f"omniq validate: {report['format']} candidate"
                        f"{' + FP8 KV cache' if report.get('kv_cache') else ''}, {report['tokens']} tokens "
                        f"({report['eval']['set']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("gate", justify="right")
    table.add_column("", justify="center")
    table.add_row("mean KL(ref || cand)", f"{report['kl_mean']:.3g}", f"<= {g['max_kl']:.3g}",
                  ok if report["kl_mean"] <= g["max_kl"] else bad)
    table.add_row("p95 KL", f"{report['kl_p95']:.3g}", "", "")
    table.add_row("top-1 agreement", f"{100 * report['top1_agreement']:.2f} %", f">= {100 * g['min_top1']:.2f} %",
                  ok if report["top1_agreement"] >= g["min_top1"] else bad)
    table.add_row("perplexity reference", f"{report['ppl_reference']:.3f}", "", "")
    table.add_row("perplexity candidate", f"{report['ppl_candidate']:.3f}", "", "")
    table.add_row("perplexity ratio", f"{report['ppl_ratio']:.4f}", f"<= {g['max_ppl_ratio']:.4f}",
                  ok if report["ppl_ratio"] <= g["max_ppl_ratio"] else bad)
    for role, s in sorted(report.get("sqnr_by_role", {}).items()):
        fmt = lambda v: "inf" if v is None or v == math.inf else f"{v:.1f}"  # noqa: E731
        table.add_row(f"SQNR {role}, min / median dB", f"{fmt(s['min'])} / {fmt(s['median'])}", "", "")
    for name, b in (report.get("positions") or {}).items():
        table.add_row(f"positions {name}: KL / top-1", f"{b['kl_mean']:.3g} / {100 * b['top1_agreement']:.1f} %",
                      "", "")
    for name, m in (report.get("modalities") or {}).items():
        if name == "text":
            continue
        mg = m["gates"]
        label = f"{name}+text ({m['tokens']} caption tokens)"
        table.add_row(f"{label} mean KL", f"{m['kl_mean']:.3g}", f"<= {mg['max_kl']:.3g}",
                      ok if m["kl_mean"] <= mg["max_kl"] else bad)
        table.add_row(f"{label} top-1", f"{100 * m['top1_agreement']:.2f} %", f">= {100 * mg['min_top1']:.2f} %",
                      ok if m["top1_agreement"] >= mg["min_top1"] else bad)
        table.add_row(f"{label} ppl ratio", f"{m['ppl_ratio']:.4f}", f"<= {mg['max_ppl_ratio']:.4f}",
                      ok if m["ppl_ratio"] <= mg["max_ppl_ratio"] else bad)
    return table
