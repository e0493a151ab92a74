"""Files and directories that appear whole or not at all (the ground floor: every stage writes through it).

- `check_new_file(path, flag, force=...)`: the up-front refusal of a user-named output file (a report, a
  recipe) that exists without --force, is a directory, or has no directory to go into (exit 2, before any
  work starts; nothing is written).
- `write_atomic(path, data)`: a temporary sibling, fsync, one rename over `path`, fsync of the parent.
  With `replace=False` the temporary is hard-linked to `path` instead, which fails if a file appeared there
  while the command ran (then refused as in `staged_dir`; the one that appeared is kept). A full disk
  (ENOSPC / EDQUOT) in it or in `staged_dir` is an OmniqError (one line, exit 1) raised after the temporary
  is removed.
- `staged_dir(dest, tag=...)`: a hidden temporary sibling `.NAME.TAG-XXXX` of `dest` (same file system, so
  the final move is one rename); the caller fills its `final` directory; on success it replaces `dest`
  (an existing one only with `replace=True`), on any failure or interrupt the stage and the parent
  directories it created are removed, so nothing is left at `dest`.
- `replace_dir(src, dest)`: the move itself; an existing `dest` is renamed aside first, put back if the
  second rename fails, and removed after it succeeds.
- `fsync_tree` / `fsync_dir`: durability for outputs that must survive a power cut (the pipeline cache,
  pulled artifacts). The checkpoint export does not fsync its multi-GB shards (as before: a crash there
  leaves only the hidden stage, which is never mistaken for an artifact).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omniq.errors import OmniqError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (children before parents)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False, followlinks=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def check_new_file(path: str | os.PathLike, flag: str, *, force: bool = False) -> Path:
    """Refuse (OmniqError, exit 2) an output file `flag PATH` that cannot be written as asked: its directory
    does not exist, it is a directory, or it exists and `force` is off. Called before the command's work."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise OmniqError(f"{flag} {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise OmniqError(f"{flag} {path}: that is a directory; name a file")
    if (path.exists() or path.is_symlink()) and not force:
        raise OmniqError(f"{flag} {path} already exists; pass --force to overwrite it")
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str, *, replace: bool = True) -> Path:
    """Write `data` to `path` through a temporary sibling renamed over it (fsynced, then the parent).

    `replace=False`: never over an existing `path` (one that appeared since the command's `check_new_file`
    is refused with an OmniqError and kept as it is)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())       # as open() would make it (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _is_full_disk(e):
            raise _full_disk(path) from None
        raise
    fsync_dir(path.parent)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Put `tmp` at `path` only if nothing is there: a hard link fails atomically on an existing name. On a
    file system without hard links, an existence check and a rename (a narrow race instead of none)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if path.exists() or path.is_symlink():
            raise _appeared(path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def _appeared(path: Path) -> OmniqError:
    return OmniqError(f"{path} appeared while omniq was writing it; it was kept (pass --force to replace it)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_full_disk(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _full_disk(dest: Path) -> OmniqError:
    """A full disk (or quota) while writing `dest`: one line, exit 1; the caller has removed what it wrote."""
    return OmniqError(f"{dest}: no space left on the device while writing it; free space or choose another "
                      "destination (nothing was left there)", exit_code=1)


def replace_dir(src: Path, dest: Path, *, fsync: bool = False) -> None:
    """Put directory `src` at `dest` with one rename (same file system), replacing whatever is at `dest`.

    With `fsync`, `src`'s whole tree is synced before the rename and `dest`'s parent after it.
    """
    if fsync:
        fsync_tree(src)
    aside = None
    try:
        if dest.exists() or dest.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, aside / "previous")
        try:
            os.replace(src, dest)
        except BaseException:
            if aside is not None:
                os.replace(aside / "previous", dest)
            raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    if fsync:
        fsync_dir(dest.parent)


@dataclass
class Staged:
    """A directory being written: fill `final`; `root` is the hidden sibling holding it (and any scratch)."""

    dest: Path
    root: Path

    @property
    def final(self) -> Path:
        return self.root / "final"


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, *, tag: str, replace: bool = False, fsync: bool = False,
               appeared: str | None = None, stage_type: type[Staged] = Staged, **fields):
    """Stage a directory beside `dest` and move it into place only if the block succeeds.

    `replace`: an existing `dest` may be replaced (the caller refuses one up front without --force; one that
    appears while the block runs is refused, with the message `appeared` if given). `stage_type` / `fields`: a
    subclass of `Staged` to yield, with its extra fields.
    """
    dest = Path(dest)
    created: list[Path] = []
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    stage = None
    try:
        stage = stage_type(dest=dest, root=Path(tempfile.mkdtemp(prefix=f".{dest.name}.{tag}-", dir=dest.parent)),
                           **fields)
        stage.final.mkdir()
        yield stage
        if (dest.exists() or dest.is_symlink()) and not replace:
            raise OmniqError(appeared) if appeared else _appeared(dest)
        replace_dir(stage.final, dest, fsync=fsync)
    except BaseException as e:
        if stage is not None:
            shutil.rmtree(stage.root, ignore_errors=True)
        for p in created:                      # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        if _is_full_disk(e):                  # a full disk: one line, nothing left behind
            raise _full_disk(dest) from None
        raise
    else:
        shutil.rmtree(stage.root, ignore_errors=True)
