"""omniq.memory_limit: the memory limit that applies to the process (cgroup v1, v2, else MemAvailable),
read from fake /proc and /sys/fs/cgroup trees, and from this machine's own."""

from __future__ import annotations

from pathlib import Path

from omniq import memory_limit

GIB = 2**30


def _tree(tmp_path: Path, cgroup_lines: str, mem_available_kib: int = 16 * 2**20) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {mem_available_kib} kB\n")
    root.mkdir()
    return proc, root


def test_meminfo_when_no_cgroup_limits(tmp_path):
    proc, root = _tree(tmp_path, "0::/\n")
    lim = memory_limit.limit(proc=proc, cgroup_root=root)
    assert lim.available == 16 * GIB and lim.source == "/proc/meminfo MemAvailable"


def test_cgroup_v1_own_group_and_its_parents(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/jobs/job1\n1:cpu:/\n")
    own = root / "memory" / "jobs" / "job1"
    own.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")     # unlimited root
    (own / "memory.limit_in_bytes").write_text(str(6 * GIB))
    (own / "memory.usage_in_bytes").write_text(str(2 * GIB))
    (own / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {GIB}\n")
    kw = {"proc": proc, "cgroup_root": root}
    assert memory_limit.available_bytes(**kw) == 5 * GIB            # 6 - 2 used + 1 reclaimable cache
    assert memory_limit.limit_source(**kw) == f"cgroup v1 {own / 'memory.limit_in_bytes'}"
    # a tighter parent wins
    (own.parent / "memory.limit_in_bytes").write_text(str(3 * GIB))
    (own.parent / "memory.usage_in_bytes").write_text(str(2 * GIB))
    assert memory_limit.available_bytes(**kw) == 1 * GIB
    assert memory_limit.limit_source(**kw).endswith("jobs/memory.limit_in_bytes")


def test_cgroup_v2_memory_max_and_the_machine_when_tighter(tmp_path):
    proc, root = _tree(tmp_path, "0::/pod/ctr\n", mem_available_kib=2 * 2**20)
    (root / "cgroup.controllers").write_text("memory cpu\n")
    own = root / "pod" / "ctr"
    own.mkdir(parents=True)
    (own / "memory.max").write_text(str(8 * GIB))
    (own / "memory.current").write_text(str(GIB))
    kw = {"proc": proc, "cgroup_root": root}
    assert memory_limit.limit(**kw).source == "/proc/meminfo MemAvailable"   # 2 GiB free on the machine < 7
    (proc / "meminfo").write_text(f"MemAvailable: {64 * 2**20} kB\n")
    assert memory_limit.available_bytes(**kw) == 7 * GIB
    assert memory_limit.limit_source(**kw) == f"cgroup v2 {own / 'memory.max'}"
    (own / "memory.max").write_text("max\n")
    assert memory_limit.limit_source(**kw) == "/proc/meminfo MemAvailable"


def test_namespaced_group_path_falls_back_to_the_mount(tmp_path):
    """Inside a cgroup namespace /proc/self/cgroup names a path that is not under the mount."""
    proc, root = _tree(tmp_path, "7:memory:/not/here\n")
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(str(4 * GIB))
    (root / "memory" / "memory.usage_in_bytes").write_text("0")
    assert memory_limit.available_bytes(proc=proc, cgroup_root=root) == 4 * GIB


def test_this_machine():
    n = memory_limit.available_bytes()
    assert n > 0 and memory_limit.limit_source()
