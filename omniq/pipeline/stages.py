"""The pipeline's real stage functions: each calls one omniq command's Python function, writes into the
stage's temporary output directory (`ctx.out`) and returns the small JSON record the cache keeps
(`result.json`). Paths in the record are relative to the stage's output directory.
"""

from __future__ import annotations

import json
import os
import shutil

from omniq.pipeline.context import StageContext
from omniq.publish.release import EVAL, LINT, VALIDATION

DELTAS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens")


def _progress(ctx: StageContext, what: str | None = None):
    if ctx.progress is None:
        return None
    if what is None:                                       # (what, done, total) callers
        return lambda name, done, total: ctx.progress(done, total, str(name))
    return lambda done, total: ctx.progress(done, total, what)


def quantize(ctx: StageContext) -> dict:
    from omniq.commands.quantize import quantize as run_quantize, resolve_recipe

    cal = ctx.spec.calibration
    # the source as the pipeline names it (a bundled name / hub id stays one in omniq.json's provenance)
    res = run_quantize(ctx.spec.source, resolve_recipe(ctx.column.recipe, ctx.column.kv_cache),
                       ctx.out / "artifact", calib=cal.set, calib_column=cal.column, calib_split=cal.split,
                       calib_samples=cal.samples, calib_seq_len=cal.seq_len, calib_format=cal.format,
                       reasoning_share=cal.reasoning_share, progress=_progress(ctx))
    return {"path": "artifact", "bytes": res.output_bytes, "counts": res.counts, "files": res.files,
            "seconds": {k: round(v, 2) for k, v in res.seconds.items()}}


def lint(ctx: StageContext) -> dict:
    from omniq.validate.lint import lint as run_lint, report as lint_report

    found = run_lint(ctx.artifact, ctx.spec.lint_engine)
    doc = lint_report(found, ctx.artifact, ctx.spec.lint_engine)
    (ctx.out / LINT).write_text(json.dumps(doc, indent=1) + "\n")
    return {"passed": doc["passed"], "errors": doc["counts"]["error"], "counts": doc["counts"], "report": LINT}


def validate(ctx: StageContext) -> dict:
    from omniq.validate.run import validate as run_validate

    ev, g = ctx.spec.evaluation, ctx.column.gates
    report = run_validate(str(ctx.source_dir), str(ctx.artifact), eval_set=ev.set, samples=ev.samples,
                          seq_len=ev.seq_len, max_kl=g.get("max_kl"), min_top1=g.get("min_top1"),
                          max_ppl_ratio=g.get("max_ppl_ratio"), report_path=ctx.out / VALIDATION,
                          eval_format=ev.format, reasoning_share=ev.reasoning_share,
                          eval_column=ev.column if ev.format == "chat" else None, eval_split=ev.split,
                          progress=_progress(ctx, "evaluating"), reference_cache=ctx.reference_cache)
    return {**{k: report.get(k) for k in DELTAS}, "passed": report["passed"], "failures": report["failures"],
            "gates": report["gates"], "format": report.get("format"), "report": VALIDATION}


def task_eval(ctx: StageContext) -> dict:
    from omniq.validate.task_eval import evaluate

    te = ctx.spec.task_eval
    report = evaluate(str(ctx.source_dir), str(ctx.artifact), list(te.tasks), limit=te.limit,
                      min_recovery=te.min_recovery, report_path=ctx.out / EVAL)
    keep = ("metric", "reference", "candidate", "delta", "delta_stderr", "recovery", "min_recovery", "passed",
            "samples")
    return {"passed": report["passed"], "failures": report["failures"], "report": EVAL,
            "tasks": {n: {k: t.get(k) for k in keep} for n, t in report["tasks"].items()}}


def build(ctx: StageContext) -> dict:
    from omniq.deploy import trtllm
    from omniq.deploy.bundle import build as run_build

    b = ctx.spec.build
    res = run_build(str(ctx.artifact), ctx.target, ctx.out / "bundle", tp=b.get("tp", 1), ep=b.get("ep"),
                    max_batch=b.get("max_batch", trtllm.DEFAULT_MAX_BATCH), max_seq_len=b.get("max_seq_len"),
                    trtllm_version=b.get("trtllm_version"))
    dep = res.deployment
    return {"path": "bundle", "gpu": dep.gpu.label, "sm": dep.gpu.sm, "quant_algo": dep.quant_algo,
            "moe_backend": dep.moe_backend, "trtllm": dep.version_range, "link_mode": res.link_mode,
            "warnings": res.warnings}


def release_dir(ctx: StageContext):
    """The artifact as `omniq publish` reads it: links to the quantize output's files plus the lint,
    validation and (with `eval:`) eval reports of this pipeline (the cached outputs themselves stay untouched)."""
    rel_dir = ctx.out / "release"
    rel_dir.mkdir()
    for p in sorted(ctx.artifact.rglob("*")):
        # the artifact's own lint.json (written by quantize) is replaced by this pipeline's report below
        reports = (LINT, VALIDATION, EVAL)
        if p.is_file() and not p.name.startswith(".") and p.relative_to(ctx.artifact).as_posix() not in reports:
            dst = rel_dir / p.relative_to(ctx.artifact)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p.resolve(), dst)
    for stage, name in (("lint", LINT), ("validate", VALIDATION), ("eval", EVAL)):
        f = ctx.inputs.get(stage)
        if f is None:                                  # no eval stage in this pipeline
            continue
        shutil.copyfile(f.path / f.result["report"], rel_dir / name)
    return rel_dir


def publish(ctx: StageContext) -> dict:
    from omniq.publish.publish import publish as run_publish

    p = ctx.publish
    src = release_dir(ctx)
    try:
        res = run_publish(src, ctx.ref, force=p.force, allow_failed=p.allow_failed, plain_http=p.plain_http,
                          progress=(lambda i, n, f: ctx.progress(i, n, f)) if ctx.progress else None)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    keep = ("ref", "digest", "commit_url", "unchanged", "replaced", "waived", "layers", "bytes_uploaded")
    return {k: res[k] for k in keep if k in res}
