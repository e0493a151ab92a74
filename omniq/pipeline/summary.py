"""How a pipeline run is reported: one record per artifact (recipe column) as JSON, a Markdown table for a CI
job summary, and a PNG chart of the measured deltas per recipe.

The record is made by `omniq.pipeline.run` from the stage results; here it is only rendered. A number
that was not measured is shown as "-" and left out of the chart, never drawn as zero.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from omniq.atomic import write_atomic

STATUS_ICON = {"passed": "✅ passed", "gates failed": "❌ gates failed", "error": "⛔ error",
               "incomplete": "⏸ incomplete"}
# (delta key, chart title, transform to "how far from perfect", gate key, gate transform)
CHART = (
    ("kl_mean", "KL divergence, mean (nats/token)", lambda v: v, "max_kl", lambda g: g),
    ("top1_agreement", "1 − top-1 agreement", lambda v: 1.0 - v, "min_top1", lambda g: 1.0 - g),
    ("ppl_ratio", "perplexity ratio − 1", lambda v: v - 1.0, "max_ppl_ratio", lambda g: g - 1.0),
)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _num(v, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def _with_gate(art: dict, key: str, gate_key: str, sign: str) -> str:
    v = art["deltas"].get(key)
    g = (art["gates"].get("thresholds") or {}).get(gate_key)
    if v is None:
        return "-"
    return f"{_num(v)} ({sign} {_num(g)})" if g is not None else _num(v)


def _tick(v) -> str:
    return "-" if v is None else ("✅" if v else "❌")


def markdown(summary: dict) -> str:
    arts = summary["artifacts"]
    st = summary["stages"]
    lines = [f"## omniq pipeline `{summary['pipeline']}`", "",
             f"source `{summary['source']}` · {len(arts)} recipe(s) × {len(summary['targets'])} target(s) · "
             f"{st['total']} stage outputs: {st['ran']} ran, {st['cached']} cached"
             + (f", {st['failed']} failed" if st["failed"] else "")
             + (f", {st['skipped']} skipped" if st["skipped"] else "")
             + (f", {st['not_run']} not run" if st["not_run"] else ""), "",
             "| recipe | status | size | KL mean | top-1 | ppl ratio | lint | builds | published |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in arts:
        builds = ", ".join(f"{b['target']} {'✅' if b['status'] == 'ok' else '❌' if b['status'] == 'failed' else '-'}"
                           for b in a["builds"]) or "-"
        pubs = "<br>".join(f"`{p['ref']}`" + ("" if p["status"] == "ok" else f" ({p['status']})")
                           for p in a["published"]) or "-"
        lines.append(f"| {a['id']} | {STATUS_ICON.get(a['status'], a['status'])} | {human_bytes(a['size_bytes'])} | "
                     f"{_with_gate(a, 'kl_mean', 'max_kl', '≤')} | {_with_gate(a, 'top1_agreement', 'min_top1', '≥')} | "
                     f"{_with_gate(a, 'ppl_ratio', 'max_ppl_ratio', '≤')} | {_tick(a['gates'].get('lint'))} | "
                     f"{builds} | {pubs} |")
    accuracy = [f"- **{a['id']}** {name}: {t['metric']} {_num(t['reference'])} → {_num(t['candidate'])}, "
                f"recovery {_num(t['recovery'])} (≥ {_num(t['min_recovery'])}) {_tick(t['passed'])}"
                for a in arts for name, t in (a.get("task_accuracy") or {}).items()]
    if accuracy:
        lines += ["", "Task accuracy (`omniq eval`, lm-eval-harness):", "", *accuracy]
    problems = [f"- **{a['id']}**: {e}" for a in arts for e in a["errors"]]
    if problems:
        lines += ["", "Problems:", "", *problems]
    lines += ["", f"Exit code {summary['exit_code']}. Details: `summary.json`; chart: `deltas.png`."]
    return "\n".join(lines) + "\n"


def table(summary: dict):
    """The console's view of the Markdown table (rich), compact enough for 80 columns."""
    from rich.table import Table

    from rich import box

    t = Table(title=f"omniq pipeline {summary['pipeline']}", title_justify="left", box=box.SIMPLE_HEAD,
              padding=(0, 1))
    for c in ("recipe", "status", "size", "KL", "top-1", "ppl ratio", "builds", "pub"):
        t.add_column(c, no_wrap=True)
    for a in summary["artifacts"]:
        d = a["deltas"]
        ok = sum(b["status"] == "ok" for b in a["builds"])
        pubs = sum(p["status"] == "ok" for p in a["published"])
        t.add_row(a["id"], STATUS_ICON.get(a["status"], a["status"]), human_bytes(a["size_bytes"]),
                  _num(d.get("kl_mean")), _num(d.get("top1_agreement")), _num(d.get("ppl_ratio")),
                  f"{ok}/{len(a['builds'])}", f"{pubs}/{len(a['published'])}")
    return t


def chart(summary: dict, path: Path) -> Path:
    """Bars of each measured delta per recipe (green: gates passed, red: failed), the gate as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arts = summary["artifacts"]
    fig, axes = plt.subplots(1, len(CHART), figsize=(4.2 * len(CHART), 3.6), squeeze=False)
    for ax, (key, title, fwd, gate_key, gate_fwd) in zip(axes[0], CHART, strict=True):
        ax.set_title(title, fontsize=10)
        names = [a["id"] for a in arts]
        xs = list(range(len(arts)))
        measured = False
        for x, a in zip(xs, arts, strict=True):
            v = a["deltas"].get(key)
            if v is None or not math.isfinite(v):
                ax.text(x, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7, color="gray")
                continue
            measured = True
            ok = a["gates"].get("validate")
            color = "#2e7d32" if ok else "#c62828" if ok is False else "#757575"
            y = fwd(v)
            ax.bar(x, y, color=color, width=0.6)
            ax.annotate(f"{v:.4g}", (x, y), ha="center", va="bottom" if y >= 0 else "top", fontsize=7,
                        xytext=(0, 2 if y >= 0 else -2), textcoords="offset points")
            g = (a["gates"].get("thresholds") or {}).get(gate_key)
            if g is not None:
                ax.hlines(gate_fwd(g), x - 0.4, x + 0.4, colors="black", linestyles="dashed", linewidth=1)
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
        if measured:
            ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"omniq pipeline {summary['pipeline']}: deltas against the source (dashed: gate)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, png.getvalue())


def write(summary: dict, workdir: Path) -> dict[str, Path]:
    """summary.json, summary.md and deltas.png in the work directory; summary.md is also appended to
    $GITHUB_STEP_SUMMARY when that is set (a GitHub Actions job summary)."""

    workdir.mkdir(parents=True, exist_ok=True)
    md = markdown(summary)
    paths = {"json": workdir / "summary.json", "markdown": workdir / "summary.md", "chart": workdir / "deltas.png"}
    write_atomic(paths["json"], (json.dumps(summary, indent=1, default=str) + "\n").encode())
    write_atomic(paths["markdown"], md.encode())
    chart(summary, paths["chart"])
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        with open(step, "a", encoding="utf-8") as f:
            f.write(md)
    return paths
