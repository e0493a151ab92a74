"""The files omniq writes into an artifact directory, and reading them: `omniq.json` (the manifest, whose
`files` maps every checkpoint file's relative path to its sha256) and the sidecars shipped beside it
(validation.json, lint.json, README.md). Ground floor: validate (lint), publish and the pipeline all read
artifacts through it.
"""

from __future__ import annotations

import json
from pathlib import Path

from omniq.errors import OmniqError

MANIFEST = "omniq.json"
VALIDATION = "validation.json"
LINT = "lint.json"
CARD = "README.md"
SIDECARS = (VALIDATION, LINT, CARD)
DELTA_KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens")
LINT_FAILING = ("error", "fatal", "critical")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OmniqError(f"{path}: cannot read {what} as JSON ({str(e).splitlines()[0]}); "
                         "rewrite it or re-run the step that writes it") from None
    if not isinstance(data, dict):
        raise OmniqError(f"{path}: {what} is not a JSON object; re-run the step that writes it")
    return data


def listed_files(manifest: dict, where: str) -> dict[str, str]:
    """omniq.json `files`: relative path -> sha256 hex."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise OmniqError(f"{where}: has no `files` map of relative path -> sha256; it was not written by "
                         "`omniq quantize` (re-export the artifact)")
    out = {}
    for rel, v in files.items():
        digest = v.get("sha256") if isinstance(v, dict) else v
        if not isinstance(digest, str) or len(digest) != 64:
            raise OmniqError(f"{where}: files[{rel!r}] has no sha256; re-export the artifact")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or rel in (MANIFEST, *SIDECARS):
            raise OmniqError(f"{where}: files lists {rel!r}, which cannot be an artifact file; re-export it")
        out[p.as_posix()] = digest.lower().removeprefix("sha256:")
    return out


def module_formats(manifest: dict) -> dict[str, str]:
    """module -> format from omniq.json (`formats`, `layer_formats` or `modules`: name -> format or
    name -> {"format": ...}); empty when the manifest has none."""
    for key in ("formats", "layer_formats", "modules", "layers"):
        v = manifest.get(key)
        if isinstance(v, dict) and v and all(isinstance(x, (str, dict)) for x in v.values()):
            out = {}
            for name, fmt in v.items():
                fmt = fmt.get("format") if isinstance(fmt, dict) else fmt
                if isinstance(fmt, str):
                    out[name] = fmt
            if out:
                return out
    return {}
