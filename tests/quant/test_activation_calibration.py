"""activation_calibration: mse (input_scale = max's x the factor with the least squared input error), through
`omniq quantize`; max stays the default."""

import json

import pytest
import torch

from conftest import run_cli_in_subprocess
from omniq.errors import OmniqError
from omniq.quant import formats
from omniq.quant import recipe as recipes
from omniq.quant.weight_calibration import ACT_FACTORS


def test_recipe_key():
    r = recipes.parse({"name": "t", "default": "nvfp4", "activation_calibration": "mse"}, "t")
    assert r.activation_calibration == "mse" and r.as_dict()["activation_calibration"] == "mse"
    assert recipes.load("nvfp4").activation_calibration == "max"
    assert "activation_calibration" not in recipes.load("nvfp4").as_dict()
    with pytest.raises(OmniqError, match="activation_calibration 'awq' is unknown"):
        recipes.parse({"name": "t", "default": "nvfp4", "activation_calibration": "awq"}, "t")


def test_quantize_with_activation_mse(tmp_path, tiny_dir):
    """The exported input scales are max's (a max artifact of the same calibration) times the recorded factor,
    the weights stay max's, the routed experts of one projection share a factor, omniq.json records them."""
    from omniq.model.checkpoint import open_checkpoint

    calib = ["--calib-samples", "8", "--calib-seq-len", "64", "--calib-seed", "1"]
    (tmp_path / "a.yaml").write_text("name: a\ndefault: nvfp4\nactivation_calibration: mse\n")
    for name, recipe in (("max", "nvfp4"), ("mse", str(tmp_path / "a.yaml"))):
        run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", recipe, "--out", str(tmp_path / name), *calib])
        assert run["rc"] == 0, run["stderr"][-2000:]
    m = json.loads((tmp_path / "mse" / "omniq.json").read_text())
    act = m["weight_calibration"]["activation_calibration"]
    assert m["recipe"]["activation_calibration"] == "mse" and act["factors_tried"] == list(ACT_FACTORS)
    factors = act["input_scale_factor"]
    base, got = open_checkpoint(str(tmp_path / "max")).read(), open_checkpoint(str(tmp_path / "mse")).read()
    assert "weight_calibration" not in json.loads((tmp_path / "max" / "omniq.json").read_text())
    arch = open_checkpoint(str(tiny_dir)).arch
    quantized = [lin for lin in arch.linears if lin.role != "lm_head"]
    assert set(factors) == {lin.name for lin in quantized}
    assert any(f != 1.0 for f in factors.values())
    for lin in quantized:
        n = f"{lin.name}.input_scale"
        assert torch.allclose(got[n], base[n] * factors[lin.name], rtol=1e-6), n
        assert torch.equal(got[f"{lin.name}.weight"], base[f"{lin.name}.weight"])      # weights: max's, as before
    experts = {}
    for lin in quantized:
        if lin.expert is not None:
            experts.setdefault((lin.layer, lin.role), set()).add(factors[lin.name])
    assert experts and all(len(v) == 1 for v in experts.values())
