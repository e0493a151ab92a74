"""The output directory appears whole or not at all, and an existing one is replaced only with force."""

import pytest

from omniq.errors import OmniqError
from omniq.export.hf_checkpoint import staged_output


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_success_moves_the_stage_into_place(tmp_path):
    out = tmp_path / "art"
    with staged_output(out) as stage:
        assert stage.root.parent == tmp_path and stage.root.name.startswith(".art.omniq-")
        (stage.final / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert _leftovers(tmp_path) == ["art"]


def test_failure_leaves_nothing_and_removes_created_parents(tmp_path):
    out = tmp_path / "new" / "deeper" / "art"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage.final / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out):
            raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_existing_out_needs_force_and_survives_a_failed_replacement(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OmniqError, match="already exists"):
        with staged_output(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True):
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old" and _leftovers(tmp_path) == ["art"]
    with staged_output(out, force=True) as stage:
        (stage.final / "new.txt").write_text("new")
    assert _leftovers(out) == ["new.txt"] and _leftovers(tmp_path) == ["art"]


def test_out_may_not_replace_the_source(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    for out in (src, tmp_path):
        with pytest.raises(OmniqError, match="would replace the source"):
            with staged_output(out, force=True, protect=(src,)):
                pass
    assert src.is_dir()
