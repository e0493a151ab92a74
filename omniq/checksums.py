"""sha256 of a file, read in blocks: the one checksum every stage writes and checks (manifest, build, cache,
publish, lint, calibration data identity)."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
