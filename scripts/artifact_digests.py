"""sha256 of every file of a quantized artifact, omniq.json with its run-specific fields left out.

    python scripts/artifact_digests.py ARTIFACT_DIR [NAME=DIR ...] > digests.json

omniq.json is hashed as canonical JSON without `created` (the time), `source.model` and `source.path` (how it was named and where the checkpoint
lay), a recipe file's directory, `source.files` (the source's file hashes: a resharded copy of a model differs there only) and `files`
(the other files' digests, compared themselves); lint.json without `path` (the --out it was written for) and
`bound_to` (the sha256 of this run's omniq.json, which holds the time; added after the golden was recorded). Used to record tests/data/golden/quantize_tiny.json, the
artifacts of the whole-model quantize before the layer-streamed one replaced it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN_SPECIFIC = ("created",)
SOURCE_SPECIFIC = ("model", "path", "files")


def _without_text_format(obj):
    """calibration identities gained `format: "text"` after the golden was recorded (issue 15's chat format);
    text calibration is the same data as before, so that key alone is left out."""
    if isinstance(obj, dict):
        return {k: _without_text_format(v) for k, v in obj.items() if not (k == "format" and v == "text")}
    if isinstance(obj, list):
        return [_without_text_format(v) for v in obj]
    return obj


def manifest_digest(doc: dict) -> str:
    doc = {k: v for k, v in doc.items() if k not in RUN_SPECIFIC and k != "files"}
    if "calibration" in doc:
        doc["calibration"] = _without_text_format(doc["calibration"])
    doc["source"] = {k: v for k, v in doc.get("source", {}).items() if k not in SOURCE_SPECIFIC}
    if "/" in str(doc.get("recipe", {}).get("source", "")):            # a recipe file: its name, not where it lay
        doc["recipe"] = dict(doc["recipe"], source=Path(doc["recipe"]["source"]).name)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def digests(path: Path) -> dict[str, str]:
    from omniq.checksums import sha256_file

    out = {}
    for p in sorted(Path(path).iterdir()):
        if p.is_file():
            if p.name == "omniq.json":
                out[p.name] = manifest_digest(json.loads(p.read_text()))
            elif p.name == "lint.json":
                doc = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("path", "bound_to")}
                out[p.name] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
            else:
                out[p.name] = sha256_file(p)
    return out


def main(argv: list[str]) -> int:
    runs = dict(a.split("=", 1) if "=" in a else (Path(a).name, a) for a in argv)
    print(json.dumps({name: digests(Path(d)) for name, d in runs.items()}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
