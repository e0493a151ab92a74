"""Reports are never overwritten without --force (the brief: "never overwrite an output without --force").

`omniq validate --report F` and `omniq lint --report F` refuse an existing F before any work starts (exit 2,
one line naming F and --force, F's bytes unchanged, nothing else written); with --force they replace it.
`omniq eval --out` and `omniq search --out`: tests/validate/test_task_eval.py, tests/quant/test_search.py.
"""

from __future__ import annotations

import json

from omniq.cli import main
from omniq.manifest import LINT, MANIFEST

OLD = b'{"written": "earlier"}\n'
FAST = ["--samples", "2", "--seq-len", "32", "--no-noise-floor"]


def _refused(capsys, path) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omniq: error: "), err
    assert str(path) in lines[0] and "--force" in lines[0], lines[0]
    return lines[0]


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_validate_refuses_an_existing_report_before_reading_anything_and_force_replaces_it(artifacts, tmp_path,
                                                                                          capsys):
    report = tmp_path / "validation.json"
    report.write_bytes(OLD)
    # refused before the candidate is even opened: a candidate that does not exist is not what it reports
    assert main(["validate", "tiny", str(tmp_path / "no-such-candidate"), *FAST, "--report", str(report)]) == 2
    assert "already exists" in _refused(capsys, report)
    assert main(["validate", "tiny", str(artifacts["fp8"]), *FAST, "--report", str(report)]) == 2
    _refused(capsys, report)
    assert report.read_bytes() == OLD and _siblings(report) == ["validation.json"]

    assert main(["validate", "tiny", str(artifacts["fp8"]), *FAST, "--report", str(report), "--force"]) == 0
    capsys.readouterr()
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and doc["bound_to"]["candidate"]["path"] == str(artifacts["fp8"].resolve())
    assert _siblings(report) == ["validation.json"]


def test_lint_refuses_an_existing_report_and_force_replaces_it(artifacts, tmp_path, capsys):
    report = tmp_path / "lint.json"
    report.write_bytes(OLD)
    assert main(["lint", str(artifacts["nvfp4"]), "--report", str(report)]) == 2
    _refused(capsys, report)
    assert report.read_bytes() == OLD and _siblings(report) == ["lint.json"]
    # a ModelOpt export (not omniq's) has lint errors (exit 1); the report is written all the same
    assert main(["lint", str(artifacts["nvfp4"]), "--report", str(report), "--force"]) == 1
    capsys.readouterr()
    assert json.loads(report.read_text())["bound_to"]["candidate"]["path"] == str(artifacts["nvfp4"].resolve())


def test_a_directory_is_no_report(artifacts, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for args in (["lint", str(artifacts["fp8"])], ["validate", "tiny", str(artifacts["fp8"]), *FAST]):
        assert main([*args, "--report", str(tmp_path / "d"), "--force"]) == 2
        err = capsys.readouterr().err
        assert "is a directory" in err and len(err.strip().splitlines()) == 1, err
    assert list((tmp_path / "d").iterdir()) == []


def test_relinting_a_quantized_artifact_into_its_own_lint_json_takes_force(quantized, capsys):
    """quantize writes ARTIFACT/lint.json; the documented `omniq lint ART --report ART/lint.json --force`
    (docs/publish.md) replaces it, bound to the same artifact."""
    art = quantized["fp8"]["path"]
    assert quantized["fp8"]["rc"] == 0, quantized["fp8"]["stderr"][-2000:]
    own = art / LINT
    before = own.read_bytes()
    assert main(["lint", str(art), "--report", str(own)]) == 2
    _refused(capsys, own)
    assert own.read_bytes() == before
    assert main(["lint", str(art), "--report", str(own), "--force"]) == 0
    capsys.readouterr()
    doc = json.loads(own.read_text())
    assert doc["passed"] is True and doc["bound_to"]["candidate"][MANIFEST] is not None
    assert not [p.name for p in art.iterdir() if p.name.startswith(".")]     # no temporary left
    # --force replaces a report, never a file of the artifact (omniq.json, or one it lists)
    shard = next(iter(json.loads((art / MANIFEST).read_text())["files"]))
    for name in (MANIFEST, shard):
        kept = (art / name).read_bytes()
        for args in (["lint", str(art)], ["validate", "tiny", str(art), *FAST]):
            assert main([*args, "--report", str(art / name), "--force"]) == 2
            assert "one of the artifact's own files" in _refused(capsys, art / name)
        assert (art / name).read_bytes() == kept


def test_a_report_that_appears_during_the_run_is_kept(artifacts, tmp_path, capsys, monkeypatch):
    """Checked up front and again at the write (a hard link, which fails on an existing name): a file that
    appeared while lint ran is not replaced without --force."""
    import omniq.validate.lint as lint_mod

    report = tmp_path / "lint.json"
    real = lint_mod.lint

    def lint_while_someone_writes(*a, **k):
        report.write_bytes(OLD)
        return real(*a, **k)

    monkeypatch.setattr(lint_mod, "lint", lint_while_someone_writes)
    assert main(["lint", str(artifacts["fp8"]), "--report", str(report)]) == 2
    assert "appeared while omniq was writing it" in _refused(capsys, report)
    assert report.read_bytes() == OLD and _siblings(report) == ["lint.json"]
