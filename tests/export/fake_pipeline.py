"""Run `omniq.pipeline.run.run` with fast fake quantize / lint / validate / build stages (and the real
publish stage), in its own process so tests can SIGKILL it anywhere.

    python fake_pipeline.py PIPELINE.yaml [--only STAGE] [--dry-run]

Environment:
    FAKE_LOG      file that gets one line per stage invocation: "STAGE COLUMN [TARGET|REF]"
    FAKE_KILL     "STAGE:COLUMN[:TARGET]": that invocation writes part of its output, then SIGKILLs the process
    FAKE_KL       JSON {column: kl_mean} (default: fp8 0.004, nvfp4 0.03, anything else 0.02)
    FAKE_RECOVERY JSON {column: task recovery} for the eval stage (default 1.0)

The fake validate gates like the real one: kl_mean against the column's max_kl (default 0.01).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from omniq.errors import OmniqError
from omniq.pipeline import run as pipeline, stages as real_stages
from omniq.validate import binding

DEFAULT_KL = {"fp8": 0.004, "nvfp4": 0.03}


def _log(stage: str, ctx) -> None:
    what = ctx.target or ctx.ref or ""
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{stage} {ctx.column.id} {what}".rstrip() + "\n")


def _maybe_die(stage: str, ctx) -> None:
    spot = os.environ.get("FAKE_KILL", "")
    me = ":".join(x for x in (stage, ctx.column.id, ctx.target) if x)
    if spot == me:
        (ctx.out / "partial.bin").write_bytes(b"x" * 1000)   # half-written output
        os.kill(os.getpid(), signal.SIGKILL)


def quantize(ctx) -> dict:
    _log("quantize", ctx)
    art = ctx.out / "artifact"
    art.mkdir()
    recipe = pipeline.resolved_recipe(ctx.column)
    files = {"config.json": json.dumps({"model_type": "nemotron_h"}).encode(),
             "model.safetensors": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).digest() * 64,
             "tokenizer.json": b"{}"}
    for name, data in files.items():
        (art / name).write_bytes(data)
    _maybe_die("quantize", ctx)
    fmt = recipe["default"]
    manifest = {"omniq_manifest": 1, "created": "2026-01-02T03:04:05+00:00", "versions": {"omniq": "0.1.0"},
                "recipe": recipe, "source": {"model": str(ctx.source_dir),
                                             "files": binding.reference_files(ctx.source_dir)},
                "calibration": {"source": "bundled:calib"},
                "modules": {"backbone.layers.0.mixer.in_proj": fmt, "lm_head": "bf16"},
                "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    (art / "omniq.json").write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in art.iterdir())
    return {"path": "artifact", "bytes": size, "counts": {fmt: 1, "bf16": 1}}


def lint(ctx) -> dict:
    _log("lint", ctx)
    _maybe_die("lint", ctx)
    (ctx.out / "lint.json").write_text(json.dumps({"path": str(ctx.artifact), "engine": None, "passed": True,
                                                   "counts": {"error": 0, "warning": 0, "info": 0}, "findings": [],
                                                   binding.KEY: binding.for_lint(ctx.artifact)}))
    return {"passed": True, "errors": 0, "report": "lint.json"}


def validate(ctx) -> dict:
    _log("validate", ctx)
    _maybe_die("validate", ctx)
    table = {**DEFAULT_KL, **json.loads(os.environ.get("FAKE_KL", "{}"))}
    kl = table.get(ctx.column.id, 0.02)
    gates = {"max_kl": ctx.column.gates.get("max_kl", 0.01), "min_top1": ctx.column.gates.get("min_top1", 0.9),
             "max_ppl_ratio": ctx.column.gates.get("max_ppl_ratio", 1.05)}
    failures = [f"kl_mean {kl:.3g} > max_kl {gates['max_kl']:.3g}"] if kl > gates["max_kl"] else []
    report = {"kl_mean": kl, "kl_p95": 3 * kl, "top1_agreement": 1 - 2 * kl, "ppl_reference": 7.0,
              "ppl_candidate": 7.0 * (1 + kl), "ppl_ratio": 1 + kl, "tokens": 512, "passed": not failures,
              "failures": failures, "gates": gates, "format": pipeline.resolved_recipe(ctx.column)["default"],
              "kv_cache": None, "layer_formats": {}, "eval": {"set": "fake", "rows": 4, "seq_len": 128},
              binding.KEY: binding.for_validation(ctx.artifact, ctx.source_dir)}
    (ctx.out / "validation.json").write_text(json.dumps(report))
    return {**report, "report": "validation.json"}


def task_eval(ctx) -> dict:
    """Like `omniq eval`: one task per name in the file's `eval.tasks`, gated on recovery."""
    _log("eval", ctx)
    _maybe_die("eval", ctx)
    recovery = json.loads(os.environ.get("FAKE_RECOVERY", "{}")).get(ctx.column.id, 1.0)
    te = ctx.spec.task_eval
    tasks = {Path(t).stem: {"metric": "acc", "reference": 0.6, "candidate": 0.6 * recovery,
                            "delta": 0.6 * recovery - 0.6, "delta_stderr": 0.05, "recovery": recovery,
                            "reference_stderr": 0.035, "candidate_stderr": 0.035,
                            "min_recovery": te.min_recovery, "passed": recovery >= te.min_recovery, "samples": 8}
             for t in te.tasks}
    failures = [f"{n}: recovery {t['recovery']:.3f} < {te.min_recovery:g}" for n, t in tasks.items() if not t["passed"]]
    report = {"passed": not failures, "tasks": tasks, "failures": failures, "format": "fp8",
              binding.KEY: binding.for_validation(ctx.artifact, ctx.source_dir)}
    (ctx.out / "eval.json").write_text(json.dumps(report))
    return {"passed": report["passed"], "failures": failures, "tasks": tasks, "report": "eval.json"}


def build(ctx) -> dict:
    _log("build", ctx)
    (ctx.out / "bundle").mkdir()
    _maybe_die("build", ctx)
    (ctx.out / "bundle" / "build.json").write_text(json.dumps({"target": ctx.target}))
    return {"path": "bundle", "warnings": []}


def publish(ctx) -> dict:
    _log("publish", ctx)
    _maybe_die("publish", ctx)
    return real_stages.publish(ctx)


def main(argv: list[str]) -> int:
    file = argv[0]
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    try:
        outcome = pipeline.run(file, only=only, dry_run="--dry-run" in argv,
                               stages=pipeline.Stages(quantize, lint, validate, build, publish, task_eval))
    except OmniqError as e:
        print(f"omniq: error: {e}", file=sys.stderr)
        return e.exit_code
    return outcome.exit_code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
