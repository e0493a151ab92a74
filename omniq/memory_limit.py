"""The memory this process may still use: the limit that applies to it, not only what the machine has.

A container (CI runner, Kubernetes pod) caps a process with its cgroup: v1 `memory.limit_in_bytes` minus
`memory.usage_in_bytes`, v2 `memory.max` minus `memory.current`. The process's own cgroup is read from
`/proc/self/cgroup`, and every ancestor up to the mount root counts (a parent's limit caps its children):
the smallest headroom wins. Without a limit, `/proc/meminfo` MemAvailable. For a CUDA device,
`torch.cuda.mem_get_info` (free bytes on that device).

Ground floor: stdlib only (torch is imported only for a CUDA device).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60          # v1 writes 9223372036854771712 for "no limit"


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _own_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[str | None, str | None]:
    """(v1 memory controller path, v2 unified path) of this process, as /proc/self/cgroup names them."""
    v1 = v2 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            v1 = path
        elif controllers == "":
            v2 = path
    return v1, v2


def _walk(mount: Path, rel: str):
    """The cgroup directory of `rel` under `mount` and each ancestor up to the mount root."""
    d = mount / rel.lstrip("/")
    while True:
        if d.is_dir():
            yield d
        if d == mount or mount not in d.parents:
            return
        d = d.parent


def _headroom(mount: Path, rel: str, limit_file: str, usage_file: str) -> tuple[int, Path] | None:
    best = None
    for d in _walk(mount, rel):
        limit = _read_int(d / limit_file)
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(d / usage_file) or 0
        room = max(0, limit - usage)
        if best is None or room < best[0]:
            best = (room, d / limit_file)
    return best


def _cgroup_headroom(root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str] | None:
    v1, v2 = _own_cgroups(proc_cgroup)
    found = []
    if v1 is not None:
        hit = _headroom(root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes")
        if hit:
            found.append((hit[0], f"cgroup v1 {hit[1]}"))
    if v2 is not None:
        for mount in (root / "unified", root):
            if (mount / "cgroup.controllers").is_file():
                hit = _headroom(mount, v2, "memory.max", "memory.current")
                if hit:
                    found.append((hit[0], f"cgroup v2 {hit[1]}"))
                break
    return min(found) if found else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _limit(device: str = "cpu") -> tuple[int, str]:
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free), f"torch.cuda.mem_get_info({device})"
    ram = _meminfo_available()
    cg = _cgroup_headroom()
    if cg is not None and (ram is None or cg[0] <= ram):
        return cg
    if ram is not None:
        return ram, "/proc/meminfo MemAvailable"
    # No /proc (not Linux): what the OS reports, else no known limit.
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf(SC_AVPHYS_PAGES)"
    except (ValueError, OSError, AttributeError):
        return _NO_LIMIT, "no known limit"


def available_bytes(device: str = "cpu") -> int:
    """Bytes this process can still allocate on `device` (cpu: the tightest of its cgroup headroom and
    MemAvailable; cuda[:N]: the device's free memory)."""
    return _limit(device)[0]


def limit_source(device: str = "cpu") -> str:
    """Where `available_bytes` got its figure (a cgroup file, /proc/meminfo, or the CUDA driver)."""
    return _limit(device)[1]
