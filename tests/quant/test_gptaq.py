"""gptaq: GPTQ aiming at the output the engine computes from quantized inputs (omniq.quant.gptq.asymmetric_target),
its recipe parameters, and `omniq quantize` with it through the CLI (streamed = whole-model arithmetic)."""

import json

import pytest
import torch

from conftest import run_cli_in_subprocess
from omniq.errors import OmniqError
from omniq.quant import formats, gptq
from omniq.quant import recipe as recipes


def _case(out=64, inp=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    x = (torch.randn(n, inp, generator=g) @ mix) * torch.linspace(0.2, 3.0, inp)
    x[:, 7] *= 20.0                                        # an outlier channel: NVFP4 input blocks lose the rest
    xq = formats.nvfp4_fake_quant(x, formats.nvfp4_global_scale(x.abs().amax()))
    return w, x, xq


def _stats(x, xq):
    return xq.T @ xq / x.shape[0], x.T @ xq / x.shape[0]


def test_target_is_the_source_weight_without_input_error_and_for_unused_channels():
    w, x, _ = _case()
    x[:, 11] = 0.0                                         # a dead input channel
    hq, c = _stats(x, x)
    t = gptq.asymmetric_target(w, hq, c, damping=0.1)
    assert torch.allclose(t, w, atol=1e-6)
    _, x2, xq2 = _case(seed=1)
    x2[:, 11] = 0.0
    xq2[:, 11] = 0.0
    t2 = gptq.asymmetric_target(w, *_stats(x2, xq2), damping=0.1)
    assert torch.allclose(t2[:, 11], w[:, 11])             # no row uses it: kept, not shrunk to zero
    assert not torch.allclose(t2, w, atol=1e-4)


def test_target_lowers_the_float_output_error_and_moves_towards_w_with_damping():
    w, x, xq = _case()
    hq, c = _stats(x, xq)
    err = lambda v: float((x @ w.T - xq @ v.T).square().mean())       # noqa: E731
    drift = []
    for d in (0.01, 0.1, 1.0, 10.0):
        t = gptq.asymmetric_target(w, hq, c, damping=d)
        assert err(t) < err(w)
        drift.append(float((t - w).norm() / w.norm()))
    assert drift == sorted(drift, reverse=True) and drift[-1] < 0.1 * drift[0]


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_gptaq_beats_gptq_on_the_engine_output(fmt):
    """Both quantized weights computed from quantized inputs, against the float layer."""
    w, x, xq = _case()
    if fmt == "fp8":
        xq = formats.fp8_fake_quant(x, formats.fp8_scale(x.abs().amax()))
    hq, c = _stats(x, xq)
    plain = gptq.gptq(w, x.T @ x / x.shape[0], fmt).dequantized()
    aware = gptq.gptq(gptq.asymmetric_target(w, hq, c), hq, fmt).dequantized()
    err = lambda v: float((x @ w.T - xq @ v.T).square().mean())       # noqa: E731
    assert err(aware) < (0.95 if fmt == "nvfp4" else 0.99) * err(plain)       # FP8 inputs lose less


def test_recipe_parameters():
    r = recipes.parse({"name": "t", "default": "nvfp4",
                       "algorithm": {"name": "gptaq", "damping": 0.02, "target_damping": 0.5}}, "t")
    assert r.algorithm == recipes.Algorithm("gptaq", 0.02, 128, 64, 0.5)
    assert r.as_dict()["algorithm"]["target_damping"] == 0.5
    assert "target_damping" not in recipes.Algorithm("gptq").as_dict()
    for bad, msg in (({"name": "gptq", "target_damping": 0.1}, "gptq takes no target_damping"),
                     ({"name": "gptaq", "target_damping": 0}, "target_damping 0 must be")):
        with pytest.raises(OmniqError, match=msg):
            recipes.parse({"name": "t", "default": "nvfp4", "algorithm": bad}, "t")


RECIPE = """name: gptaq-e2e
default: nvfp4
algorithm: {name: gptaq, target_damping: 0.2}
rules:
  - select: [attention]
    format: fp8
    algorithm: gptaq
  - select: [shared_experts]
    format: nvfp4
    algorithm: gptq
"""


def test_quantize_with_gptaq_through_the_cli(tmp_path, tiny_dir):
    """`omniq quantize` runs gptaq streamed: omniq.json records it with its parameters; the exported NVFP4
    and FP8 tensors are bit for bit `calibrate_weights` over the whole model with the exported global and
    input scales; and they differ from what gptq exports."""
    from calibration_reference import check_against_whole_model
    from omniq.quant.weight_calibration import calibrate_weights

    (tmp_path / "r.yaml").write_text(RECIPE)
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out",
                                 str(tmp_path / "out"), "--calib-samples", "8", "--calib-seq-len", "64",
                                 "--calib-seed", "2"])
    assert run["rc"] == 0, run["stderr"][-2000:]
    wc = json.loads((tmp_path / "out" / "omniq.json").read_text())["weight_calibration"]
    assert set(wc["algorithms"]) == {"gptaq", "gptq"}
    assert {p.get("target_damping") for p in wc["algorithms"]["gptaq"]["parameters"]} == {0.2, 0.1}
    ref = check_against_whole_model(tmp_path / "out", tiny_dir, tmp_path / "r.yaml", samples=8, seq_len=64, seed=2)
    assert {("gptaq", "nvfp4"), ("gptaq", "fp8"), ("gptq", "nvfp4")} <= ref.seen
    ckpt, plan, algos, rows, scales, inputs, source, got = (ref.ckpt, ref.plan, ref.algos, ref.rows, ref.scales,
                                                            ref.inputs, ref.source, ref.got)
    as_gptq = {n: recipes.Algorithm("gptq") if a.name == "gptaq" else a for n, a in algos.items()}
    other = calibrate_weights(ckpt.arch, source, rows, plan.formats, as_gptq, scales)
    name = "backbone.layers.0.mixer.in_proj"
    assert not torch.equal(other.weights[name].tensors()[f"{name}.weight"], got[f"{name}.weight"])
    # without exported input scales (`omniq search`), gptaq max-calibrates them from the stream's inputs:
    # on layer 0 (the embeddings' stream, as ModelOpt's calibration saw it, in bf16) close to the exported ones
    from omniq.quant.weight_calibration import _max_input_scales

    lins0 = [lin for lin in ckpt.arch.linears if lin.layer == 0]
    xs = [torch.nn.functional.embedding(rows, source[ckpt.arch.embedding_weight].float())]
    mine = _max_input_scales(ckpt.arch, lins0, plan.formats, source, xs)
    assert set(mine) == {lin.name for lin in lins0}
    for n, s in mine.items():
        assert abs(float(s) / float(inputs[n]) - 1) < 0.05, n
