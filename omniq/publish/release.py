"""What a quantized artifact directory is, whether its files are the ones it was written with, and whether it
may ship: the one place `omniq publish` (OCI and hub), the model card and the pipeline read an artifact from.

An artifact directory (from `omniq quantize`) holds the checkpoint files and `omniq.json`, omniq's manifest,
whose `files` maps every other file's relative path to its sha256 hex. Sidecar files may be added after quantization and are shipped with it, hashed as they
are (`omniq.json` cannot list them):

    validation.json   the report of `omniq validate REFERENCE ARTIFACT --report ARTIFACT/validation.json`
                      (`passed`, `kl_mean`, `kl_p95`, `top1_agreement`, `ppl_ratio`, `gates`, `failures`, ...)
    lint.json         the findings of `omniq lint ARTIFACT --report ...` (`passed`, `counts`, `findings`:
                      [{"id", "severity", "tensor_or_module", "message", "fix"}...]); an artifact passes lint
                      when no finding has severity "error"
    eval.json         optional: task accuracy of `omniq eval REFERENCE ARTIFACT --tasks ... --out ...`
                      (`passed`, `tasks`: {task: {metric, reference, candidate, delta, recovery, ...}})
    README.md         the model card (`omniq publish hf://...` writes one if absent)

Any other file that `omniq.json` does not list is refused (hidden files, such as a report being written, are
ignored and never shipped): what ships is exactly what was written and checked. All three JSON files are
read by omniq.manifest's exact readers: a file of another shape is refused naming the file and the key.
An artifact may ship only when validation.json says `passed` and lint.json has no error; `--allow-failed`
overrides that (the failure still goes into the published metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omniq.checksums import sha256_file
from omniq.errors import GateFailed, OmniqError
from omniq.manifest import (CARD, DELTA_KEYS, EVAL, LINT, MANIFEST, SIDECARS, VALIDATION,  # noqa: F401
                            listed_files, module_formats, read_eval, read_lint, read_manifest, read_validation)

@dataclass
class Release:
    path: Path
    manifest: dict                          # omniq.json
    listed: dict[str, str]                  # relative path -> sha256, from omniq.json
    sidecars: list[str] = field(default_factory=list)
    validation: dict | None = None
    lint: dict | None = None
    eval: dict | None = None                # eval.json, when the artifact has one

    @property
    def files(self) -> list[str]:
        """Every file that ships, as relative POSIX paths: the listed ones, omniq.json and the sidecars."""
        return sorted([*self.listed, MANIFEST, *self.sidecars])

    @property
    def size(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)


def open_release(path: str | os.PathLike) -> Release:
    """Read an artifact directory; refuses missing files and files omniq.json does not know."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise OmniqError(f"{root}: no such artifact directory; pass the output directory of `omniq quantize`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise OmniqError(f"{root}: no {MANIFEST}; only artifacts written by `omniq quantize` can be published")
    manifest = read_manifest(mpath)
    listed = listed_files(manifest)
    missing = [f for f in listed if not (root / f).is_file()]
    if missing:
        raise OmniqError(f"{root}: {len(missing)} file(s) listed in {MANIFEST} are missing "
                         f"({', '.join(missing[:3])}); the artifact is incomplete, re-export it")
    present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    unknown = [f for f in present if f not in listed and f != MANIFEST and f not in SIDECARS]
    if unknown:
        raise OmniqError(f"{root}: {len(unknown)} file(s) not listed in {MANIFEST} ({', '.join(unknown[:3])}); "
                         "remove them: only the files the artifact was written with (and "
                         f"{', '.join(SIDECARS)}) are published")
    sidecars = [s for s in SIDECARS if (root / s).is_file()]
    validation = read_validation(root / VALIDATION) if VALIDATION in sidecars else None
    lint = read_lint(root / LINT) if LINT in sidecars else None
    evaluation = read_eval(root / EVAL) if EVAL in sidecars else None
    return Release(root, manifest, listed, sidecars, validation, lint, evaluation)


def digests(release: Release) -> dict[str, str]:
    """sha256 of every shipped file, checked against omniq.json; raises (exit 2) on any mismatch."""
    out = {}
    bad = []
    for rel in release.files:
        digest = sha256_file(release.path / rel)
        want = release.listed.get(rel)
        if want is not None and digest != want:
            bad.append(rel)
        out[rel] = digest
    if bad:
        raise OmniqError(f"{release.path}: {len(bad)} file(s) differ from the sha256 in {MANIFEST} "
                         f"({', '.join(bad[:3])}); the artifact was modified or damaged, re-export it")
    return out


def lint_errors(lint: dict) -> list[str]:
    msgs = [f["message"] for f in lint["findings"] if f["severity"] == "error"]
    if not msgs and lint["passed"] is False:
        msgs = ["lint.json says passed: false"]
    return msgs


def gate_problems(release: Release) -> list[str]:
    """Why the artifact may not ship (empty when it passed lint and its gates)."""
    problems = []
    v = release.validation
    if v is None:
        problems.append(f"no {VALIDATION} (run `omniq validate REFERENCE {release.path} "
                        f"--report {release.path / VALIDATION}`)")
    elif v["passed"] is not True:
        failures = v["failures"] or ["passed is not true"]
        problems.append(f"validation gates failed: {'; '.join(map(str, failures))}")
    if release.lint is None:
        problems.append(f"no {LINT} (run `omniq lint {release.path} --report {release.path / LINT}`)")
    else:
        errors = lint_errors(release.lint)
        if errors:
            problems.append(f"lint found {len(errors)} error(s): {'; '.join(errors[:3])}")
    if release.eval is not None and release.eval["passed"] is not True:     # optional; gates when present
        failures = release.eval["failures"] or ["passed is not true"]
        problems.append(f"task-accuracy gates failed ({EVAL}): {'; '.join(map(str, failures))}")
    return problems


def check_publishable(release: Release, allow_failed: bool) -> list[str]:
    """Raise unless the artifact passed lint and its gates; returns the problems waved through by
    `--allow-failed` (empty when there were none)."""
    from omniq.validate import binding

    unbound = binding.problems(release.path, release.manifest, release.validation, release.lint, release.eval)
    if unbound:    # not a failed gate to wave through: the report is about something else
        raise GateFailed(f"{release.path} may not be published: {' / '.join(unbound)}")
    problems = gate_problems(release)
    if problems and not allow_failed:
        msg = f"{release.path} may not be published: {' / '.join(problems)}; pass --allow-failed to publish anyway"
        if any(p.startswith("no ") for p in problems):
            raise OmniqError(msg)
        raise GateFailed(msg)
    return problems


def declared_formats(release: Release) -> dict[str, str]:
    """Linear layer -> format as the artifact's own declaration says (`omniq.validate.declaration.Reading`,
    the reading validate, lint and build use); when the directory is not a checkpoint omniq can read
    (config.json missing or not a NemotronH), what omniq.json lists."""
    from omniq.model.checkpoint import open_checkpoint
    from omniq.validate import declaration as decl_mod

    try:
        ckpt = open_checkpoint(str(release.path), check_shapes=False)
        reading = decl_mod.reading(ckpt.path, ckpt.config, decl_mod.engine_linears(ckpt.arch),
                                   is_omni=ckpt.is_omni)
    except (OmniqError, ValueError):
        return module_formats(release.manifest)
    if reading.declared is None:
        return module_formats(release.manifest)
    return {lin.name: reading.format(lin.name) for lin in ckpt.arch.linears}


def format_counts(release: Release) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in declared_formats(release).values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def recipe(release: Release) -> dict:
    return release.manifest["recipe"]


def recipe_name(release: Release) -> str:
    return recipe(release)["name"]


def deltas(release: Release) -> dict:
    v = release.validation or {}
    return {k: v[k] for k in DELTA_KEYS if k in v}


def source(release: Release) -> dict:
    return release.manifest["source"]


def source_hashes(release: Release) -> dict[str, str]:
    return dict(source(release)["files"])


def _calibration(cal: dict) -> dict:
    """The calibration identity without the per-row hashes (those stay in omniq.json, which ships)."""
    out = {k: v for k, v in cal.items() if k != "sample_sha256"}
    if isinstance(cal.get("sample_sha256"), list):
        out["rows_hashed"] = len(cal["sample_sha256"])
    return out


def task_accuracy(release: Release) -> dict | None:
    """eval.json's per-task scores (None without one): {task: {metric, reference, candidate, delta,
    delta_stderr, recovery, min_recovery, passed, samples}}."""
    if release.eval is None:
        return None
    keep = ("metric", "reference", "candidate", "delta", "delta_stderr", "recovery", "min_recovery", "passed",
            "samples")
    return {name: {k: t.get(k) for k in keep} for name, t in release.eval["tasks"].items()}


def metadata(release: Release) -> dict:
    """What a published artifact says about itself (OCI annotations, model card, pipeline summary)."""
    v = release.validation or {}
    return {
        "recipe": recipe(release),
        "formats": format_counts(release),
        "kv_cache": recipe(release).get("kv_cache") or v.get("kv_cache"),
        "deltas": deltas(release),
        "gates": {"passed": not gate_problems(release), "problems": gate_problems(release),
                  "thresholds": v.get("gates"), "eval": v.get("eval")},
        "task_accuracy": task_accuracy(release),
        "source": {k: val for k, val in source(release).items() if k != "files"},
        "source_hashes": source_hashes(release),
        "calibration": _calibration(release.manifest["calibration"]),
        "versions": release.manifest["versions"],
    }
