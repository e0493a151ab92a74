"""omniq.memory_limit: the tightest cgroup headroom (v1 or v2, own group and ancestors) or MemAvailable."""

from omniq import memory_limit as ml


def _proc(tmp_path, text):
    p = tmp_path / "cgroup"
    p.write_text(text)
    return p


def test_v1_own_group_and_parent(tmp_path):
    mem = tmp_path / "memory"
    (mem / "a" / "b").mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (mem / "a" / "memory.limit_in_bytes").write_text(str(8 << 30))
    (mem / "a" / "memory.usage_in_bytes").write_text(str(7 << 30))       # parent: 1 GiB left
    (mem / "a" / "b" / "memory.limit_in_bytes").write_text(str(6 << 30))
    (mem / "a" / "b" / "memory.usage_in_bytes").write_text(str(2 << 30))  # own: 4 GiB left
    room, src = ml._cgroup_headroom(tmp_path, _proc(tmp_path, "4:memory:/a/b\n0::/\n"))
    assert room == 1 << 30
    assert "cgroup v1" in src and src.endswith("a/memory.limit_in_bytes")


def test_v2_max_minus_current(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory cpu\n")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "memory.max").write_text(str(3 << 30))
    (tmp_path / "job" / "memory.current").write_text(str(1 << 30))
    room, src = ml._cgroup_headroom(tmp_path, _proc(tmp_path, "0::/job\n"))
    assert room == 2 << 30 and "cgroup v2" in src


def test_v2_unlimited_is_none(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "memory.max").write_text("max\n")
    assert ml._cgroup_headroom(tmp_path, _proc(tmp_path, "0::/job\n")) is None


def test_this_process_has_a_figure_and_a_source():
    assert ml.available_bytes() > 0
    src = ml.limit_source()
    assert src.startswith(("cgroup", "/proc/meminfo"))
