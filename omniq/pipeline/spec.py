"""The pipeline file: what `omniq pipeline PIPELINE.yaml` builds, checked completely before anything runs.

    name: tiny                          # names the run (summary titles, {name} in publish references)
    source: tiny                        # checkpoint directory, bundled name or hub id (org/name)
    workdir: ../out/pipeline-tiny       # stage outputs (the cache) and the summary [default: .omniq-pipeline/NAME]
    calibration: {set: tiny-calib, samples: 64, seq_len: 256}   # omniq quantize --calib ... (column, split too)
    evaluation: {set: eval, samples: 64, seq_len: 256}          # omniq validate --eval ...
    # chat data, either or both: format: chat (--calib-format / --eval-format chat), reasoning_share: 0.5
    # (--reasoning-share), column [default: messages], split (evaluation: with format chat only)
    recipes:                            # the matrix's columns
      - recipe: fp8                     # built-in name or YAML file
        gates: {max_kl: 0.01, min_top1: 0.95, max_ppl_ratio: 1.01}   # omitted ones: per-format defaults
      - recipe: nvfp4
        id: nvfp4-kv                    # column name [default: the recipe's name]
        kv_cache: fp8                   # override the recipe's KV cache
    targets: [h100, b200]               # the matrix's rows: omniq build --gpu (may be empty)
    build: {tp: 1, max_batch: 64}       # omniq build options (tp, ep, max_batch, max_seq_len, trtllm_version)
    lint: {engine: trtllm}              # omniq lint --engine
    eval:                               # optional: omniq eval (lm-eval-harness task accuracy, gated per task)
      tasks: [omniq-docstring-cloze]    # bundled name, task YAML file or lm-eval task name
      limit: 100                        # examples per task [default: all]
      min_recovery: 0.95                # per-task gate: candidate / reference score
    publish:                            # per column; {name} {recipe} (column id) {key} (artifact key, 12 hex),
      - oci://${REGISTRY}/omniq/{name}:{recipe}-{key}    # ${VAR}: from the environment
      - {ref: "hf://acme/{name}-{recipe}", force: false, allow_failed: false}

Relative paths (source, workdir, recipe files, data files) are relative to the pipeline file. Any mistake is
an OmniqError (exit 2) naming the key.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from omniq.errors import OmniqError

TOP_KEYS = {"name", "source", "workdir", "calibration", "evaluation", "recipes", "targets", "build", "lint",
            "eval", "publish"}
CAL_KEYS = {"set", "samples", "seq_len", "column", "split", "format", "reasoning_share"}
EVAL_KEYS = {"set", "samples", "seq_len", "format", "reasoning_share", "column", "split"}
EVAL_CHAT_KEYS = {"column", "split"}      # validate's --eval-column / --eval-split apply to chat data only
RECIPE_KEYS = {"recipe", "id", "kv_cache", "gates"}
GATE_KEYS = {"max_kl", "min_top1", "max_ppl_ratio"}
BUILD_KEYS = {"tp", "ep", "max_batch", "max_seq_len", "trtllm_version"}
LINT_KEYS = {"engine"}
TASK_EVAL_KEYS = {"tasks", "limit", "min_recovery"}
PUBLISH_KEYS = {"ref", "force", "allow_failed", "plain_http"}
PLACEHOLDERS = {"name", "recipe", "key"}
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class DataSet:
    set: str
    samples: int
    seq_len: int
    column: str = "text"
    split: str = "train"
    format: str = "text"                   # text, or chat (quantize --calib-format / validate --eval-format)
    reasoning_share: float | None = None   # chat: the share rendered with reasoning on (resolved default)

    def identity(self) -> dict:
        """What names this data in a cache key (the chat fields only for chat data, so a text pipeline's
        keys are what they were before chat data existed)."""
        ident = {"set": self.set, "samples": self.samples, "seq_len": self.seq_len, "column": self.column,
                 "split": self.split}
        if self.format != "text":
            ident.update(format=self.format, reasoning_share=self.reasoning_share)
        return ident


@dataclass(frozen=True)
class Column:
    id: str
    recipe: str                        # built-in name or absolute path of a YAML file
    kv_cache: str | None = None
    gates: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEval:
    tasks: tuple[str, ...]             # as `omniq eval --tasks` takes them; task files absolute
    limit: int | None = None
    min_recovery: float = 0.95


@dataclass(frozen=True)
class PublishTarget:
    ref: str                           # template
    force: bool = False
    allow_failed: bool = False
    plain_http: bool = False

    def expand(self, name: str, column: str, artifact_key: str) -> str:
        return self.ref.format(name=name, recipe=column, key=artifact_key[:12])


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    file: Path
    source: str                        # absolute directory, bundled name or hub id
    workdir: Path
    calibration: DataSet
    evaluation: DataSet
    columns: tuple[Column, ...]
    targets: tuple[str, ...] = ()
    build: dict = field(default_factory=dict)
    lint_engine: str | None = None
    publish: tuple[PublishTarget, ...] = ()
    task_eval: TaskEval | None = None  # the `eval:` key: an eval stage per column


def _fail(file, msg: str):
    raise OmniqError(f"pipeline {file}: {msg}")


def _mapping(file, data, where: str, allowed: set) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(file, f"{where} must be a mapping")
    unknown = sorted(set(data) - allowed)
    if unknown:
        _fail(file, f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return data


def _int(file, v, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(file, f"{where} must be an integer >= {minimum}, got {v!r}")
    return v


def _bool(file, v, where: str) -> bool:
    if not isinstance(v, bool):
        _fail(file, f"{where} must be true or false, got {v!r}")
    return v


def _local(base: Path, value: str) -> str:
    """A path relative to the pipeline file when it exists there, else the value as given (a name / id)."""
    p = Path(value).expanduser()
    cand = p if p.is_absolute() else base / p
    return str(cand.resolve()) if cand.exists() else value


def _dataset(file, base: Path, data, where: str, allowed: set, default_set: str, default_n: int,
             default_len: int) -> DataSet:
    from omniq.calib import chat

    d = _mapping(file, data, where, allowed)
    s = d.get("set", default_set)
    if not isinstance(s, str) or not s:
        _fail(file, f"{where}.set must be a name or a file path")
    fmt = d.get("format", "text")
    try:
        chat.check_format(fmt, f"{where}.format")
        share = chat.check_share(d.get("reasoning_share"), fmt, f"{where}.reasoning_share")
    except OmniqError as e:
        _fail(file, str(e))
    if fmt != "chat" and allowed is EVAL_KEYS and set(d) & EVAL_CHAT_KEYS:
        _fail(file, f"{where}.{sorted(set(d) & EVAL_CHAT_KEYS)[0]} applies to format: chat (a text evaluation set is "
                    "a .txt or a .jsonl with a \"text\" field)")
    return DataSet(set=_local(base, s), samples=_int(file, d.get("samples", default_n), f"{where}.samples"),
                   seq_len=_int(file, d.get("seq_len", default_len), f"{where}.seq_len", 2),
                   column=str(d.get("column", chat.COLUMN if fmt == "chat" else "text")),
                   split=str(d.get("split", "train")), format=fmt,
                   reasoning_share=share if fmt == "chat" else None)


def _columns(file, base: Path, data) -> tuple[Column, ...]:
    from omniq.quant import recipe as recipes

    if not isinstance(data, list) or not data:
        _fail(file, "recipes must be a non-empty list (each `recipe: NAME` or a mapping with recipe, gates)")
    cols, seen = [], set()
    for i, item in enumerate(data):
        where = f"recipes[{i}]"
        item = {"recipe": item} if isinstance(item, str) else _mapping(file, item, where, RECIPE_KEYS)
        if not isinstance(item.get("recipe"), str):
            _fail(file, f"{where}: give `recipe: NAME` (built-in) or a YAML file path")
        ref = item["recipe"]
        local = _local(base, ref)
        try:
            rec = recipes.load(local).with_kv_cache(item.get("kv_cache"))
        except OmniqError as e:
            _fail(file, f"{where}: {e}")
        cid = str(item.get("id", rec.name))
        if not _ID.match(cid):
            _fail(file, f"{where}: id {cid!r} must be lowercase letters, digits, . _ - (it names outputs)")
        if cid in seen:
            _fail(file, f"{where}: column id {cid!r} is used twice; give one of them `id:`")
        seen.add(cid)
        gates = _mapping(file, item.get("gates"), f"{where}.gates", GATE_KEYS)
        for k, v in gates.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(file, f"{where}.gates.{k} must be a number, got {v!r}")
        cols.append(Column(cid, local, item.get("kv_cache"), {k: float(v) for k, v in gates.items()}))
    return tuple(cols)


def _expand_env(file, ref: str, where: str) -> str:
    """`${NAME}` -> the environment variable (a registry host from CI variables, say)."""
    def sub(m):
        value = os.environ.get(m.group(1))
        if not value:
            _fail(file, f"{where}: {m.group(0)} is used but the environment variable {m.group(1)} is not set")
        return value

    return _ENV.sub(sub, ref)


def _publish(file, data) -> tuple[PublishTarget, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        _fail(file, "publish must be a list of references (oci://... or hf://...)")
    out = []
    for i, item in enumerate(data):
        where = f"publish[{i}]"
        item = {"ref": item} if isinstance(item, str) else _mapping(file, item, where, PUBLISH_KEYS)
        ref = item.get("ref")
        if not isinstance(ref, str):
            _fail(file, f"{where}: give a reference string (oci://HOST/REPO:TAG or hf://ORG/NAME)")
        ref = _expand_env(file, ref, where)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(ref) if f is not None}
        except ValueError as e:
            _fail(file, f"{where}: {ref!r} is not a valid template ({e})")
        bad = sorted(names - PLACEHOLDERS)
        if bad:
            _fail(file, f"{where}: unknown placeholder {{{bad[0]}}}; use {{name}}, {{recipe}} or {{key}}")
        target = PublishTarget(ref, *(_bool(file, item.get(k, False), f"{where}.{k}")
                                      for k in ("force", "allow_failed", "plain_http")))
        sample = target.expand("name", "recipe", "0" * 64)
        try:
            if sample.startswith("oci://"):
                from omniq.publish import oci

                oci.parse_ref(sample, need_tag=True)
            elif sample.startswith("hf://"):
                from omniq.publish import hub

                hub.parse_ref(sample)
            else:
                raise OmniqError(f"{ref}: expected oci://... or hf://...")
        except OmniqError as e:
            _fail(file, f"{where}: {e}")
        out.append(target)
    return tuple(out)


def _task_eval(file, base: Path, data) -> TaskEval | None:
    if data is None:
        return None
    d = _mapping(file, data, "eval", TASK_EVAL_KEYS)
    tasks = d.get("tasks")
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        _fail(file, "eval.tasks must be a non-empty list of task names or task YAML files")
    limit = _int(file, d["limit"], "eval.limit") if d.get("limit") is not None else None
    rec = d.get("min_recovery", 0.95)
    if isinstance(rec, bool) or not isinstance(rec, (int, float)) or not 0 < rec <= 10:
        _fail(file, f"eval.min_recovery must be a ratio such as 0.95, got {rec!r}")
    return TaskEval(tuple(_local(base, t) for t in tasks), limit, float(rec))


def parse(data, file: Path) -> PipelineSpec:
    base = file.parent
    d = _mapping(file, data, "the top level", TOP_KEYS)
    for k in ("name", "source", "recipes"):
        if k not in d:
            _fail(file, f"missing required key {k!r}")
    name = d["name"]
    if not isinstance(name, str) or not _ID.match(name):
        _fail(file, f"name {name!r} must be lowercase letters, digits, . _ - (it names outputs)")
    if not isinstance(d["source"], str) or not d["source"]:
        _fail(file, "source must be a checkpoint directory, a bundled name or a hub id")
    workdir = Path(str(d.get("workdir") or f".omniq-pipeline/{name}")).expanduser()
    workdir = (workdir if workdir.is_absolute() else base / workdir).resolve()
    from omniq.calib import data as calib_data

    calibration = _dataset(file, base, d.get("calibration"), "calibration", CAL_KEYS, calib_data.DEFAULT, 64, 256)
    evaluation = _dataset(file, base, d.get("evaluation"), "evaluation", EVAL_KEYS, "eval", 64, 256)
    targets = d.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        _fail(file, "targets must be a list of GPU names (h100, b200, sm90, ...)")
    if len(set(targets)) != len(targets):
        _fail(file, "targets lists a GPU twice")
    from omniq.gpus import resolve_gpu

    for t in targets:
        try:
            resolve_gpu(t)
        except OmniqError as e:
            _fail(file, f"targets: {e}")
    build = _mapping(file, d.get("build"), "build", BUILD_KEYS)
    for k in ("tp", "ep", "max_batch", "max_seq_len"):
        if k in build:
            _int(file, build[k], f"build.{k}")
    lint = _mapping(file, d.get("lint"), "lint", LINT_KEYS)
    return PipelineSpec(name=name, file=file, source=_local(base, d["source"]), workdir=workdir,
                        calibration=calibration, evaluation=evaluation, columns=_columns(file, base, d["recipes"]),
                        targets=tuple(targets), build=dict(build), lint_engine=lint.get("engine"),
                        publish=_publish(file, d.get("publish")), task_eval=_task_eval(file, base, d.get("eval")))


def load(path) -> PipelineSpec:
    import yaml

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise OmniqError(f"pipeline file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OmniqError(f"pipeline {file}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse(data, file)
