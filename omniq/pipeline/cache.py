"""The pipeline's stage cache: content keys, and outputs that are either complete or absent.

Keys: `key(obj)` is the sha256 of the canonical JSON of everything a stage's output depends on (content
hashes of files, the resolved recipe, data identities, versions, upstream keys). `tree_digest` hashes a
directory's files; `HashCache` remembers file hashes by (path, size, mtime, inode) so an unchanged 60 GB
checkpoint is not re-read on every run.

Outputs live under `ROOT/<stage>/<key>/` and are committed like this:

    ROOT/<stage>/.<key>.tmp-XXXX/   the stage writes here (a killed run leaves only this: ignored, removed)
    result.json                     the stage's record, written last inside it
    fsync every file and directory, rename to ROOT/<stage>/<key>/, fsync the parent
    ROOT/<stage>/<key>.done         the completion marker (temp file, fsync, rename, fsync)

An output counts as finished only with its marker, whose recorded sha256 of result.json must match: a run
killed between the rename and the marker, or a directory copied in by hand, is redone, never trusted.
`Store.lock()` makes one pipeline own ROOT at a time (an flock the kernel drops when the process dies).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omniq.atomic import replace_dir, write_atomic
from omniq.checksums import remember, sha256_file
from omniq.errors import OmniqError

RESULT = "result.json"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def key(obj) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


class HashCache:
    """sha256 of files, remembered by (size, mtime_ns, inode) in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        k = str(file.resolve())
        hit = self.entries.get(k)
        if isinstance(hit, list) and hit[:3] == stamp and len(hit) == 4:
            remember(file, hit[3])           # the stages of this run then do not read the file again
            return hit[3]
        digest = sha256_file(file)
        self.entries[k] = [*stamp, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.entries).encode())
            self.dirty = False


def tree_digest(root: Path, hashes: HashCache) -> tuple[str, dict[str, str]]:
    """(digest, {relative path: sha256}) of every non-hidden file under root (or of root, a file)."""
    root = Path(root)
    if root.is_file():
        h = hashes.sha256(root)
        return key({root.name: h}), {root.name: h}
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = hashes.sha256(p)
    if not files:
        raise OmniqError(f"{root}: no files in it to hash")
    return key(files), files


@dataclass
class Finished:
    stage: str
    key: str
    path: Path               # the output directory
    result: dict             # its result.json


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fd: int | None = None

    # -- ownership ---------------------------------------------------------------------------------------
    def lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OmniqError(f"{self.root}: another `omniq pipeline` is running on this work directory; wait "
                             "for it or use another --workdir") from None
        self._lock_fd = fd
        self.sweep()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep(self) -> list[Path]:
        """Remove what killed runs left: temporary outputs, and outputs without a valid marker."""
        removed = []
        if not self.root.is_dir():
            return removed
        for stage_dir in self.root.iterdir():
            if not stage_dir.is_dir() or stage_dir.name.startswith("."):
                continue
            for p in stage_dir.iterdir():
                if p.name.startswith("."):          # temporary outputs and markers being written
                    _remove(p)
                    removed.append(p)
                elif p.is_dir() and self.get(stage_dir.name, p.name) is None:
                    _remove(p)
                    removed.append(p)
                elif p.suffix == ".done" and not (stage_dir / p.stem).is_dir():
                    p.unlink()
                    removed.append(p)
        return removed

    # -- lookup ------------------------------------------------------------------------------------------
    def path(self, stage: str, k: str) -> Path:
        return self.root / stage / k

    def get(self, stage: str, k: str) -> Finished | None:
        out = self.path(stage, k)
        marker = out.with_name(f"{k}.done")
        try:
            mark = json.loads(marker.read_text())
            raw = (out / RESULT).read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(mark, dict) or mark.get("key") != k \
                or mark.get("result_sha256") != hashlib.sha256(raw).hexdigest():
            return None
        return Finished(stage, k, out, json.loads(raw))

    # -- commit ------------------------------------------------------------------------------------------
    def begin(self, stage: str, k: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{k}.tmp-", dir=d))

    def commit(self, stage: str, k: str, tmp: Path, result: dict) -> Finished:
        raw = json.dumps(result, indent=1, sort_keys=True, default=str).encode() + b"\n"
        (tmp / RESULT).write_bytes(raw)
        out = self.path(stage, k)
        replace_dir(tmp, out, fsync=True)     # over a directory without a valid marker (sweep would remove it too)
        write_atomic(out.with_name(f"{k}.done"),
                     canonical({"stage": stage, "key": k, "result_sha256": hashlib.sha256(raw).hexdigest()}))
        return Finished(stage, k, out, json.loads(raw))

    def abort(self, tmp: Path) -> None:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
