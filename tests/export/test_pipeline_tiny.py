"""The pipeline with the real stages on the bundled tiny model: the example file, and one real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from omniq.cli import main
from omniq.publish import oci
from publish_fixtures import registry  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pipeline-tiny.yaml"


def test_example_pipeline_dry_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMNIQ_REGISTRY", "127.0.0.1:5000")
    monkeypatch.setenv("COLUMNS", "200")
    rc = main(["pipeline", str(EXAMPLE), "--dry-run", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "12 of 12 stage outputs would run" in out
    for stage in ("quantize", "lint", "validate", "build", "publish"):
        assert stage in out
    assert "oci://127.0.0.1:5000/omniq/tiny:fp8-" in out
    assert not (tmp_path / "work").exists()

    monkeypatch.delenv("OMNIQ_REGISTRY")
    rc = main(["pipeline", str(EXAMPLE), "--dry-run", "--workdir", str(tmp_path / "work")])
    assert rc == 2 and "OMNIQ_REGISTRY is not set" in capsys.readouterr().err


def test_github_actions_example_runs_the_pipeline():
    wf = yaml.safe_load((REPO / "docs" / "github-actions-example.yml").read_text())
    steps = wf["jobs"]["pipeline"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "omniq pipeline" in runs and "--workdir" in runs and "--dry-run" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert all(f in upload["with"]["path"] for f in ("summary.md", "summary.json", "deltas.png"))


@pytest.mark.slow
def test_pipeline_on_tiny_end_to_end(tmp_path, registry, capsys, monkeypatch):
    """quantize -> lint -> validate -> build -> publish for real, then a re-run that does nothing (~2 min)."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(workdir=str(tmp_path / "work"), targets=["b200"],
                calibration={"set": "tiny-calib", "samples": 8, "seq_len": 64},
                evaluation={"set": "eval", "samples": 8, "seq_len": 64},
                recipes=[{"recipe": "fp8", "gates": {"max_kl": 0.05}}],
                publish=[f"oci://{registry.addr}/e2e/tiny:{{recipe}}-{{key}}"])
    file = tmp_path / "pipeline.yaml"
    file.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("COLUMNS", "200")
    rc = main(["pipeline", str(file)])
    out = capsys.readouterr().out
    assert rc == 0, out
    s = json.loads((tmp_path / "work" / "summary.json").read_text())
    (art,) = s["artifacts"]
    assert art["status"] == "passed" and art["deltas"]["kl_mean"] < 0.05 and art["formats"]["fp8"] > 0
    assert art["builds"][0]["status"] == "ok" and (Path(art["builds"][0]["path"]) / "build.json").is_file()
    pulled = tmp_path / "pulled"
    oci.pull(art["published"][0]["ref"], pulled)
    validation = json.loads((pulled / "validation.json").read_text())
    assert validation["passed"] is True and validation["reference_cache"]["hit"] is False
    assert len(list((tmp_path / "work" / "cache" / "reference-cache").glob("*.safetensors"))) == 1
    assert json.loads((pulled / "omniq.json").read_text())["source"]["model"] == "tiny"

    rc = main(["pipeline", str(file)])
    assert rc == 0 and "nothing to do" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "work")
