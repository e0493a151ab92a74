"""validate's bad input found mid-run: a shard deleted after the run started, a --report on a disk that is
full, a --report into a directory that does not exist. Each is one line (exit 2, or 1 for the full disk),
no report, nothing left where the report would go."""

from __future__ import annotations

import pytest

from checkpoint_dir import by_layer_shards, watch_reads
from omniq.cli import main
from small_disk import left_on, small_tmpfs

RUN = ["--samples", "2", "--seq-len", "32", "--no-noise-floor"]


@pytest.fixture()
def reading(monkeypatch):
    """Every tensor name validate reads from a shard, in order."""
    return watch_reads(monkeypatch)


def test_a_shard_deleted_after_the_run_started(tmp_path, tiny_dir, artifacts, monkeypatch, capsys):
    """The reference's last shard (layers 8-9, lm_head) is deleted when the first decoder layer is read:
    exit 2, one line naming the shard, no report written."""
    src = tmp_path / "ref"
    src.mkdir()
    late = by_layer_shards(tiny_dir, src)
    seen = watch_reads(monkeypatch, delete=late)
    report = tmp_path / "out" / "r.json"
    report.parent.mkdir()
    code = main(["validate", str(src), str(artifacts["fp8"]), *RUN, "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert late.name in err and "disappeared" in err
    assert any(".layers.0." in n for n in seen) and list(report.parent.iterdir()) == []


def test_report_on_a_full_disk_leaves_nothing(tmp_path, artifacts, capsys):
    with small_tmpfs(tmp_path, "2m", free=4096) as mnt:       # the report is about 15 kB
        code = main(["validate", "tiny", str(artifacts["fp8"]), *RUN, "--report", str(mnt / "r.json")])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and "no space left" in err, err
        assert left_on(mnt) == []


def test_report_into_a_missing_directory_is_refused_before_any_weight_is_read(tmp_path, artifacts, reading,
                                                                              capsys):
    code = main(["validate", "tiny", str(artifacts["fp8"]), *RUN, "--report", str(tmp_path / "no" / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err, err
    assert reading == [] and not (tmp_path / "no").exists()
