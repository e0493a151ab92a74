"""Reports bound to what they judge: validation.json and lint.json name the files they were computed from.

A report carries `bound_to`:

    validation.json   {"candidate": {"path", "omniq.json": sha256 | null},
                       "reference": {"path", "files": {name: sha256}}}   (every top-level file, as
                      `omniq quantize` lists the source's files in omniq.json `source.files`)
    eval.json         as validation.json (`omniq eval` judges the candidate against the same reference)
    lint.json         {"candidate": {"path", "omniq.json": sha256 | null}}

`omniq publish` (and the pipeline, which publishes through it) refuses a report whose `omniq.json` hash is
not the artifact's in hand, or whose reference files are not the source omniq.json names (exit 1, naming
the file): a report copied from another artifact, or one computed against another reference, says nothing
about this one. omniq.json lists the sha256 of every checkpoint file, so its hash binds the report to all
of them. `check_target` keeps validate, lint and eval from writing a report into an artifact directory other than
the one they judged, and from overwriting an existing report without --force (quantize's own lint.json
included: `omniq lint ART --report ART/lint.json --force` replaces it).

Hashing the reference reads its files once (about a minute for 60 GB at disk speed); the bundled models
take well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from omniq.atomic import check_new_file
from omniq.checksums import sha256_file
from omniq.errors import OmniqError
from omniq.manifest import EVAL, LINT, MANIFEST, VALIDATION, read_json

KEY = "bound_to"
# reference files that must be the ones omniq.json's source lists (others are compared when both have them)
_MUST_MATCH = (".safetensors", "config.json")


def artifact_root(path: str | os.PathLike) -> Path | None:
    """The artifact directory (one holding omniq.json) that `path` is in or is, or None."""
    p = Path(path).expanduser().resolve()
    for d in (p, *p.parents):
        if (d / MANIFEST).is_file():
            return d
    return None


def _manifest_sha(path: Path) -> str | None:
    m = Path(path) / MANIFEST
    return sha256_file(m) if m.is_file() else None


def candidate(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser().resolve()
    return {"path": str(path), MANIFEST: _manifest_sha(path)}


def reference_files(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every top-level non-hidden file of a checkpoint directory (omniq.json `source.files`)."""
    root = Path(path)
    return {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


def for_validation(candidate_path, reference_path) -> dict:
    return {"candidate": candidate(candidate_path),
            "reference": {"path": str(Path(reference_path).resolve()), "files": reference_files(reference_path)}}


def for_lint(artifact_path) -> dict:
    return {"candidate": candidate(artifact_path)}


def check_target(report_path: str | os.PathLike | None, judged: str | os.PathLike, flag: str = "--report", *,
                 force: bool = False) -> None:
    """Refuse (exit 2, before anything runs) a report path inside an artifact directory other than `judged`,
    one that is the judged artifact's omniq.json or a file it lists (even with `force`), or one
    `atomic.check_new_file` refuses: its directory missing, a directory, an existing file without `force`."""
    if report_path is None:
        return
    parent = Path(report_path).expanduser().parent
    root = artifact_root(parent) if parent.is_dir() else None
    if root is not None and root != Path(judged).expanduser().resolve():
        raise OmniqError(f"{flag} {report_path}: that is inside the artifact {root}, not the one judged "
                         f"({judged}); a report goes into the artifact it judges, or outside any artifact")
    if root is not None:
        rel = (parent.resolve() / Path(report_path).name).relative_to(root).as_posix()
        if rel == MANIFEST or rel in (read_json(root / MANIFEST, MANIFEST).get("files") or {}):
            raise OmniqError(f"{flag} {report_path}: that is one of the artifact's own files ({rel}, listed in "
                             f"{MANIFEST}), not a report; --force never replaces those")
    check_new_file(report_path, flag, force=force)


def problems(release_path: Path, manifest: dict, validation: dict | None, lint: dict | None,
             evaluation: dict | None = None) -> list[str]:
    """Why the reports do not judge this artifact (empty when they do), one line per report, naming it."""
    out = []
    here = _manifest_sha(release_path)
    for name, report in ((VALIDATION, validation), (LINT, lint), (EVAL, evaluation)):
        if report is None:
            continue
        bound = report.get(KEY)
        cand = bound.get("candidate") if isinstance(bound, dict) else None
        if not isinstance(cand, dict):
            out.append(f"{release_path / name} records no {KEY} (the artifact it judged is unknown); "
                       f"re-run the step that writes it (with --force)")
            continue
        if cand.get(MANIFEST) != here:
            out.append(f"{release_path / name} judged another artifact (its {MANIFEST} sha256 "
                       f"{str(cand.get(MANIFEST))[:12]}... is not this one's {str(here)[:12]}...); re-run it on "
                       "this artifact (with --force)")
            continue
        if name in (VALIDATION, EVAL):
            why = _reference_mismatch(bound.get("reference"), manifest)
            if why:
                out.append(f"{release_path / name} compared with another reference: {why}; re-run "
                           f"{'validate' if name == VALIDATION else 'eval'} against the source this artifact was "
                           "made from (with --force)")
    return out


def _reference_mismatch(ref, manifest: dict) -> str | None:
    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    listed = src.get("files") or {}
    listed = {k: (v.get("sha256") if isinstance(v, dict) else v) for k, v in listed.items()} \
        if isinstance(listed, dict) else {}
    files = ref.get("files") if isinstance(ref, dict) else None
    if not isinstance(files, dict):
        return "it records no reference files"
    if not listed:
        return f"{MANIFEST} lists no source files to compare with"
    for name, sha in sorted(listed.items()):
        if name in files and files[name] != sha:
            return f"its {name} differs from the source's"
        if name not in files and name.endswith(_MUST_MATCH):
            return f"it had no {name}"
    return None
