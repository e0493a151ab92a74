"""eval.json (`omniq eval --out ARTIFACT/eval.json`) in an artifact: shipped, read exactly, bound to the
artifact like validation.json, gating publish when it failed, and in the model card."""

from __future__ import annotations

import json

from omniq.cli import main
from omniq.publish import model_card, oci, release as rel
from publish_fixtures import make_artifact
from test_report_binding import _publish


def add_eval(art, *, passed: bool = True, bound_to=None) -> dict:
    validation = json.loads((art / "validation.json").read_text())
    task = {"metric": "acc", "filter": "none", "reference": 0.62, "reference_stderr": 0.035, "candidate": 0.60,
            "candidate_stderr": 0.036, "delta": -0.02, "delta_stderr": 0.05, "recovery": 0.60 / 0.62,
            "min_recovery": 0.95, "passed": passed, "samples": 186}
    doc = {"passed": passed, "tasks": {"omniq-docstring-cloze": task},
           "failures": [] if passed else ["omniq-docstring-cloze: acc 0.5 vs the reference's 0.62, recovery 0.806 < 0.95"],
           "format": "fp8", "limit": None, "lm_eval": "0.4.13",
           "bound_to": bound_to if bound_to is not None else validation["bound_to"]}
    (art / "eval.json").write_text(json.dumps(doc))
    return doc


def test_eval_json_in_the_card_and_the_metadata(tmp_path):
    art = make_artifact(tmp_path / "art")
    add_eval(art)
    r = rel.open_release(art)
    assert "eval.json" in r.files and r.eval["passed"] is True
    meta = rel.metadata(r)
    assert meta["gates"]["passed"] and meta["task_accuracy"]["omniq-docstring-cloze"]["recovery"] > 0.96
    card = model_card.render(r)
    assert "## Task accuracy (lm-eval-harness)" in card
    assert "| omniq-docstring-cloze | acc | 186 | 0.62 | 0.6 | -0.02 ± 0.05 | 0.9677 | ≥ 0.95: passed |" in card
    assert oci.media_type("eval.json") == "application/vnd.omniq.eval+json"
    # without one the card has no such section
    assert "Task accuracy" not in model_card.render(rel.open_release(make_artifact(tmp_path / "plain")))


def test_failed_or_foreign_eval_json_blocks_publishing(tmp_path, capsys):
    art = make_artifact(tmp_path / "a", seed=1)
    add_eval(art, passed=False)
    rc, err = _publish(capsys, art)
    assert rc == 1 and "task-accuracy gates failed (eval.json)" in err and len(err.strip().splitlines()) == 1
    assert "task-accuracy gates failed" in rel.metadata(rel.open_release(art))["gates"]["problems"][0]

    other = make_artifact(tmp_path / "b", seed=2)
    add_eval(art, bound_to=json.loads((other / "validation.json").read_text())["bound_to"])
    rc, err = _publish(capsys, art)
    assert rc == 1 and f"{art / 'eval.json'} judged another artifact" in err
    assert main(["publish", str(art), "oci://127.0.0.1:9/omniq/x:v1", "--allow-failed"]) == 1   # never waved through
    capsys.readouterr()


def test_eval_json_of_another_shape_is_exit_2_naming_the_key(tmp_path, capsys):
    art = make_artifact(tmp_path / "a")
    doc = add_eval(art)
    doc["tasks"]["omniq-docstring-cloze"]["candidate"] = "0.6"
    (art / "eval.json").write_text(json.dumps(doc))
    rc, err = _publish(capsys, art)
    assert rc == 2 and "eval.json" in err and "tasks['omniq-docstring-cloze'].candidate" in err
