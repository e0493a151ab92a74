"""`omniq quantize` with weight-calibration algorithms in the recipe, end to end through the CLI: the exported
tensors are the algorithms' (checked against omniq's own arithmetic from the source weights and the exported
global scales), omniq.json records them and the mse fallbacks, and bad recipes exit 2 with nothing written."""

import json

import pytest
import torch

from checkpoint_dir import read_tensors
from conftest import run_cli_in_subprocess
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import formats, weight_search

RECIPE = """name: algos-e2e
default: nvfp4
algorithm: mse          # mamba out_proj (the rest has rules)
rules:
  - modules: ["backbone.layers.1.mixer.experts.*"]
    format: nvfp4
    algorithm: {name: gptq, min_tokens: 1000000}
  - select: [routed_experts]
    format: nvfp4
    algorithm: max
  - select: [mamba_in]
    format: nvfp4
    algorithm: {name: gptq, block_size: 64}
  - select: [attention]
    format: fp8
    algorithm: local-hessian
  - select: [shared_experts]
    format: nvfp4
    algorithm: four-over-six
"""
CALIB = ["--calib-samples", "8", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("algos")
    (root / "r.yaml").write_text(RECIPE)
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(root / "r.yaml"), "--out",
                                 str(root / "out"), *CALIB, "--calib-seed", "3"])
    return dict(run, path=root / "out")


def test_quantize_records_the_algorithms(artifact, tiny_dir):
    assert artifact["rc"] == 0, artifact["stderr"][-2000:]
    assert "weight calibration:" in artifact["stdout"]
    m = json.loads((artifact["path"] / "omniq.json").read_text())
    wc = m["weight_calibration"]
    arch = open_checkpoint(str(tiny_dir)).arch
    experts = sorted(lin.name for lin in arch.linears if lin.expert is not None and lin.layer == 1)
    assert wc["fallback_to_mse"] == experts                   # min_tokens above any count: every expert
    layers = {k: v["layers"] for k, v in wc["algorithms"].items()}
    assert layers == {"gptq": len(experts) + 4, "local-hessian": 8, "mse": 4, "four-over-six": 8,
                      "max": 3 * len(experts)}
    assert sorted(p["min_tokens"] for p in wc["algorithms"]["gptq"]["parameters"]) == [64, 1000000]
    assert m["calibration"]["seed"] == 3
    assert m["recipe"]["algorithm"] == "mse"


def test_exported_scales_are_the_algorithms(artifact, tiny_dir):
    got = read_tensors(artifact["path"])
    src = open_checkpoint(str(tiny_dir)).read()
    # mse (mamba out_proj) and four-over-six (shared experts): recomputed here from the source weight and the
    # exported global scale, bit for bit
    for name, method in (("backbone.layers.0.mixer.out_proj", "mse"),
                         ("backbone.layers.1.mixer.shared_experts.up_proj", "four-over-six"),
                         ("backbone.layers.1.mixer.experts.3.down_proj", "mse")):       # gptq fell back
        w = src[f"{name}.weight"]
        ws2 = got[f"{name}.weight_scale_2"]
        want = weight_search.nvfp4_weight(w, ws2, method)
        assert torch.equal(got[f"{name}.weight_scale"].view(torch.uint8), want.weight_scale.view(torch.uint8)), name
        assert torch.equal(got[f"{name}.weight"], want.weight), name
        assert not torch.equal(got[f"{name}.weight_scale"].view(torch.uint8),
                               formats.nvfp4_block_scales(w, ws2).view(torch.uint8))
    # gptq (mamba in_proj): the weights move (error compensation), yet stay close to the source
    name = "backbone.layers.0.mixer.in_proj"
    w = src[f"{name}.weight"].float()
    deq = formats.nvfp4_dequantize(got[f"{name}.weight"], got[f"{name}.weight_scale"], got[f"{name}.weight_scale_2"])
    rtn = formats.nvfp4_fake_quant_weight(src[f"{name}.weight"], got[f"{name}.weight_scale_2"])
    assert not torch.equal(deq, rtn)
    assert float((deq - w).norm() / w.norm()) < 0.3
    # fp8 local-hessian: a per-tensor scale at most max's
    q = "backbone.layers.3.mixer.q_proj"
    assert float(got[f"{q}.weight_scale"]) <= float(src[f"{q}.weight"].float().abs().amax() / 448) * (1 + 1e-6)


def test_streamed_statistics_algorithms_are_the_whole_model_arithmetic(artifact, tiny_dir):
    """gptq and local-hessian ran per layer inside the streamed quantize; their exported tensors are bit for
    bit what `calibrate_weights` computes over the whole model from the same calibration rows (seed 3) and
    the exported global scales."""
    from omniq.calib import data as calib_data
    from omniq.quant import recipe as recipes
    from omniq.quant.plan import make_plan
    from omniq.quant.weight_calibration import calibrate_weights

    got = read_tensors(artifact["path"])
    ckpt = open_checkpoint(str(tiny_dir))
    rec = recipes.load(str(artifact["path"].parent / "r.yaml"))
    plan = make_plan(ckpt.arch, rec)
    algos = {lin.name: rec.algorithm_of(lin, ckpt.arch) for lin in plan.quantized}
    rows = calib_data.load(calib_data.default_for(ckpt.path), ckpt.tokenizer, samples=8, seq_len=64, seed=3).rows
    ws2 = {n[: -len(".weight_scale_2")]: t for n, t in got.items() if n.endswith(".weight_scale_2")}
    wc = calibrate_weights(ckpt.arch, ckpt.read(), rows, plan.formats, algos, ws2)
    checked = set()
    for name, cw in wc.weights.items():
        if cw.algorithm in ("gptq", "local-hessian"):
            for tname, t in cw.tensors().items():
                assert torch.equal(got[tname].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), tname
            checked.add(cw.algorithm)
    assert checked == {"gptq", "local-hessian"}


def test_validate_reads_it(artifact, tmp_path):
    from omniq.validate.artifact import read_artifact

    a = read_artifact(str(artifact["path"]))
    assert a.format == "mixed" and not a.warnings


@pytest.mark.parametrize("body, message", [
    ("name: x\ndefault: nvfp4\nalgorithm: awq\n", "algorithm 'awq' is unknown"),
    ("name: x\ndefault: fp8\nalgorithm: four-over-six\n", "four-over-six does not apply to fp8"),
])
def test_bad_algorithm_exits_2_and_writes_nothing(tmp_path, body, message):
    (tmp_path / "r.yaml").write_text(body)
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out",
                                 str(tmp_path / "out")])
    assert run["rc"] == 2 and message in run["stderr"] and len(run["stderr"].strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
