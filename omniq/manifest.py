"""The files omniq writes into an artifact directory, and reading them: `omniq.json` (the manifest, whose
`files` maps every checkpoint file's relative path to its sha256) and the sidecars shipped beside it
(validation.json, lint.json, eval.json, README.md). Ground floor: validate (lint), publish and the pipeline all read
artifacts through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omniq.errors import OmniqError

MANIFEST = "omniq.json"
VALIDATION = "validation.json"
LINT = "lint.json"
EVAL = "eval.json"
CARD = "README.md"
SIDECARS = (VALIDATION, LINT, EVAL, CARD)
EVAL_TASK_KEYS = ("reference", "candidate", "delta", "min_recovery")
DELTA_KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OmniqError(f"{path}: cannot read {what} as JSON ({str(e).splitlines()[0]}); "
                         "rewrite it or re-run the step that writes it") from None
    if not isinstance(data, dict):
        raise OmniqError(f"{path}: {what} is not a JSON object; re-run the step that writes it")
    return data


# ----- exact readers: omniq writes one shape of each file, and reads exactly that shape --------------------
# A key omniq writes that is missing or of another type is an OmniqError naming the file and the key, never a
# guess among alternatives. Keys omniq does not read are left alone (a newer omniq may add some).
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FINDING_KEYS = ("id", "severity", "tensor_or_module", "message", "fix")
SEVERITIES = ("error", "warning", "info")
_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true / false", int: "an integer",
          float: "a number", type(None): "null"}


def _kind(v) -> str:
    return _KINDS.get(type(v), type(v).__name__)


class _Doc:
    """Typed access to one JSON document, each failure naming the file, the key and what omniq writes there."""

    def __init__(self, data, where: str, fix: str):
        self.data, self.where, self.fix = data, where, fix

    def fail(self, key: str, problem: str):
        raise OmniqError(f"{self.where}: `{key}` {problem}; not the shape omniq writes ({self.fix})")

    def get(self, obj: dict, key: str, want: tuple, what: str, prefix: str = ""):
        name = f"{prefix}{key}"
        if key not in obj:
            self.fail(name, f"is missing ({what} expected)")
        v = obj[key]
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
            self.fail(name, f"is {_kind(v)}, not {what}")
        return v

    def mapping(self, obj: dict, key: str, values: tuple, what: str, prefix: str = "") -> dict:
        m = self.get(obj, key, (dict,), f"an object of {what}", prefix)
        for k, v in m.items():
            if not isinstance(v, values) or (isinstance(v, bool) and bool not in values):
                self.fail(f"{prefix}{key}[{k!r}]", f"is {_kind(v)}, not {what}")
        return m

    def sequence(self, obj: dict, key: str, items: type, what: str) -> list:
        seq = self.get(obj, key, (list,), f"a list of {what}")
        for i, v in enumerate(seq):
            if not isinstance(v, items):
                self.fail(f"{key}[{i}]", f"is {_kind(v)}, not {_KINDS[items]}")
        return seq


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise OmniqError(f"{path}: no {what}")
    return read_json(path, what)


def check_manifest(data: dict, where: str) -> dict:
    """omniq.json as `omniq quantize` writes it (export/hf_checkpoint.write_manifest)."""
    d = _Doc(data, where, "re-export the artifact with `omniq quantize`")
    if d.get(data, "omniq_manifest", (int,), "the manifest version 1") != 1:
        d.fail("omniq_manifest", f"is {data['omniq_manifest']}, this omniq reads version 1")
    d.get(data, "created", (str,), "an ISO timestamp")
    d.mapping(data, "versions", (str, type(None)), "package -> version")
    source = d.get(data, "source", (dict,), "an object")
    d.get(source, "model", (str,), "a string", "source.")
    d.mapping(source, "files", (str,), "file -> sha256", "source.")
    recipe = d.get(data, "recipe", (dict,), "the resolved recipe")
    d.get(recipe, "name", (str,), "a string", "recipe.")
    d.get(data, "calibration", (dict,), "the calibration identity")
    d.mapping(data, "modules", (str,), "module -> format")
    files = d.mapping(data, "files", (str,), "relative path -> sha256")
    if not files:
        d.fail("files", "is empty")
    for rel, digest in files.items():
        if not SHA256_HEX.fullmatch(digest):
            d.fail(f"files[{rel!r}]", f"is {digest!r}, not a sha256 (64 lowercase hex digits)")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or rel in (MANIFEST, *SIDECARS):
            d.fail(f"files[{rel!r}]", "names a path that cannot be an artifact file")
    return data


def check_lint(data: dict, where: str) -> dict:
    """lint.json as `omniq lint --report` / `omniq quantize` write it (validate/findings.as_json)."""
    d = _Doc(data, where, "re-run `omniq lint ARTIFACT --report ARTIFACT/lint.json`")
    d.get(data, "path", (str,), "a string")
    d.get(data, "engine", (str, type(None)), "an engine name or null")
    d.get(data, "passed", (bool,), "true / false")
    d.mapping(data, "counts", (int,), "severity -> count")
    for i, f in enumerate(d.sequence(data, "findings", dict, "findings")):
        for k in FINDING_KEYS:
            d.get(f, k, (str,), "a string", f"findings[{i}].")
        if f["severity"] not in SEVERITIES:
            d.fail(f"findings[{i}].severity", f"is {f['severity']!r}, not one of {', '.join(SEVERITIES)}")
    return data


def check_validation(data: dict, where: str) -> dict:
    """validation.json as `omniq validate --report` writes it (validate/run.validate)."""
    d = _Doc(data, where, "re-run `omniq validate REFERENCE ARTIFACT --report ARTIFACT/validation.json`")
    for k in DELTA_KEYS:
        d.get(data, k, (int,) if k == "tokens" else (int, float), "an integer" if k == "tokens" else "a number")
    d.get(data, "passed", (bool,), "true / false")
    d.get(data, "gates", (dict,), "the gates applied")
    d.sequence(data, "failures", str, "failed gates")
    d.get(data, "format", (str,), "the candidate's format")
    d.get(data, "kv_cache", (str, type(None)), "the KV-cache format or null")
    d.mapping(data, "layer_formats", (int,), "format -> layer count")
    d.get(data, "eval", (dict,), "the evaluation set")
    return data


def check_eval(data: dict, where: str) -> dict:
    """eval.json as `omniq eval --out` writes it (validate/task_eval.evaluate)."""
    d = _Doc(data, where, "re-run `omniq eval REFERENCE ARTIFACT --tasks ... --out ARTIFACT/eval.json`")
    d.get(data, "passed", (bool,), "true / false")
    d.sequence(data, "failures", str, "failed gates")
    d.get(data, "format", (str,), "the candidate's format")
    tasks = d.get(data, "tasks", (dict,), "task -> scores")
    for name, t in tasks.items():
        if not isinstance(t, dict):
            d.fail(f"tasks[{name!r}]", f"is {_kind(t)}, not an object")
        d.get(t, "metric", (str,), "a string", f"tasks[{name!r}].")
        for k in EVAL_TASK_KEYS:
            d.get(t, k, (int, float), "a number", f"tasks[{name!r}].")
        for k in ("reference_stderr", "candidate_stderr", "delta_stderr", "recovery"):
            d.get(t, k, (int, float, type(None)), "a number or null", f"tasks[{name!r}].")
        d.get(t, "passed", (bool,), "true / false", f"tasks[{name!r}].")
    return data


def read_eval(path: Path) -> dict:
    return check_eval(_load(path, "task-accuracy report"), str(path))


def read_manifest(path: Path) -> dict:
    return check_manifest(_load(path, MANIFEST), str(path))


def read_lint(path: Path) -> dict:
    return check_lint(_load(path, "lint report"), str(path))


def read_validation(path: Path) -> dict:
    return check_validation(_load(path, "validation report"), str(path))


def listed_files(manifest: dict) -> dict[str, str]:
    """omniq.json `files` (checked by `check_manifest`): relative POSIX path -> sha256 hex."""
    return {Path(rel).as_posix(): digest for rel, digest in manifest["files"].items()}


def module_formats(manifest: dict) -> dict[str, str]:
    """omniq.json `modules` (checked by `check_manifest`): module -> format."""
    return dict(manifest["modules"])
