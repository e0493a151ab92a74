"""The ground floor's atomic writes and library silencing: whole or nothing, and restored after."""

import logging
import os

import pytest

from omniq.atomic import replace_dir, staged_dir, write_atomic
from omniq.errors import OmniqError
from omniq.quiet import quiet


def test_write_atomic_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_atomic(p, "old\n")
    write_atomic(p, b"new\n")
    assert p.read_text() == "new\n"

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, "half")
    assert p.read_text() == "new\n" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_replace_dir_puts_the_old_directory_back_when_the_move_fails(tmp_path, monkeypatch):
    dest, src = tmp_path / "d", tmp_path / "s"
    dest.mkdir(), src.mkdir()
    (dest / "old").write_text("o")
    (src / "new").write_text("n")
    real = os.replace

    def fail_second(a, b):
        if str(a) == str(src):
            raise OSError("rename failed")
        return real(a, b)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        replace_dir(src, dest)
    monkeypatch.undo()
    assert sorted(x.name for x in dest.iterdir()) == ["old"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "s"]
    replace_dir(src, dest, fsync=True)
    assert sorted(x.name for x in dest.iterdir()) == ["new"] and sorted(x.name for x in tmp_path.iterdir()) == ["d"]


def test_staged_dir_refuses_a_destination_that_appeared_unless_replacing(tmp_path):
    dest = tmp_path / "a" / "out"
    with pytest.raises(OmniqError, match="appeared"):
        with staged_dir(dest, tag="t") as stage:
            (stage.final / "f").write_text("x")
            dest.mkdir()
    assert sorted(x.name for x in dest.parent.iterdir()) == ["out"] and not any(dest.iterdir())
    with staged_dir(dest, tag="t", replace=True, fsync=True) as stage:
        assert stage.root.name.startswith(".out.t-")
        (stage.final / "f").write_text("x")
    assert (dest / "f").read_text() == "x" and sorted(x.name for x in dest.parent.iterdir()) == ["out"]


def test_quiet_raises_and_restores_logger_levels():
    log = logging.getLogger("omniq-test-lib")
    log.setLevel(logging.INFO)
    with quiet("omniq-test-lib"):
        assert log.level == logging.CRITICAL
    assert log.level == logging.INFO
    with pytest.raises(RuntimeError):
        with quiet("omniq-test-lib", level=logging.ERROR):
            assert log.level == logging.ERROR
            raise RuntimeError
    assert log.level == logging.INFO


def test_quiet_restores_transformers_verbosity_and_progress_bar():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    with quiet(transformers=True, progress_bar=True):
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()


def test_write_atomic_gives_the_file_the_mode_open_would(tmp_path):
    """mkstemp makes its file 0600; a report or manifest written through it gets the umask's mode instead."""
    old = os.umask(0o027)
    try:
        p = write_atomic(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640


def test_write_atomic_on_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OmniqError) as e:
        write_atomic(tmp_path / "r.json", "x")
    assert e.value.exit_code == 1 and "no space left" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_write_atomic_without_replace_never_overwrites(tmp_path, monkeypatch, links):
    """replace=False (a report or recipe without --force): a new file is written whole; one that exists by
    the time of the write is kept and refused, also on a file system without hard links."""
    import errno

    if not links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    p = write_atomic(tmp_path / "r.json", "new\n", replace=False)
    assert p.read_text() == "new\n" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
    assert p.stat().st_nlink == 1                      # the temporary's name is gone, not a second link
    with pytest.raises(OmniqError, match="appeared while omniq was writing it") as e:
        write_atomic(p, "other\n", replace=False)
    assert e.value.exit_code == 2 and "--force" in str(e.value)
    assert p.read_text() == "new\n" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_check_new_file_refuses_what_cannot_be_written_as_asked(tmp_path):
    from omniq.atomic import check_new_file

    f = tmp_path / "r.json"
    assert check_new_file(f, "--report") == f                      # absent: fine
    f.write_text("x")
    with pytest.raises(OmniqError, match=r"--report .*r\.json already exists; pass --force"):
        check_new_file(f, "--report")
    assert check_new_file(f, "--report", force=True) == f
    with pytest.raises(OmniqError, match="is a directory"):
        check_new_file(tmp_path, "--out", force=True)
    with pytest.raises(OmniqError, match="does not exist"):
        check_new_file(tmp_path / "no" / "r.json", "--out", force=True)
    assert f.read_text() == "x"
