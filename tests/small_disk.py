"""A small, nearly full file system for the full-disk tests: a tmpfs mounted for the test (root only; the
test is skipped with the reason otherwise), optionally filled by one `filler` file until `free` bytes are
left, unmounted afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

FILLER = "filler"


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "20m", free: int | None = None):
    mnt = where / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'needs root'})")
    try:
        if free is not None:
            st = os.statvfs(mnt)
            with open(mnt / FILLER, "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def left_on(mnt: Path) -> list[str]:
    """What is on the file system besides the filler (hidden temporaries included)."""
    return sorted(p.name for p in mnt.iterdir() if p.name != FILLER)
