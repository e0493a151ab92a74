"""sha256 of a file, read in blocks: the one checksum every stage writes and checks (manifest, build, cache,
publish, lint, calibration data identity).

Each file is read once per process: a digest is remembered under the file's identity and state
(device, inode, size, mtime in ns) and returned again while those are unchanged. A 30 B artifact is
20 GB; in one `omniq pipeline` run, quantize hashes it for omniq.json, and lint, build (whose hard links
share the inode) and publish (whose release links resolve to the same files) then check against the
manifest without reading it again. Any write to a file changes its mtime, so a file damaged after it was
hashed is read again and caught. Separate `omniq` processes hash again: that is the check a command run on
its own owes its input. The pipeline's `HashCache` keeps the same identities across runs on disk.
"""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 22
_known: dict[tuple, str] = {}


def identity(st: os.stat_result) -> tuple:
    """What must stay the same for a remembered digest to hold."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record a digest known for `path` as it is now (the pipeline's persistent cache seeds this)."""
    _known[identity(os.stat(path))] = digest


def read_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes, read now (no memory of earlier reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    before = identity(os.stat(path))
    hit = _known.get(before)
    if hit is not None:
        return hit
    digest = read_digest(path)
    if identity(os.stat(path)) == before:       # not remembered if the file changed while it was read
        _known[before] = digest
    return digest


def forget() -> None:
    """Drop every remembered digest (tests that rewrite files within one mtime tick call this)."""
    _known.clear()
