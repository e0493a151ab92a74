"""`omniq eval REFERENCE CANDIDATE --tasks T1,T2`: task accuracy of both checkpoints through lm-eval-harness.

Both checkpoints are read from their files (`artifact.read_artifact`, as validate does) and evaluated by
lm-eval-harness (`lm_eval.simple_evaluate`) with `omniq.validate.lm.ArtifactLM` as the model: the candidate
dequantized, its activations and KV cache quantized as the engine would, scored layer-streamed. Per task the
report has both scores of the task's main metric (`acc` when the task has it, else its first metric) with
lm-eval's standard errors, the delta candidate - reference with its standard error (the two errors added in
quadrature: the samples are the same documents, so this is conservative), the recovery candidate /
reference, and a gate on recovery (`min_recovery`, default 0.95 per task, as llm-compressor's CI gates its
quantized models; a reference score of 0 gives no recovery and passes only if the candidate's is not below
it). `passed` is every gate; the CLI exits 1 when one fails.

Tasks: `omniq-docstring-cloze` (bundled: `omniq/validate/tasks/`, choose the true continuation of a held-out
docstring among four, no hub data), a task YAML file (`path/to/task.yaml`: its folder is added to lm-eval's
task search path and its `task:` name is used), or any task name lm-eval knows (its data may need the hub).
lm-eval is an optional extra (`pip install 'omniq[eval]'`), imported only here.

Refused before any model runs (OmniqError, exit 2, nothing written): lm-eval missing, a task that does not
exist, a task with no examples after `limit`, an existing report without `force` or one whose directory does
not exist, checkpoints that are not the same model, a run whose predicted peak (`preflight`,
`lm.estimate_bytes`: one layer, a pass's hidden states, a logits chunk; a whole model in float32 for a task
that generates) does not fit the process's memory limit. The report records that estimate (`memory`). The
report (`eval.json` in an artifact) is bound to what it judged like validation.json (`bound_to`,
`omniq.validate.binding`).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from omniq.errors import OmniqError

BUNDLED_DIR = Path(__file__).parent / "tasks"
BUNDLED = ("omniq-docstring-cloze",)
DEFAULT_MIN_RECOVERY = 0.95
BOOTSTRAP_ITERS = 1000              # lm-eval's stderr of non-mean metrics; `acc` (a mean) has a closed form
SEED = 1234


@dataclass(frozen=True)
class TaskSpec:
    """A task as the user named it, the name lm-eval knows it by, and the folder it comes from (None:
    lm-eval's own registry)."""

    given: str
    name: str
    folder: Path | None


def require_lm_eval() -> str:
    if importlib.util.find_spec("lm_eval") is None:
        raise OmniqError("omniq eval needs lm-eval-harness, which is not installed: pip install 'omniq[eval]' "
                         "(or lm_eval==0.4.13)")
    return importlib.metadata.version("lm_eval")


def _yaml_task_name(path: Path) -> str:
    """The `task:` of a task YAML (lm-eval's `!function` tags and others read as plain values)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise OmniqError(f"--tasks {path}: cannot read it as a task YAML ({str(e).splitlines()[0]})") from None
    name = data.get("task") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise OmniqError(f"--tasks {path}: no `task:` name in it; an lm-eval task YAML names its task")
    return name


def parse_tasks(tasks: str | list[str]) -> list[TaskSpec]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    items = [t.strip() for t in items if t and t.strip()]
    if not items:
        raise OmniqError("--tasks: name at least one task (e.g. omniq-docstring-cloze or path/to/task.yaml)")
    out = []
    for t in items:
        p = Path(t).expanduser()
        if t in BUNDLED:
            out.append(TaskSpec(t, t, BUNDLED_DIR))
        elif t.endswith((".yaml", ".yml")) or p.exists():
            if not p.is_file():
                raise OmniqError(f"--tasks {t}: no such task file")
            out.append(TaskSpec(t, _yaml_task_name(p), p.resolve().parent))
        else:
            out.append(TaskSpec(t, t, None))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise OmniqError(f"--tasks names a task twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return out


def task_manager(specs: list[TaskSpec]):
    """lm-eval's TaskManager over the bundled and given task folders; lm-eval's own 14,000-odd task
    configs are indexed (about 20 s) only when a task is named from them."""
    from lm_eval.tasks import TaskManager

    folders = sorted({str(s.folder) for s in specs if s.folder is not None})
    defaults = any(s.folder is None for s in specs)
    tm = TaskManager(include_path=folders or None, include_defaults=defaults)
    known = set(tm.all_tasks)
    for s in specs:
        if s.name not in known:
            near = difflib.get_close_matches(s.name, sorted(known), n=3)
            where = f"in {s.folder}" if s.folder is not None else "among lm-eval's tasks"
            raise OmniqError(f"--tasks {s.given}: no task {s.name!r} {where}"
                             + (f" (did you mean {', '.join(near)}?)" if near else "")
                             + f"; bundled: {', '.join(BUNDLED)}, or pass a task YAML file")
    return tm


def count_examples(tm, specs: list[TaskSpec], limit: int | None) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Examples each task evaluates after `limit` (a task with none is refused, exit 2), and each task's
    lm-eval output types (`generate_until` decodes with whole-model forwards: the preflight counts it)."""
    try:
        loaded = tm.load([s.name for s in specs])["tasks"]
    except OmniqError:
        raise
    except IndexError as e:           # lm-eval reads the first example while it builds a task
        raise OmniqError(f"--tasks {','.join(s.given for s in specs)}: no examples to evaluate (lm-eval: "
                         f"{str(e).splitlines()[0] if str(e) else 'empty split'})") from None
    except Exception as e:  # noqa: BLE001  (lm-eval / datasets fail in many ways on a task's data)
        raise OmniqError(f"--tasks {','.join(s.given for s in specs)}: lm-eval cannot load the task data "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    counts, kinds = {}, {}
    for s in specs:
        task = loaded.get(s.name)
        if task is None:                      # a group: lm-eval evaluates its leaves
            leaves = [t for n, t in loaded.items() if n != s.name]
            n = sum(len(t.eval_docs) for t in leaves)
        else:
            leaves = [task]
            try:
                n = len(task.eval_docs)
            except Exception as e:  # noqa: BLE001  (a task whose data cannot be read names itself here)
                raise OmniqError(f"--tasks {s.given}: cannot read its examples ({str(e).splitlines()[0]})") from None
        kinds[s.name] = {str(getattr(t, "OUTPUT_TYPE", "")) for t in leaves}
        n = min(n, limit) if limit is not None else n
        if n < 1:
            raise OmniqError(f"--tasks {s.given}: no examples to evaluate"
                             + (f" after --limit {limit}" if limit is not None else ""))
        counts[s.name] = n
    return counts, kinds


def preflight(reference, candidate, device, kinds: dict[str, set[str]]) -> dict:
    """Refuse (exit 2) before any weight is read when scoring, or a generating task, cannot fit the memory
    limit of this process (`omniq.memory_limit`: its cgroup, else MemAvailable; the device's free memory with
    --device cuda): `lm.estimate_bytes` of the larger artifact (they run one after the other)."""
    from omniq import memory_limit
    from omniq.validate.lm import estimate_bytes

    generating = sorted(name for name, k in kinds.items() if "generate_until" in k)
    est = max((estimate_bytes(a, generate=bool(generating)) for a in (reference, candidate)),
              key=lambda e: max(e["total_bytes"], e.get("generation_bytes", 0)))
    where = str(device)
    have, source = memory_limit.available_bytes(where), memory_limit.limit_source(where)
    est.update(available_bytes=have, limit_source=source)
    gib = 2**30
    if est["total_bytes"] > have:
        raise OmniqError(f"eval needs about {est['total_bytes'] / gib:.2f} GiB (largest layer "
                         f"{est['largest_step_bytes'] / gib:.2f} GiB, hidden states of a pass "
                         f"{est['hidden_states_bytes'] / gib:.2f} GiB) but {have / gib:.2f} GiB is available "
                         f"({source}); run where more memory is, or on another --device")
    if generating and est["generation_bytes"] > have:
        raise OmniqError(f"--tasks {', '.join(generating)} generates text, which holds a whole model in float32 "
                         f"({est['generation_bytes'] / gib:.2f} GiB; generation is not layer-streamed) but "
                         f"{have / gib:.2f} GiB is available ({source}); drop that task (scoring tasks need "
                         f"{est['total_bytes'] / gib:.2f} GiB) or run where more memory is")
    return est


def main_metric(result: dict) -> str:
    """`acc` when the task reports it, else its first metric (keys are `metric,filter`)."""
    metrics = [k for k, v in result.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    if not metrics:
        raise OmniqError(f"lm-eval reported no numeric metric ({', '.join(result)})")
    for k in metrics:
        if k.split(",")[0] == "acc":
            return k
    return metrics[0]


def _number(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def quiet_lm_eval() -> None:
    """lm-eval's info lines and progress bars off (the table says what ran); its warnings stay."""
    import os

    import functools

    import datasets
    import tqdm
    from lm_eval.api import task as lm_task

    os.environ.setdefault("TQDM_DISABLE", "1")          # tqdm reads it when first imported
    datasets.disable_progress_bars()
    # the per-task "building requests" bar is a tqdm without a `disable` argument
    lm_task.tqdm = functools.partial(tqdm.tqdm, disable=True)
    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_lm_eval(lm, tm, names: list[str], limit: int | None) -> dict:
    from lm_eval import simple_evaluate

    res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                          log_samples=False, random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                          fewshot_random_seed=SEED)
    if not res or "results" not in res:
        raise OmniqError("lm-eval returned no results")
    return res


def compare(reference: dict, candidate: dict, names: list[str], min_recovery: float) -> tuple[dict, list[str]]:
    """Per task: both scores, stderrs, delta, recovery, the gate; and the failures."""
    tasks, failures = {}, []
    for name in names:
        r, c = reference["results"].get(name), candidate["results"].get(name)
        if r is None or c is None:
            raise OmniqError(f"lm-eval reported nothing for task {name}")
        key = main_metric(r)
        metric, flt = key.split(",", 1)
        stderr_key = f"{metric}_stderr,{flt}"
        ref, cand = _number(r.get(key)), _number(c.get(key))
        if ref is None or cand is None:
            raise OmniqError(f"task {name}: lm-eval gave no {metric} score")
        rs, cs = _number(r.get(stderr_key)), _number(c.get(stderr_key))
        delta_se = math.sqrt(rs ** 2 + cs ** 2) if rs is not None and cs is not None else None
        recovery = cand / ref if ref > 0 else None
        passed = (recovery >= min_recovery) if recovery is not None else cand >= ref
        n = (reference.get("n-samples") or {}).get(name, {})
        tasks[name] = {"metric": metric, "filter": flt, "reference": ref, "reference_stderr": rs,
                       "candidate": cand, "candidate_stderr": cs, "delta": cand - ref, "delta_stderr": delta_se,
                       "recovery": recovery, "min_recovery": min_recovery, "passed": passed,
                       "samples": n.get("effective"), "samples_total": n.get("original"),
                       "other_metrics": {"reference": _others(r, key), "candidate": _others(c, key)}}
        if not passed:
            rec = f"recovery {recovery:.3f} < {min_recovery:g}" if recovery is not None else "below the reference"
            failures.append(f"{name}: {metric} {cand:.4f} vs the reference's {ref:.4f}, {rec}")
    return tasks, failures


def _others(result: dict, main: str) -> dict:
    return {k: v for k, v in result.items() if "," in k and k != main and _number(v) is not None}


def evaluate(reference, candidate, tasks, *, limit: int | None = None,
             min_recovery: float = DEFAULT_MIN_RECOVERY, report_path=None, force: bool = False,
             device: str = "cpu", progress=None) -> dict:
    """Evaluate both checkpoints on `tasks` through lm-eval; see the module doc. Returns the report (and
    writes it to `report_path`)."""
    from omniq.validate import binding

    t0 = time.perf_counter()
    version = require_lm_eval()
    if limit is not None and limit < 1:
        raise OmniqError("--limit must be at least 1")
    if not 0 < min_recovery <= 10:
        raise OmniqError(f"--min-recovery {min_recovery}: expected a ratio such as 0.95")
    cand_path = Path(candidate)
    binding.check_target(report_path, cand_path if cand_path.is_dir() else str(candidate), flag="--out",
                         force=force)
    specs = parse_tasks(tasks)
    quiet_lm_eval()

    import torch  # noqa: F401  (heavy: after the cheap checks)

    from omniq.validate.artifact import check_same_model, read_artifact
    from omniq.validate.lm import ArtifactLM
    from omniq.validate.run import torch_device, write_report

    dev = torch_device(device)
    ref = read_artifact(reference)
    cand = read_artifact(candidate)
    check_same_model(ref, cand)
    tm = task_manager(specs)
    counts, kinds = count_examples(tm, specs, limit)
    memory = preflight(ref, cand, dev, kinds)
    names = [s.name for s in specs]
    runs, seconds = {}, {}
    for label, art in (("reference", ref), ("candidate", cand)):
        t = time.perf_counter()
        lm = ArtifactLM(art, device=dev, progress=(lambda d, n, w=label: progress(w, d, n)) if progress else None)
        runs[label] = run_lm_eval(lm, tm, names, limit)
        seconds[label] = round(time.perf_counter() - t, 2)
    per_task, failures = compare(runs["reference"], runs["candidate"], names, min_recovery)
    report = {
        "passed": not failures,
        "tasks": per_task,
        "failures": failures,
        "min_recovery": min_recovery,
        "limit": limit,
        "examples": counts,
        "task_sources": {s.name: (str(s.folder) if s.folder is not None else "lm-eval") for s in specs},
        "format": cand.format,
        "kv_cache": cand.kv_cache,
        "reference": str(ref.path),
        "candidate": str(cand.path),
        "device": str(dev),
        "memory": memory,
        "lm_eval": version,
        "model": "omniq ArtifactLM: weights dequantized from the files, activations / KV quantized as the "
                 "engine does, layer-streamed scoring",
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 2)},
        "warnings": ref.warnings + cand.warnings,
        binding.KEY: binding.for_validation(cand.path, ref.path),
    }
    if report_path is not None:
        write_report(report, report_path, force=force)
    return report


def summary_table(report: dict):
    """A rich table: per task both scores with stderr, delta, recovery and the gate."""
    from rich.table import Table

    table = Table(title=f"omniq eval: {report['format']} candidate vs reference, lm-eval {report['lm_eval']}"
                        f"{', --limit ' + str(report['limit']) if report['limit'] else ''}; gate: recovery >= "
                        f"{report['min_recovery']:g}")
    for c in ("task (metric, n)", "reference", "candidate", "delta", "recovery", ""):
        table.add_column(c, justify="left" if c.startswith("task") else "right")

    def pm(v, se):
        return f"{v:.3f}" + (f"±{se:.3f}" if se is not None else "")

    for name, t in report["tasks"].items():
        table.add_row(f"{name} ({t['metric']}, {t['samples'] or report['examples'].get(name, '?')})",
                      pm(t["reference"], t["reference_stderr"]), pm(t["candidate"], t["candidate_stderr"]),
                      pm(t["delta"], t["delta_stderr"]), "-" if t["recovery"] is None else f"{t['recovery']:.3f}",
                      "[green]pass[/green]" if t["passed"] else "[red]FAIL[/red]")
    return table
