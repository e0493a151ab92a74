"""sha256 of a file, read in blocks: the one checksum every stage writes and checks (manifest, build, cache,
publish, lint, calibration data identity).

Each file is read once per process: a digest is remembered under the file's identity and state
(device, inode, size, mtime in ns) and returned again while those are unchanged. A 30 B artifact is
20 GB; in one `omniq pipeline` run, quantize hashes it for omniq.json, and lint, build (whose hard links
share the inode) and publish (whose release links resolve to the same files) then check against the
manifest without reading it again. Any write to a file changes its mtime, so a file damaged after it was
hashed is read again and caught. Separate `omniq` processes hash again: that is the check a command run on
its own owes its input. The pipeline's `HashCache` keeps the same identities across runs on disk.

`hash_soon` reads a finished file's digest in a background thread (hashlib and file reads release the GIL,
so it runs on another core beside the caller's work): the streamed export hands each output shard to it as
soon as the shard's last tensor is written, and the manifest's `sha256_file` then takes that digest (waiting
for it if it is still being read) instead of reading the file a second time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

_BLOCK = 1 << 22
_known: dict[tuple, str] = {}
_pending: dict[tuple, Future] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def identity(st: os.stat_result) -> tuple:
    """What must stay the same for a remembered digest to hold."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record a digest known for `path` as it is now (the pipeline's persistent cache seeds this)."""
    _known[identity(os.stat(path))] = digest


def _digest_of(f) -> str:
    h = hashlib.sha256()
    while block := f.read(_BLOCK):
        h.update(block)
    return h.hexdigest()


def read_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes, read now (no memory of earlier reads)."""
    with open(path, "rb") as f:
        return _digest_of(f)


def sha256_file(path: str | os.PathLike) -> str:
    before = identity(os.stat(path))
    with _lock:
        hit = _known.get(before)
        pending = _pending.get(before)
    if hit is not None:
        return hit
    if pending is not None:
        try:
            digest = pending.result()       # an error of the background read is raised here, as a read's would be
        except CancelledError:
            digest = None
        if digest is not None:
            return digest
    digest = read_digest(path)
    if identity(os.stat(path)) == before:       # not remembered if the file changed while it was read
        _known[before] = digest
    return digest


class Soon:
    """A digest being read in the background (`hash_soon`)."""

    def __init__(self, future: Future, f, before: tuple):
        self.future, self._file, self.before = future, f, before

    def abandon(self) -> None:
        """Stop caring for the digest (the file is being removed): not started, it never will be; being read,
        wait for the read to end, so no thread still holds the file open when the caller returns."""
        if self.future.cancel():
            self._file.close()
            with _lock:
                _pending.pop(self.before, None)
        else:
            try:
                self.future.result()
            except Exception:       # noqa: BLE001 - the file is being thrown away; its read's error does not matter
                pass


def _read_in_background(f, before: tuple) -> str | None:
    digest = None
    try:
        digest = _digest_of(f)
        if identity(os.fstat(f.fileno())) != before:     # written to while it was read: nothing remembered,
            digest = None                                # sha256_file reads it itself
    finally:
        f.close()
        with _lock:
            if digest is not None:
                _known[before] = digest
            _pending.pop(before, None)
    return digest


def hash_soon(path: str | os.PathLike) -> Soon:
    """Start reading the sha256 of `path`, which nothing writes any more, in a background thread. The file is
    opened now, so it may be renamed meanwhile; `sha256_file` of it (by identity, under any name) waits for
    this read instead of reading again. One thread for the whole process: files are read one after another."""
    global _pool
    f = open(path, "rb")
    before = identity(os.fstat(f.fileno()))
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniq-sha256")
        future = _pool.submit(_read_in_background, f, before)
        _pending[before] = future
    return Soon(future, f, before)


def forget() -> None:
    """Drop every remembered digest (tests that rewrite files within one mtime tick call this)."""
    _known.clear()
