"""`omniq pipeline PIPELINE.yaml [--only STAGE] [--dry-run]`: every artifact of a matrix, cached and resumable.

The pipeline file (`omniq.pipeline.spec`) names a source checkpoint and a matrix of recipe columns x
GPU targets. The stages, run stage by stage over the whole matrix:

    quantize[recipe]           omniq quantize                 key: source file hashes, resolved recipe,
                                                                   calibration identity, omniq / modelopt /
                                                                   torch / transformers versions
    lint[recipe]               omniq lint          -> lint.json         key: quantize key, engine, omniq
    validate[recipe]           omniq validate      -> validation.json   key: quantize key, source key,
                                                                   evaluation identity, gates, versions
    eval[recipe]               omniq eval          -> eval.json  (only with the file's `eval:`)   key:
                                                                   quantize key, source key, tasks (task
                                                                   files hashed), limit, gate, versions
    build[recipe x target]     omniq build (only when lint and the gates, eval's too, passed)   key: quantize key,
                                                                   target, build options, omniq
    publish[recipe x ref]      omniq publish (gates passed, every build finished)  key: quantize, lint and
                                                                   validate keys, the reference, its options

A stage's output is stored under its key (`omniq.pipeline.cache`): an unchanged pipeline runs nothing and says
so; editing one recipe changes that column's keys only. A run killed at any point leaves either finished
outputs (with their completion marker) or temporary ones that the next run removes, and resumes from the
last finished stage. Stage functions are injected (`Stages`); `omniq.pipeline.stages` has the real ones.
Every recipe's validate shares `cache/reference-cache/` (`omniq.validate.reference_cache`): the reference's
two streams run once for the source, not once per recipe; the reports are the same bit for bit.

`--only STAGE` runs that stage alone (its inputs must already be in the cache); `--dry-run` computes the keys
and shows what would run. The run ends with `summary.json`, `summary.md` (also appended to
$GITHUB_STEP_SUMMARY) and `deltas.png` in the work directory. Exit code: 2 if a stage failed on bad input
(or --only found an input missing), else 1 if lint or a gate failed, else 0.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, field
from pathlib import Path

from omniq import __version__
from omniq.errors import OmniqError
from omniq.pipeline import cache, summary as summary_mod
from omniq.pipeline.context import StageContext, Stages  # noqa: F401 (Stages: part of run()'s interface)
from omniq.pipeline.spec import Column, PipelineSpec, PublishTarget, load

STAGES = ("quantize", "lint", "validate", "eval", "build", "publish")
# validate's reference streams, shared by every recipe of the source (omniq.validate.reference_cache): the
# first recipe's validate computes them, the others run only their candidate's stream
REFERENCE_CACHE = "reference-cache"
STAGE_FORMAT = 1                    # bump when what a stage writes changes shape


def default_stages() -> Stages:
    from omniq.pipeline import stages

    return Stages(stages.quantize, stages.lint, stages.validate, stages.build, stages.publish, stages.task_eval)


@dataclass
class Task:
    stage: str
    column: Column
    key: str
    target: str | None = None
    publish: PublishTarget | None = None
    ref: str | None = None
    state: str = "pending"              # cached, ran, failed, skipped, not run, would run
    finished: cache.Finished | None = None
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0

    @property
    def label(self) -> str:
        if self.target:
            return f"{self.column.id} × {self.target}"
        if self.ref:
            return f"{self.column.id} → {self.ref}"
        return self.column.id

    @property
    def result(self) -> dict | None:
        return self.finished.result if self.finished else None


# ----- keys ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"omniq": __version__}
    for dist in ("nvidia-modelopt", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def data_identity(ds, hashes: cache.HashCache) -> dict:
    ident = ds.identity()
    p = Path(ds.set)
    if p.is_absolute() and p.exists():
        ident["sha256"] = cache.tree_digest(p, hashes)[0]
    return ident


def task_eval_identity(spec: PipelineSpec, hashes: cache.HashCache) -> dict | None:
    te = spec.task_eval
    if te is None:
        return None
    files = {t: cache.tree_digest(Path(t).parent, hashes)[0] for t in te.tasks if Path(t).is_absolute()
             and Path(t).is_file()}          # a task file's folder: its YAML, data and helpers
    try:
        lm_eval = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        lm_eval = None
    return {"tasks": list(te.tasks), "limit": te.limit, "min_recovery": te.min_recovery, "files": files,
            "lm_eval": lm_eval}


def resolved_recipe(col: Column) -> dict:
    from omniq.quant import recipe as recipes

    return recipes.load(col.recipe).with_kv_cache(col.kv_cache).as_dict()


def make_tasks(spec: PipelineSpec, source_key: str, hashes: cache.HashCache) -> list[Task]:
    v = versions()
    calib = data_identity(spec.calibration, hashes)
    evaluation = data_identity(spec.evaluation, hashes)
    task_ev = task_eval_identity(spec, hashes)
    tasks = []
    for col in spec.columns:
        base = {"format": STAGE_FORMAT, "omniq": v["omniq"]}
        q = cache.key({**base, "stage": "quantize", "source": source_key, "recipe": resolved_recipe(col),
                       "calibration": calib, "versions": v})
        lint = cache.key({**base, "stage": "lint", "quantize": q, "engine": spec.lint_engine})
        val = cache.key({**base, "stage": "validate", "quantize": q, "source": source_key, "evaluation": evaluation,
                         "gates": col.gates, "torch": v["torch"]})
        tasks += [Task("quantize", col, q), Task("lint", col, lint), Task("validate", col, val)]
        ev = None
        if task_ev is not None:
            ev = cache.key({**base, "stage": "eval", "quantize": q, "source": source_key, "eval": task_ev,
                            "torch": v["torch"]})
            tasks.append(Task("eval", col, ev))
        for t in spec.targets:
            tasks.append(Task("build", col, cache.key({**base, "stage": "build", "quantize": q, "target": t,
                                                       "options": spec.build}), target=t))
        for p in spec.publish:
            ref = p.expand(spec.name, col.id, q)
            pkey = {**base, "stage": "publish", "quantize": q, "lint": lint, "validate": val, "ref": ref,
                    "force": p.force, "allow_failed": p.allow_failed, "plain_http": p.plain_http}
            if ev is not None:
                pkey["eval"] = ev
            tasks.append(Task("publish", col, cache.key(pkey), publish=p, ref=ref))
    return tasks


# ----- what each task needs ------------------------------------------------------------------------------
def _column(tasks: list[Task], col: Column, stage: str) -> list[Task]:
    return [t for t in tasks if t.column.id == col.id and t.stage == stage]


def _gates_passed(tasks: list[Task], col: Column) -> tuple[bool | None, list[str]]:
    """(passed, why not); None while lint or validate has not finished."""
    lint = _column(tasks, col, "lint")[0]
    val = _column(tasks, col, "validate")[0]
    ev = _column(tasks, col, "eval")
    if lint.result is None or val.result is None or (ev and ev[0].result is None):
        return None, []
    why = []
    if not lint.result.get("passed"):
        why.append(f"lint found {lint.result.get('errors', '?')} error(s)")
    if not val.result.get("passed"):
        why.append("validation gates failed: " + "; ".join(val.result.get("failures") or []))
    if ev and not ev[0].result.get("passed"):
        why.append("task-accuracy gates failed: " + "; ".join(ev[0].result.get("failures") or []))
    return not why, why


def needs(task: Task, tasks: list[Task]) -> tuple[dict[str, cache.Finished] | None, str | None, str]:
    """(inputs, reason it cannot run, "skipped" or "not run")."""
    col = task.column
    quantize = _column(tasks, col, "quantize")[0]
    if task.stage == "quantize":
        return {}, None, ""
    if quantize.finished is None:
        return None, "its quantize output is not there", "not run"
    inputs = {"quantize": quantize.finished}
    if task.stage in ("lint", "validate", "eval"):
        return inputs, None, ""
    passed, why = _gates_passed(tasks, col)
    if passed is None:
        return None, ("lint, validate and eval have not all finished" if _column(tasks, col, "eval")
                      else "lint and validate have not both finished"), "not run"
    for stage in ("lint", "validate", "eval"):
        for t in _column(tasks, col, stage):
            inputs[stage] = t.finished
    if task.stage == "build":
        return (inputs, None, "") if passed else (None, "; ".join(why), "skipped")
    if not passed and not task.publish.allow_failed:
        return None, "; ".join(why), "skipped"
    # builds skipped because the gates failed do not hold back an --allow-failed publish
    unfinished = [b.target for b in _column(tasks, col, "build") if b.finished is None and b.state != "skipped"]
    if unfinished:
        return None, f"build for {', '.join(unfinished)} has not finished", "not run"
    return inputs, None, ""


# ----- display -----------------------------------------------------------------------------------------------
class Display:
    """A progress bar (stage, matrix position) on a terminal; one line per task everywhere."""

    def __init__(self, console, total: int):
        self.console = console
        self.total = total
        self.progress = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
            self.bar = self.progress.add_task("pipeline", total=total)
            self.inner = self.progress.add_task("", total=1, visible=False)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def begin(self, i: int, task: Task) -> None:
        if self.progress:
            self.progress.update(self.bar, description=f"[{i}/{self.total}] {task.stage} {task.label}")
            self.progress.update(self.inner, visible=False)

    def inner_progress(self, done: int, total: int, what: str) -> None:
        if self.progress:
            self.progress.update(self.inner, description=f"  {what}", completed=done, total=max(total, 1),
                                 visible=True)

    def done(self, i: int, task: Task) -> None:
        mark = {"cached": "[dim]cached[/dim]", "ran": "[green]done[/green]", "failed": "[red]failed[/red]",
                "skipped": "[yellow]skipped[/yellow]", "not run": "[yellow]not run[/yellow]"}[task.state]
        extra = ""
        if task.state == "ran":
            extra = f" in {task.seconds:.1f}s"
        if task.result is not None and task.stage in ("lint", "validate", "eval"):
            extra += " (passed)" if task.result.get("passed") else " ([red]gate failed[/red])"
        if task.error:
            extra += f": {task.error}"
        self.console.print(f"[{i}/{self.total}] {task.stage} {task.label}: {mark}{extra} [dim]{task.key[:12]}[/dim]",
                           highlight=False)
        if self.progress:
            self.progress.advance(self.bar)


# ----- the run -------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    exit_code: int
    tasks: list[Task]
    summary: dict | None = None
    paths: dict[str, Path] = field(default_factory=dict)


def run(spec_path, *, only: str | None = None, dry_run: bool = False, workdir=None, stages: Stages | None = None,
        console=None) -> Outcome:
    from rich.console import Console

    console = console or Console(highlight=False)
    if only is not None and only not in STAGES:
        raise OmniqError(f"--only {only!r}: choose one of {', '.join(STAGES)}")
    spec = load(spec_path)
    if workdir is not None:
        from dataclasses import replace

        spec = replace(spec, workdir=Path(workdir).expanduser().resolve())
    from omniq.model.checkpoint import resolve

    source_dir = resolve(spec.source)
    store = cache.Store(spec.workdir / "cache")
    hashes = cache.HashCache(spec.workdir / "hashes.json")
    if not dry_run:
        store.lock()
    try:
        source_key, _ = cache.tree_digest(source_dir, hashes)
        tasks = make_tasks(spec, source_key, hashes)
        if not dry_run:
            hashes.save()
        for t in tasks:
            t.finished = store.get(t.stage, t.key)
        if dry_run:
            return _dry_run(console, spec, tasks)
        stages = stages or default_stages()
        if spec.task_eval is not None and stages.eval is None:
            raise OmniqError(f"pipeline {spec.file}: `eval:` is set but this run has no eval stage function")
        console.print(f"omniq pipeline {spec.name}: {len(spec.columns)} recipe(s) × {len(spec.targets)} target(s), "
                      f"{len(tasks)} stage outputs, work directory {spec.workdir}")
        with Display(console, len(tasks)) as display:
            i = 0
            for stage in STAGES:
                for task in (t for t in tasks if t.stage == stage):
                    i += 1
                    display.begin(i, task)
                    _run_task(task, tasks, spec, source_dir, store, stages, only, display)
                    display.done(i, task)
        return _finish(console, spec, tasks)
    finally:
        store.unlock()


def _run_task(task: Task, tasks: list[Task], spec: PipelineSpec, source_dir: Path, store: cache.Store,
              stages: Stages, only: str | None, display: Display) -> None:
    if task.finished is not None:
        task.state = "cached"
        return
    if only is not None and task.stage != only:
        task.state = "not run"
        return
    inputs, why, state = needs(task, tasks)
    if inputs is None:
        task.state, task.error = state, why
        if only is not None and state == "not run":
            task.exit_code = 2
            task.error = f"{why}; run the pipeline without --only (or --only for the earlier stage) first"
        return
    tmp = store.begin(task.stage, task.key)
    ctx = StageContext(spec, task.column, tmp, source_dir, inputs, target=task.target, publish=task.publish,
                       ref=task.ref, progress=display.inner_progress,
                       reference_cache=store.root / REFERENCE_CACHE)
    t0 = time.perf_counter()
    try:
        result = getattr(stages, task.stage)(ctx)
        task.finished = store.commit(task.stage, task.key, tmp, result)
        task.state = "ran"
    except OmniqError as e:
        store.abort(tmp)
        task.state, task.error, task.exit_code = "failed", str(e), e.exit_code
    except BaseException:
        store.abort(tmp)
        raise
    finally:
        task.seconds = time.perf_counter() - t0


def _dry_run(console, spec: PipelineSpec, tasks: list[Task]) -> Outcome:
    from rich.table import Table

    table = Table(title=f"omniq pipeline {spec.name} (dry run): work directory {spec.workdir}")
    for c in ("stage", "matrix", "key", "status"):
        table.add_column(c)
    for t in tasks:
        t.state = "cached" if t.finished else "would run"
        table.add_row(t.stage, t.label, t.key[:12], t.state)
    console.print(table)
    n = sum(t.state == "would run" for t in tasks)
    console.print(f"{n} of {len(tasks)} stage outputs would run" if n else
                  f"nothing to do: all {len(tasks)} stage outputs are cached")
    return Outcome(0, tasks)


# ----- the summary ------------------------------------------------------------------------------------------
def _artifact_record(col: Column, tasks: list[Task]) -> dict:
    q, lint, val = (_column(tasks, col, s)[0] for s in ("quantize", "lint", "validate"))
    ev = next(iter(_column(tasks, col, "eval")), None)
    errors = [f"{t.stage}{' ' + (t.target or t.ref) if (t.target or t.ref) else ''}: {t.error}"
              for t in tasks if t.column.id == col.id and t.state in ("failed", "not run", "skipped") and t.error]
    path = size = None
    formats = {}
    if q.result is not None:
        path = str(q.finished.path / q.result["path"])
        size = q.result.get("bytes")
        formats = q.result.get("counts") or {}
    v = val.result or {}
    deltas = {k: v[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate",
                                "ppl_ratio", "tokens") if v.get(k) is not None}
    gates = {"thresholds": v.get("gates"), "validate": v.get("passed") if val.result else None,
             "failures": v.get("failures") or [],
             "lint": lint.result.get("passed") if lint.result else None,
             "lint_errors": lint.result.get("errors") if lint.result else None,
             "eval": (ev.result.get("passed") if ev.result else None) if ev else None}
    builds = [{"target": b.target, "status": "ok" if b.finished else b.state, "key": b.key,
               "path": str(b.finished.path / b.result["path"]) if b.finished else None,
               "warnings": (b.result or {}).get("warnings", [])} for b in _column(tasks, col, "build")]
    published = [{"ref": p.ref, "status": "ok" if p.finished else p.state, **(p.result or {})}
                 for p in _column(tasks, col, "publish")]
    mine = [t for t in tasks if t.column.id == col.id]
    if any(t.exit_code == 2 for t in mine):
        status = "error"
    elif False in (gates["validate"], gates["lint"], gates["eval"]) or any(t.exit_code == 1 for t in mine):
        status = "gates failed"
    elif all(t.finished for t in mine):
        status = "passed"
    else:
        status = "incomplete"
    return {"id": col.id, "recipe": col.recipe, "kv_cache": resolved_recipe(col)["kv_cache"], "key": q.key,
            "path": path,
            "size_bytes": size, "formats": formats, "deltas": deltas, "gates": gates,
            "task_accuracy": (ev.result or {}).get("tasks") if ev else None, "builds": builds,
            "published": published, "status": status, "errors": errors}


def exit_code(tasks: list[Task], artifacts: list[dict]) -> int:
    if any(t.exit_code == 2 for t in tasks):
        return 2
    if any(t.exit_code == 1 for t in tasks) or any(a["status"] == "gates failed" for a in artifacts):
        return 1
    return 0


def make_summary(spec: PipelineSpec, tasks: list[Task]) -> dict:
    artifacts = [_artifact_record(col, tasks) for col in spec.columns]
    states = [t.state for t in tasks]
    return {
        "pipeline": spec.name, "file": str(spec.file), "source": spec.source, "workdir": str(spec.workdir),
        "targets": list(spec.targets),
        "exit_code": exit_code(tasks, artifacts),
        "stages": {"total": len(tasks), "ran": states.count("ran"), "cached": states.count("cached"),
                   "failed": states.count("failed"), "skipped": states.count("skipped"),
                   "not_run": states.count("not run")},
        "artifacts": artifacts,
        "tasks": [{"stage": t.stage, "matrix": t.label, "key": t.key, "state": t.state,
                   "seconds": round(t.seconds, 2), "error": t.error} for t in tasks],
    }


def _finish(console, spec: PipelineSpec, tasks: list[Task]) -> Outcome:
    summary = make_summary(spec, tasks)
    paths = summary_mod.write(summary, spec.workdir)
    console.print(summary_mod.table(summary))
    st = summary["stages"]
    if st["ran"] == st["failed"] == st["not_run"] == 0:
        console.print(f"nothing to do: all {st['cached']} stage outputs were already in the cache"
                      + (f" ({st['skipped']} skipped: their gates failed)" if st["skipped"] else ""))
    else:
        console.print(f"ran {st['ran']} of {st['total']} stage outputs ({st['cached']} cached)")
    console.print(f"summary: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    return Outcome(summary["exit_code"], tasks, summary, paths)
