"""The pipeline's optional `eval:` stage (omniq eval per recipe column): keyed and cached, gating builds and
publishing, in the summary and shipped as eval.json. The real stage function is exercised on the bundled
model in tests/validate/test_task_eval.py."""

from __future__ import annotations

import json
from collections import Counter

from omniq.publish import oci
from publish_fixtures import registry  # noqa: F401
from test_pipeline import calls, run_fake, write_spec

EVAL = {"tasks": ["omniq-docstring-cloze"], "limit": 8, "min_recovery": 0.95}


def test_eval_stage_gates_builds_and_is_cached(tmp_path):
    spec = write_spec(tmp_path, eval=EVAL, targets=["h100"],
                      recipes=[{"recipe": "fp8"}, {"recipe": "nvfp4", "gates": {"max_kl": 0.05}}])
    p = run_fake(spec, env={"FAKE_RECOVERY": json.dumps({"nvfp4": 0.9})})
    assert p.returncode == 1, p.stdout + p.stderr
    log = calls(spec)
    assert "eval fp8" in log and "eval nvfp4" in log
    assert log.index("eval fp8") > log.index("validate fp8") and "build nvfp4 h100" not in log
    s = json.loads((tmp_path / "work" / "summary.json").read_text())
    fp8, nvfp4 = s["artifacts"]
    assert fp8["status"] == "passed" and fp8["gates"]["eval"] is True
    assert nvfp4["status"] == "gates failed" and nvfp4["gates"]["eval"] is False and nvfp4["gates"]["validate"]
    assert nvfp4["task_accuracy"]["omniq-docstring-cloze"]["recovery"] == 0.9
    assert [b["status"] for b in nvfp4["builds"]] == ["skipped"]
    md = (tmp_path / "work" / "summary.md").read_text()
    assert "Task accuracy" in md and "**nvfp4** omniq-docstring-cloze: acc 0.6 → 0.54, recovery 0.9 (≥ 0.95) ❌" in md
    # unchanged: nothing runs; a new gate re-runs the eval stages only (and what depends on them)
    n = len(calls(spec))
    assert run_fake(spec, env={"FAKE_RECOVERY": json.dumps({"nvfp4": 0.9})}).returncode == 1 and len(calls(spec)) == n
    spec = write_spec(tmp_path, eval={**EVAL, "min_recovery": 0.85}, targets=["h100"],
                      recipes=[{"recipe": "fp8"}, {"recipe": "nvfp4", "gates": {"max_kl": 0.05}}])
    p = run_fake(spec, env={"FAKE_RECOVERY": json.dumps({"nvfp4": 0.9})})
    assert p.returncode == 0, p.stdout + p.stderr
    new = Counter(c.split()[0] for c in calls(spec)[n:])
    assert new == {"eval": 2, "build": 1}


def test_bad_eval_key_is_exit_2(tmp_path):
    for over, words in (({"tasks": []}, "eval.tasks must be a non-empty list"),
                        ({"tasks": ["x"], "min_recovery": "high"}, "eval.min_recovery must be a ratio"),
                        ({"tasks": ["x"], "limit": 0}, "eval.limit must be an integer >= 1"),
                        ({"tasks": ["x"], "samples": 3}, "eval: unknown key 'samples'")):
        p = run_fake(write_spec(tmp_path, eval=over))
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_published_artifact_ships_eval_json(tmp_path, registry):  # noqa: F811
    ref = f"oci://{registry.addr}/pipeline-eval/{{name}}:{{recipe}}-{{key}}"
    spec = write_spec(tmp_path, eval=EVAL, targets=[], publish=[ref], recipes=[{"recipe": "fp8"}])
    p = run_fake(spec)
    assert p.returncode == 0, p.stdout + p.stderr
    pub = json.loads((tmp_path / "work" / "summary.json").read_text())["artifacts"][0]["published"][0]
    pulled = tmp_path / "pulled"
    oci.pull(pub["ref"], pulled)
    shipped = json.loads((pulled / "eval.json").read_text())
    assert shipped["passed"] is True and "omniq-docstring-cloze" in shipped["tasks"]
