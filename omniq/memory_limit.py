"""How much memory this process may still use: the limit that applies to it, not only the machine's RAM.

In a container (CI runners, Kubernetes pods, `docker run --memory`) the kernel kills a process at its control
group's limit, long before `/proc/meminfo` runs out. The memory preflights of `quantize` and `validate` ask
this module, which reads, in order:

  cgroup v2   `memory.max` (and `memory.current`) of the process's own group (`/proc/self/cgroup` line
              `0::PATH`) and of each group above it, under the cgroup2 mount;
  cgroup v1   `memory.limit_in_bytes` (and `memory.usage_in_bytes`) of the process's own memory group
              (`/proc/self/cgroup` line `N:memory:PATH`) and of each group above it;
  /proc/meminfo  `MemAvailable`, always, since a group's limit can exceed the machine.

The available figure is the smallest of: every limited group's limit minus its usage (page cache the kernel
can drop, `inactive_file` of memory.stat, counted as free) and the machine's MemAvailable. `limit_source()`
names the file that set it, for the one-line refusals. psutil and the standard library report only the
machine's memory, which is why this is read by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 reports "no limit" as a huge number near 2**63 (rounded down to the page size).
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Limit:
    available: int         # bytes this process may still allocate
    source: str            # what set it: a cgroup file or /proc/meminfo MemAvailable


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_groups(proc: Path) -> tuple[str | None, str | None]:
    """(cgroup v1 memory path, cgroup v2 path) of this process, from /proc/self/cgroup."""
    v1 = v2 = None
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if "memory" in controllers.split(","):
            v1 = path
        elif hid == "0" and controllers == "":
            v2 = path
    return v1, v2


def _group_dirs(mount: Path, path: str) -> list[Path]:
    """The group's directory and each one above it up to the mount, those that exist. Inside a cgroup
    namespace the path in /proc/self/cgroup is often not under the mount (the mount is the group itself):
    then the mount alone."""
    out = []
    parts = [p for p in path.strip("/").split("/") if p]
    for k in range(len(parts), -1, -1):
        d = mount.joinpath(*parts[:k])
        if d.is_dir():
            out.append(d)
    return out or ([mount] if mount.is_dir() else [])


def _cgroup_limits(proc: Path, cgroup_root: Path) -> list[Limit]:
    v1, v2 = _own_groups(proc)
    found: list[Limit] = []
    if v1 is not None:
        for d in _group_dirs(cgroup_root / "memory", v1):
            limit = _read_int(d / "memory.limit_in_bytes")
            if limit is None or limit >= _UNLIMITED:
                continue
            usage = _read_int(d / "memory.usage_in_bytes") or 0
            free_cache = _stat(d / "memory.stat", "total_inactive_file") or _stat(d / "memory.stat", "inactive_file")
            found.append(Limit(max(0, limit - usage + free_cache), f"cgroup v1 {d / 'memory.limit_in_bytes'}"))
    if v2 is not None:
        mounts = [cgroup_root / "unified", cgroup_root] if (cgroup_root / "unified").is_dir() else [cgroup_root]
        for mount in mounts:
            if not (mount / "cgroup.controllers").is_file():
                continue
            for d in _group_dirs(mount, v2):
                limit = _read_int(d / "memory.max")
                if limit is None or limit >= _UNLIMITED:
                    continue
                usage = _read_int(d / "memory.current") or 0
                free_cache = _stat(d / "memory.stat", "inactive_file")
                found.append(Limit(max(0, limit - usage + free_cache), f"cgroup v2 {d / 'memory.max'}"))
            break
    return found


def limit(*, proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> Limit:
    """The tightest of the process's cgroup limits and the machine's MemAvailable."""
    proc, cgroup_root = Path(proc), Path(cgroup_root)
    candidates = _cgroup_limits(proc, cgroup_root)
    mem = _meminfo(proc)
    if mem is not None:
        candidates.append(Limit(mem, "/proc/meminfo MemAvailable"))
    if not candidates:
        import os

        try:
            return Limit(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return Limit(1 << 62, "unknown (no cgroup, no /proc/meminfo)")
    return min(candidates, key=lambda c: c.available)


def available_bytes(**kw) -> int:
    """Bytes this process may still allocate before its memory limit (cgroup v1 / v2, else MemAvailable)."""
    return limit(**kw).available


def limit_source(**kw) -> str:
    """Which file set `available_bytes()`: e.g. `cgroup v1 /sys/fs/cgroup/memory/.../memory.limit_in_bytes`."""
    return limit(**kw).source
