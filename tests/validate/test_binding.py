"""What validate and lint record about the artifact and reference they judged (`omniq.validate.binding`), and
that they never write a report into another artifact (exit 2, nothing written). Publish's refusals:
tests/export/test_report_binding.py."""

from __future__ import annotations

import json

from omniq.cli import main
from omniq.export.hf_checkpoint import source_hashes
from omniq.model.checkpoint import open_checkpoint
from omniq.validate.run import validate


def test_validate_records_what_it_judged_and_will_not_write_into_another_artifact(artifacts, tmp_path, capsys):
    """The ModelOpt export has no omniq.json (recorded as null); the reference's files are hashed as
    `omniq quantize` lists them in omniq.json `source.files`."""
    r = validate("tiny", artifacts["fp8"], samples=2, seq_len=32)
    bound = r["bound_to"]
    assert bound["candidate"]["omniq.json"] is None
    assert bound["reference"]["files"] == source_hashes(open_checkpoint("tiny"))
    other = tmp_path / "other"            # another artifact: a directory with its own omniq.json
    other.mkdir()
    (other / "omniq.json").write_text('{"files": {}}')
    before = sorted(p.name for p in other.iterdir())
    for args in (["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32",
                  "--report", str(other / "validation.json")],
                 ["lint", str(artifacts["fp8"]), "--report", str(other / "lint.json")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "inside the artifact" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in other.iterdir()) == before


def test_lint_report_records_the_artifact(artifacts, tmp_path, capsys):
    report = tmp_path / "lint.json"
    main(["lint", str(artifacts["nvfp4"]), "--report", str(report)])
    capsys.readouterr()
    bound = json.loads(report.read_text())["bound_to"]
    assert bound["candidate"]["path"] == str(artifacts["nvfp4"].resolve()) and bound["candidate"]["omniq.json"] is None
