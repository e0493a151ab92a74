"""Expert coverage (`omniq.calib.experts`), and the checks that end every `omniq quantize`: the coverage
assertion (exported tensors == the layer plan) and `omniq lint`.

The end-to-end cases run `omniq quantize` through the CLI on a copy of the bundled model whose router never
picks experts 0-3 of MoE layer 1 (`e_score_correction_bias` -10), all in ONE subprocess (ModelOpt patches
torch process-wide, so this test process never imports it; one process pays the imports once).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omniq.calib.experts import ExpertCoverage, ExpertPolicy, LayerCounts
from omniq.errors import GateFailed, OmniqError

LAYER = "backbone.layers.1.mixer.experts"
NEVER = [0, 1, 2, 3]
CALIB = ["--calib-samples", "16", "--calib-seq-len", "128"]
SMALL = ["--calib-samples", "4", "--calib-seq-len", "64"]

RUNNER = r'''
import contextlib, io, json, sys
import torch
torch.set_num_threads(1)
from omniq.cli import main
from omniq.export import streamed
from omniq.validate import lint as lint_mod
from omniq.validate.findings import Finding

def leave_layer_bf16(orig):
    # the export "forgets" to quantize one layer: BF16 weight, no scales (silent non-quantization)
    def export_layer(*args, **kwargs):
        result = orig(*args, **kwargs)
        t = result.tensors
        m = "backbone.layers.3.mixer.o_proj"
        if m + ".weight" in t:
            t[m + ".weight"] = torch.zeros(t[m + ".weight"].shape, dtype=torch.bfloat16)
            for k in [k for k in t if k.startswith(m + ".") and k.endswith("scale")]:
                del t[k]
        return result
    return export_layer

def lint_error(orig):
    def lint(path, engine=None, *, checksums=True):
        return orig(path, engine, checksums=checksums) + [Finding("injected", "error", "backbone.layers.0.mixer.in_proj", "injected by the test", "none")]
    return lint

PATCHES = {"export": (streamed, "export_layer", leave_layer_bf16), "lint": (lint_mod, "lint", lint_error)}
results = {}
for name, args, patch in json.loads(sys.argv[1]):
    undo = None
    if patch:
        mod, attr, wrap = PATCHES[patch]
        undo = (mod, attr, getattr(mod, attr))
        setattr(mod, attr, wrap(getattr(mod, attr)))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    finally:
        if undo:
            setattr(*undo)
    results[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def biased(tmp_path_factory, tiny_dir) -> Path:
    """The bundled model with experts 0-3 of MoE layer 1 biased away from the router's top-k."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("biased") / "tiny-biased"
    shutil.copytree(tiny_dir, d)
    t = load_file(str(d / "model.safetensors"))
    bias = t["backbone.layers.1.mixer.gate.e_score_correction_bias"].clone()
    bias[NEVER] = -10.0
    t["backbone.layers.1.mixer.gate.e_score_correction_bias"] = bias
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, biased) -> dict:
    root = tmp_path_factory.mktemp("experts-runs")
    q = ["quantize", str(biased), "--recipe", "nvfp4", "--calib", "tiny-calib"]
    cases = [
        ("all", [*q, "--out", str(root / "all"), *CALIB], None),
        ("routed", [*q, "--out", str(root / "routed"), *CALIB, "--expert-calibration", "routed"], None),
        ("fill", [*q, "--out", str(root / "fill"), *CALIB, "--expert-calibration", "routed",
                  "--expert-fill", "layer-max"], None),
        ("allow", [*q, "--out", str(root / "allow"), *SMALL, "--expert-calibration", "routed",
                   "--allow-uncalibrated-experts"], None),
        ("export", ["quantize", "tiny", "--recipe", "fp8", "--out", str(root / "export"), *SMALL], "export"),
        ("lint", ["quantize", "tiny", "--recipe", "fp8", "--out", str(root / "lint"), *SMALL], "lint"),
    ]
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name, _, _ in cases:
        res[name]["path"] = root / name
    return res


def _manifest(run) -> dict:
    return json.loads((run["path"] / "omniq.json").read_text())


def _scales(path: Path, names) -> dict:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n).float() for n in names}


# ----- end to end ---------------------------------------------------------------------------------------
def test_default_policy_calibrates_never_routed_experts(runs, biased):
    run = runs["all"]
    assert run["rc"] == 0, run["stderr"]
    ex = _manifest(run)["experts"]
    assert ex["policy"] == "all" and ex["min_tokens"] == 64 and ex["uncalibrated"] == {}
    layer = ex["layers"][LAYER]
    assert [layer["routed"][e] for e in NEVER] == [0, 0, 0, 0]                 # the router never picks them
    assert all(layer["calibrated"][e] >= 64 for e in range(16))                 # ... but they were calibrated
    assert sum(layer["routed"]) == 16 * 128 * 4                                 # every token, top-4
    assert ex["below_min_routed"] == {LAYER: NEVER}
    assert len(ex["layers"]) == 4
    names = [f"{LAYER}.{e}.{p}.{s}" for e in NEVER for p in ("up_proj", "down_proj")
             for s in ("input_scale", "weight_scale_2")]
    for name, v in _scales(run["path"], names).items():
        assert bool(v.isfinite().all()) and bool((v > 0).all()), name
    # the summary on stdout: min / median / below threshold per layer
    assert f"{LAYER}: routed min 0 / median" in run["stdout"] and "4/16 below 64" in run["stdout"]
    assert "calibrated min 64" in run["stdout"]
    # lint ran at the end and its report ships as a sidecar (not listed in omniq.json)
    lint = json.loads((run["path"] / "lint.json").read_text())
    assert lint["passed"] is True and "lint.json" not in _manifest(run)["files"]
    assert "lint: 0 errors" in run["stdout"]


def test_default_policy_artifact_passes_validate(runs, biased, tmp_path):
    from omniq.cli import main

    assert runs["all"]["rc"] == 0
    report = tmp_path / "v.json"
    rc = main(["validate", str(biased), str(runs["all"]["path"]), "--samples", "8", "--seq-len", "128",
               "--report", str(report)])
    assert rc == 0 and json.loads(report.read_text())["passed"] is True


def test_routed_without_fill_fails_naming_the_experts(runs):
    run = runs["routed"]
    assert run["rc"] == 1
    for e in NEVER:
        assert f"{LAYER}.{e} (0 tokens)" in run["stderr"]
    assert "--expert-fill layer-max" in run["stderr"]
    assert not run["path"].exists() and not list(run["path"].parent.glob(".routed*"))


def test_routed_with_fill_passes_and_records_it(runs):
    run = runs["fill"]
    assert run["rc"] == 0, run["stderr"]
    ex = _manifest(run)["experts"]
    assert ex["policy"] == "routed" and ex["fill"] == "layer-max"
    assert ex["filled"] == {LAYER: NEVER} and ex["uncalibrated"] == {}
    assert ex["layers"][LAYER]["calibrated"] == ex["layers"][LAYER]["routed"]
    # The filled experts carry the layer's shared input scale; all-expert statistics can only widen it.
    name = f"{LAYER}.0.down_proj.input_scale"
    filled = _scales(run["path"], [name])[name]
    forced = _scales(runs["all"]["path"], [name])[name]
    assert float(filled) > 0 and float(forced) >= float(filled)


def test_allow_uncalibrated_proceeds_and_records_it(runs):
    run = runs["allow"]
    assert run["rc"] == 0, run["stderr"]
    ex = _manifest(run)["experts"]
    assert ex["allow_uncalibrated"] is True and ex["fill"] == "none"
    assert set(NEVER) <= set(ex["uncalibrated"][LAYER])


def test_coverage_assertion_fails_the_run_naming_the_layer(runs):
    run = runs["export"]
    assert run["rc"] == 1
    assert "does not match the layer plan" in run["stderr"]
    assert "backbone.layers.3.mixer.o_proj" in run["stderr"]
    assert not run["path"].exists() and not list(run["path"].parent.glob(".export*"))


def test_lint_error_fails_the_run(runs):
    run = runs["lint"]
    assert run["rc"] == 1
    assert "lint found 1 errors" in run["stderr"] and "injected" in run["stderr"]
    assert not run["path"].exists() and not list(run["path"].parent.glob(".lint*"))


# ----- units --------------------------------------------------------------------------------------------
def _coverage(policy: ExpertPolicy, routed: list[int]) -> ExpertCoverage:
    cov = ExpertCoverage(policy, arch=None)
    cov.layers[1] = LayerCounts(LAYER, list(routed), [0] * len(routed))
    return cov


def test_policy_is_checked():
    with pytest.raises(OmniqError):
        ExpertPolicy(mode="some")
    with pytest.raises(OmniqError):
        ExpertPolicy(fill="mean")
    with pytest.raises(OmniqError):
        ExpertPolicy(min_tokens=0)


def test_enforce_and_manifest():
    routed = [0, 5, 100, 200]
    with pytest.raises(GateFailed) as e:
        _coverage(ExpertPolicy("routed", 10), routed).enforce()
    assert e.value.exit_code == 1 and f"{LAYER}.0 (0 tokens)" in str(e.value) and f"{LAYER}.1 (5 tokens)" in str(e.value)
    _coverage(ExpertPolicy("routed", 10, "layer-max"), routed).enforce()
    allowed = _coverage(ExpertPolicy("routed", 10, allow_uncalibrated=True), routed)
    allowed.enforce()
    m = allowed.manifest()
    assert m["uncalibrated"] == {LAYER: [0, 1]} and m["filled"] == {} and m["allow_uncalibrated"] is True
    assert allowed.summary() == [f"{LAYER}: routed min 0 / median 52.5, 2/4 below 10"]


def test_hook_counts_and_tops_up_without_changing_the_output():
    """The all-experts hook on transformers' own NemotronHExperts: output unchanged, counts right."""
    from types import SimpleNamespace

    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    torch.manual_seed(0)
    cfg = NemotronHConfig(hidden_size=8, n_routed_experts=4, moe_intermediate_size=6, mlp_hidden_act="relu2")
    experts = NemotronHExperts(cfg)
    torch.nn.init.normal_(experts.up_proj)
    torch.nn.init.normal_(experts.down_proj)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mixer = torch.nn.Module()
    model.layers[0].mixer.experts = experts
    arch = SimpleNamespace(layers_of=lambda kind: [0], layer_prefix=lambda i: f"backbone.layers.{i}")
    hidden = torch.randn(10, 8)
    index = torch.tensor([[0, 1]] * 10)                      # experts 2 and 3 never routed
    weights = torch.full((10, 2), 0.5)
    calls = []
    expected = experts(hidden, index, weights)
    experts.register_forward_pre_hook(lambda m, a: calls.append(a[1].flatten().tolist()))
    cov = ExpertCoverage(ExpertPolicy("all", 3), arch)
    with cov.installed(model):
        got = experts(hidden, index, weights)
    assert torch.equal(got, expected)
    c = cov.layers[0]
    assert c.routed == [10, 10, 0, 0] and c.calibrated == [10, 10, 3, 3]
    assert calls[1] == [2, 2, 2, 3, 3, 3]                    # the statistics-only call
