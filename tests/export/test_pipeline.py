"""`omniq pipeline`: caching, invalidation, resume after SIGKILL, gates, summary, --only / --dry-run.

Stages are fast fakes (tests/export/fake_pipeline.py) run in a subprocess, so the process can be killed
anywhere; the publish stage is the real one, against the test registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from omniq.errors import OmniqError
from omniq.pipeline import cache
from omniq.publish import oci
from omniq.quant.recipe import RECIPES_DIR
import fake_pipeline
from publish_fixtures import registry  # noqa: F401

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_pipeline.py"


def write_spec(tmp: Path, **over) -> Path:
    src = tmp / "source"
    if not src.exists():
        src.mkdir()
        (src / "config.json").write_text('{"model_type": "nemotron_h"}')
        (src / "model.safetensors").write_bytes(b"\x01" * 2048)
    spec = {"name": "tiny", "source": "source", "workdir": "work",
            "calibration": {"set": "tiny-calib", "samples": 8, "seq_len": 64},
            "evaluation": {"set": "eval", "samples": 4, "seq_len": 64},
            "recipes": [{"recipe": "fp8", "gates": {"max_kl": 0.01}}, {"recipe": "nvfp4", "gates": {"max_kl": 0.05}}],
            "targets": ["h100", "b200"]}
    spec.update(over)
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_fake(spec: Path, *args, kill: str | None = None, kl: dict | None = None, env: dict | None = None):
    """Run the pipeline with the fake stages: in a subprocess when it is to be killed, else in this process
    (same code path, without a Python start-up per run)."""
    e = {"FAKE_LOG": str(spec.parent / "calls.log"), "COLUMNS": "200", **(env or {})}
    if kl:
        e["FAKE_KL"] = json.dumps(kl)
    if kill:
        full = {**os.environ, **e, "FAKE_KILL": kill}
        return subprocess.run([sys.executable, str(FAKE), str(spec), *args], capture_output=True, text=True,
                              env=full, timeout=120, cwd=str(HERE))
    saved = {k: os.environ.get(k) for k in [*e, "FAKE_KILL"]}
    os.environ.pop("FAKE_KILL", None)
    os.environ.update(e)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = fake_pipeline.main([str(spec), *args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def calls(spec: Path) -> list[str]:
    log = spec.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def assert_cache_sound(workdir: Path):
    """Every output directory that is not hidden has a valid completion marker; nothing looks finished
    that is not."""
    store = cache.Store(workdir / "cache")
    for stage_dir in (workdir / "cache").iterdir():
        if not stage_dir.is_dir():
            continue
        for p in stage_dir.iterdir():
            if p.is_dir() and not p.name.startswith("."):
                assert store.get(stage_dir.name, p.name) is not None, f"{p} looks finished but has no marker"
                assert not (p / "partial.bin").exists()


ALL = ["quantize fp8", "quantize nvfp4", "lint fp8", "lint nvfp4", "validate fp8", "validate nvfp4",
       "build fp8 h100", "build fp8 b200", "build nvfp4 h100", "build nvfp4 b200"]


def test_unchanged_pipeline_does_no_work_and_says_so(tmp_path):
    spec = write_spec(tmp_path)
    p = run_fake(spec)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(calls(spec)) == sorted(ALL)
    assert "ran 10 of 10" in p.stdout
    p = run_fake(spec)
    assert p.returncode == 0, p.stderr
    assert sorted(calls(spec)) == sorted(ALL)                         # nothing ran again
    assert "nothing to do: all 10 stage outputs were already in the cache" in p.stdout
    work = tmp_path / "work"
    summary = json.loads((work / "summary.json").read_text())
    assert summary["stages"] == {"total": 10, "ran": 0, "cached": 10, "failed": 0, "skipped": 0, "not_run": 0}
    assert (work / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_cache_sound(work)


def test_changing_one_recipe_reruns_only_that_column(tmp_path):
    mine = tmp_path / "my-fp8.yaml"
    shutil.copy(RECIPES_DIR / "fp8.yaml", mine)
    spec = write_spec(tmp_path, recipes=[{"recipe": "my-fp8.yaml", "id": "fp8"}, "nvfp4"])
    assert run_fake(spec).returncode in (0, 1)
    before = len(calls(spec))
    data = yaml.safe_load(mine.read_text())
    data["kv_cache"] = "none" if data.get("kv_cache") == "fp8" else "fp8"
    mine.write_text(yaml.safe_dump(data))
    run_fake(spec)
    again = calls(spec)[before:]
    assert sorted(again) == ["build fp8 b200", "build fp8 h100", "lint fp8", "quantize fp8", "validate fp8"]

    # a gate change re-validates that column (and what follows from it), it does not re-quantize
    before = len(calls(spec))
    spec.write_text(spec.read_text().replace("recipe: nvfp4", "recipe: nvfp4\n  gates: {max_kl: 0.1}")
                    if "- recipe: nvfp4" in spec.read_text() else
                    spec.read_text().replace("- nvfp4", "- recipe: nvfp4\n  gates:\n    max_kl: 0.1"))
    p = run_fake(spec)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(calls(spec)[before:]) == ["build nvfp4 b200", "build nvfp4 h100", "validate nvfp4"]

    # a changed source file changes every key
    before = len(calls(spec))
    (tmp_path / "source" / "model.safetensors").write_bytes(b"\x02" * 2048)
    run_fake(spec)
    assert len(calls(spec)[before:]) == 10


@pytest.mark.parametrize("kill", ["quantize:nvfp4", "lint:fp8", "validate:nvfp4", "build:nvfp4:b200"])
def test_sigkill_anywhere_resumes_from_the_last_finished_stage(tmp_path, kill):
    spec = write_spec(tmp_path, recipes=[{"recipe": "fp8"}, {"recipe": "nvfp4", "gates": {"max_kl": 0.05}}],
                      targets=["b200"])
    p = run_fake(spec, kill=kill)
    assert p.returncode == -9, p.stdout + p.stderr
    first = calls(spec)
    assert_cache_sound(tmp_path / "work")
    assert not (tmp_path / "work" / "summary.json").exists()

    p = run_fake(spec)
    assert p.returncode == 0, p.stdout + p.stderr
    second = calls(spec)[len(first):]
    killed = " ".join(kill.split(":"))
    # the killed stage runs again, everything finished before it does not, nothing runs twice after it
    assert killed in second
    assert not set(first[:-1]) & set(second)
    assert sorted(first[:-1] + second) == sorted(c for c in ALL if "h100" not in c)
    assert_cache_sound(tmp_path / "work")
    leftovers = [p for p in (tmp_path / "work" / "cache").rglob(".*") if p.name != ".lock"]
    assert leftovers == []


def test_commit_interrupted_between_rename_and_marker(tmp_path, monkeypatch):
    store = cache.Store(tmp_path / "c")
    store.lock()
    tmp = store.begin("validate", "k1")
    (tmp / "validation.json").write_text("{}")

    def crash(path, data):
        raise KeyboardInterrupt("killed here")

    monkeypatch.setattr(cache, "write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        store.commit("validate", "k1", tmp, {"passed": True})
    monkeypatch.undo()
    assert (tmp_path / "c" / "validate" / "k1" / "result.json").exists()      # renamed, but no marker:
    assert store.get("validate", "k1") is None                                # not finished
    store.unlock()
    store.lock()                                                              # the next run sweeps it
    assert not (tmp_path / "c" / "validate" / "k1").exists()
    # a marker that does not match result.json is not trusted either
    t = store.begin("lint", "k2")
    store.commit("lint", "k2", t, {"passed": True})
    assert store.get("lint", "k2").result == {"passed": True}
    (tmp_path / "c" / "lint" / "k2" / "result.json").write_text('{"passed": false}')
    assert store.get("lint", "k2") is None
    # one pipeline per work directory
    with pytest.raises(OmniqError, match="another `omniq pipeline` is running"):
        cache.Store(tmp_path / "c").lock()
    store.unlock()


def test_failed_gate_exit_1_summary_and_skips(tmp_path):
    spec = write_spec(tmp_path, recipes=[{"recipe": "fp8", "gates": {"max_kl": 0.01}},
                                         {"recipe": "nvfp4", "gates": {"max_kl": 0.01}}])
    step = tmp_path / "step-summary.md"
    step.write_text("previous step\n")
    p = run_fake(spec, env={"GITHUB_STEP_SUMMARY": str(step)})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "build nvfp4 h100" not in calls(spec) and "build fp8 h100" in calls(spec)
    s = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert s["exit_code"] == 1
    fp8, nvfp4 = s["artifacts"]
    assert fp8["status"] == "passed" and nvfp4["status"] == "gates failed"
    assert fp8["deltas"]["kl_mean"] == 0.004 and nvfp4["deltas"]["kl_mean"] == 0.03
    assert nvfp4["gates"]["validate"] is False and nvfp4["gates"]["thresholds"]["max_kl"] == 0.01
    assert fp8["size_bytes"] == sum(f.stat().st_size for f in Path(fp8["path"]).iterdir())
    assert [b["status"] for b in nvfp4["builds"]] == ["skipped", "skipped"]
    assert [b["status"] for b in fp8["builds"]] == ["ok", "ok"]
    md = step.read_text()
    assert md.startswith("previous step\n## omniq pipeline `tiny`")
    assert "| fp8 | ✅ passed |" in md and "| nvfp4 | ❌ gates failed |" in md
    assert "0.03 (≤ 0.01)" in md and "kl_mean 0.03 > max_kl 0.01" in md
    assert md == "previous step\n" + (tmp_path / "work" / "summary.md").read_text()
    p = run_fake(spec)                                   # cached, and still failing
    assert p.returncode == 1 and "nothing to do" in p.stdout


@pytest.mark.parametrize("over,fragment", [
    ({"recipes": []}, "recipes must be a non-empty list"),
    ({"recipes": ["no-such-recipe"]}, "unknown recipe 'no-such-recipe'"),
    ({"recipes": ["fp8", "fp8"]}, "used twice"),
    ({"recipes": [{"recipe": "fp8", "gates": {"max_kll": 1}}]}, "unknown key 'max_kll'"),
    ({"targets": ["h999"]}, "unknown target"),
    ({"publish": ["oci://127.0.0.1:1/x/{nope}:v1"]}, "unknown placeholder {nope}"),
    ({"publish": ["s3://bucket/x"]}, "expected oci://"),
    ({"calibration": {"samples": 0}}, "calibration.samples must be an integer >= 1"),
    ({"colour": "blue"}, "unknown key 'colour'"),
])
def test_bad_pipeline_file_is_exit_2(tmp_path, over, fragment):
    spec = write_spec(tmp_path, **over)
    p = run_fake(spec)
    assert p.returncode == 2, p.stdout + p.stderr
    assert fragment in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert calls(spec) == []


def test_only_and_dry_run(tmp_path):
    spec = write_spec(tmp_path, targets=["h100"])
    p = run_fake(spec, "--dry-run")
    assert p.returncode == 0 and "would run" in p.stdout and "8 of 8 stage outputs would run" in p.stdout
    assert calls(spec) == [] and not (tmp_path / "work").exists()

    p = run_fake(spec, "--only", "lint")
    assert p.returncode == 2 and "quantize output is not there" in p.stdout
    assert calls(spec) == []
    p = run_fake(spec, "--only", "quantize")
    assert p.returncode == 0, p.stdout + p.stderr
    assert calls(spec) == ["quantize fp8", "quantize nvfp4"]
    p = run_fake(spec, "--only", "validate")
    assert p.returncode == 0 and calls(spec)[2:] == ["validate fp8", "validate nvfp4"]
    p = run_fake(spec, "--only", "build")
    assert p.returncode == 2 and "lint and validate have not both finished" in p.stdout
    p = run_fake(spec, "--dry-run")
    assert "4 of 8 stage outputs would run" in p.stdout
    p = run_fake(spec)
    assert p.returncode == 0 and sorted(calls(spec)[4:]) == ["build fp8 h100", "build nvfp4 h100", "lint fp8",
                                                             "lint nvfp4"]
    p = run_fake(spec, "--only", "colour")
    assert p.returncode == 2 and "--only 'colour'" in p.stderr


def test_publish_stage_pushes_what_passed(tmp_path, registry):
    ref = f"oci://{registry.addr}/pipeline/{{name}}:{{recipe}}-{{key}}"
    spec = write_spec(tmp_path, targets=["h100"], publish=[ref],
                      recipes=[{"recipe": "fp8"}, {"recipe": "nvfp4", "gates": {"max_kl": 0.01}}])
    p = run_fake(spec)
    assert p.returncode == 1, p.stdout + p.stderr                        # nvfp4 failed its gate
    s = json.loads((tmp_path / "work" / "summary.json").read_text())
    fp8, nvfp4 = s["artifacts"]
    pub = fp8["published"][0]
    assert pub["status"] == "ok" and pub["ref"].startswith(f"oci://{registry.addr}/pipeline/tiny:fp8-")
    assert pub["ref"].endswith(fp8["key"][:12])
    assert nvfp4["published"][0]["status"] == "skipped"
    assert requests.get(f"http://{registry.addr}/v2/pipeline/tiny/manifests/"
                        f"{nvfp4['published'][0]['ref'].rsplit(':', 1)[1]}",
                        headers={"Accept": oci.MANIFEST_MEDIA_TYPE}, timeout=10).status_code == 404

    pulled = tmp_path / "pulled"
    oci.pull(pub["ref"], pulled)
    assert json.loads((pulled / "validation.json").read_text())["kl_mean"] == 0.004
    assert json.loads((pulled / "lint.json").read_text())["passed"] is True
    assert pub["digest"] in (tmp_path / "work" / "summary.md").read_text() or pub["ref"] in \
        (tmp_path / "work" / "summary.md").read_text()
    # the quantize output in the cache is untouched (no reports written into it)
    assert sorted(p.name for p in Path(fp8["path"]).iterdir()) == ["config.json", "model.safetensors", "omniq.json",
                                                                   "tokenizer.json"]
    n = len(calls(spec))
    p = run_fake(spec)
    assert p.returncode == 1 and len(calls(spec)) == n and "nothing to do" in p.stdout
    assert Counter(c.split()[0] for c in calls(spec))["publish"] == 1


def test_publish_allow_failed_publishes_a_failed_column_and_still_exits_1(tmp_path, registry):
    ref = {"ref": f"oci://{registry.addr}/pipeline/waived:{{recipe}}-{{key}}", "allow_failed": True}
    spec = write_spec(tmp_path, targets=["h100"], publish=[ref], recipes=[{"recipe": "nvfp4", "gates": {"max_kl": 0.01}}])
    p = run_fake(spec)
    assert p.returncode == 1, p.stdout + p.stderr
    (art,) = json.loads((tmp_path / "work" / "summary.json").read_text())["artifacts"]
    assert art["status"] == "gates failed" and art["builds"][0]["status"] == "skipped"
    pub = art["published"][0]
    assert pub["status"] == "ok" and pub["waived"] and "validation gates failed" in pub["waived"][0]
    manifest = requests.get(f"http://{registry.addr}/v2/pipeline/waived/manifests/{pub['ref'].rsplit(':', 1)[1]}",
                            headers={"Accept": oci.MANIFEST_MEDIA_TYPE}, timeout=10).json()
    assert manifest["annotations"]["vnd.omniq.gates.passed"] == "false"


def test_a_failing_stage_is_reported_not_cached_and_retried(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    spec = write_spec(tmp_path, targets=[], recipes=["fp8"], publish=[f"oci://127.0.0.1:{port}/x/{{recipe}}:v1"])
    p = run_fake(spec)
    assert p.returncode == 2, p.stdout + p.stderr
    s = json.loads((tmp_path / "work" / "summary.json").read_text())
    (art,) = s["artifacts"]
    assert art["status"] == "error" and art["published"][0]["status"] == "failed"
    assert any("not reachable" in e for e in art["errors"])
    assert "not reachable" in (tmp_path / "work" / "summary.md").read_text()
    n = len(calls(spec))
    p = run_fake(spec)
    assert p.returncode == 2 and calls(spec)[n:] == ["publish fp8 oci://127.0.0.1:%d/x/fp8:v1" % port]
