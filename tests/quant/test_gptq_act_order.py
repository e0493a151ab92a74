"""GPTQ's act-order (`algorithm: {name: gptq, act_order: true}`): columns rounded by descending diag(H), for
NVFP4 in whole 16-column groups so every block scale stays one original group's; results permuted back."""

import pytest
import torch

from omniq.quant import formats, gptq, weight_search


def _case(seed=0, out_f=48, in_f=128, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    # inputs with a few loud channels (what act-order is for) and some dead ones
    x = torch.randn(n, in_f, generator=g) * (torch.rand(in_f, generator=g) * 2 + 0.1)
    x[:, torch.randperm(in_f, generator=g)[:6]] *= 12
    x[:, 5] = 0
    return w, x.T @ x / n


def _out_err(w, q, h):
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


def test_permutation_keeps_nvfp4_groups_whole_and_orders_by_the_diagonal():
    _, h = _case()
    p = gptq.act_order_permutation(h, "nvfp4")
    assert sorted(p.tolist()) == list(range(128))
    groups = p.reshape(-1, 16)
    assert all(len({int(c) // 16 for c in grp}) == 1 for grp in groups)        # each a whole original group
    diag = torch.diagonal(h)
    sums = torch.stack([diag[grp].sum() for grp in groups])
    assert torch.all(sums[:-1] >= sums[1:])
    assert all(torch.all(diag[grp][:-1] >= diag[grp][1:]) for grp in groups)
    q = gptq.act_order_permutation(h, "fp8")
    assert torch.all(diag[q][:-1] >= diag[q][1:])
    assert torch.equal(gptq.act_order_permutation(torch.eye(32), "nvfp4"), torch.arange(32))   # ties: as is


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_act_order_packs_to_what_it_computed_and_is_equivariant(fmt):
    """The values pack (with the returned block scales, in the layout's column order) to exactly the weight
    GPTQ computed with; permuting input groups of (W, H) permutes the result the same way."""
    w, h = _case()
    r = gptq.gptq(w, h, fmt, act_order=True)
    if fmt == "nvfp4":
        packed = weight_search.nvfp4_pack(r.values, r.weight_scale, r.weight_scale_2).dequantize(w.shape[-1])
    else:
        packed = formats.fp8_quantize(r.values, r.weight_scale).dequantize()
    assert torch.equal(packed, r.dequantized())
    perm = (torch.randperm(8, generator=torch.Generator().manual_seed(1)).unsqueeze(-1) * 16
            + torch.arange(16)).flatten()
    moved = gptq.gptq(w[:, perm], h[perm][:, perm], fmt, act_order=True)
    torch.testing.assert_close(moved.dequantized(), r.dequantized()[:, perm], rtol=0, atol=1e-6)
    plain = gptq.gptq(w, h, fmt)
    assert not torch.equal(plain.dequantized(), r.dequantized())


def test_act_order_lowers_the_output_error_with_loud_channels():
    errs = {order: sum(_out_err(w, gptq.gptq(w, h, "nvfp4", act_order=order).dequantized(), h)
                       for w, h in (_case(seed=s) for s in range(3)))
            for order in (False, True)}
    assert errs[True] < errs[False]


def test_act_order_batched_equals_one_by_one():
    cases = [_case(seed=s) for s in range(3)]
    ws_, hs = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases])
    batched = gptq.gptq(ws_, hs, "nvfp4", act_order=True)
    for k in range(3):
        one = gptq.gptq(ws_[k], hs[k], "nvfp4", act_order=True)
        assert torch.equal(one.dequantized(), batched.dequantized()[k])
        assert torch.equal(one.weight_scale.view(torch.uint8), batched.weight_scale[k].view(torch.uint8))


def test_recipe_parameter():
    from omniq.errors import OmniqError
    from omniq.quant import recipe as recipes

    def parse(algo, fmt="nvfp4"):
        return recipes.parse({"name": "t", "default": "nvfp4", "rules": [
            {"select": ["mamba"], "format": fmt, "algorithm": algo}]}, "t")

    r = parse({"name": "gptaq", "act_order": True})
    assert r.rules[0].algorithm.act_order and r.rules[0].algorithm.as_dict()["act_order"] is True
    assert recipes.parse(r.as_dict(), "again").as_dict() == r.as_dict()
    assert "act_order" not in parse({"name": "gptq"}).rules[0].algorithm.as_dict()     # omniq.json as before
    for algo, fmt, message in [({"name": "mse", "act_order": True}, "nvfp4", "mse takes no act_order"),
                               ({"name": "local-hessian", "act_order": True}, "fp8", "takes no act_order"),
                               ({"name": "gptq", "act_order": "yes"}, "nvfp4", "act_order 'yes' must be true"),
                               ({"name": "gptq", "act_order": True}, "bf16", "gptq does not apply to bf16")]:
        with pytest.raises(OmniqError, match=message):
            parse(algo, fmt)


RECIPE = """name: act-order
default: nvfp4
rules:
  - select: [mamba_in]
    format: nvfp4
    algorithm: {name: gptq, act_order: true}
  - select: [routed_experts]
    format: nvfp4
    algorithm: {name: gptaq, act_order: true, min_tokens: 1}
  - select: [attention]
    format: fp8
    algorithm: {name: gptq, act_order: true}
"""


def test_quantize_with_act_order_through_the_cli(tmp_path, tiny_dir):
    """`omniq quantize` with act-order (NVFP4 Mamba in_proj, gptaq routed experts in chunks, FP8 attention):
    omniq.json records it, and the exported tensors are bit for bit what `calibrate_weights` computes over
    the whole model from the same rows and exported global scales."""
    import json

    from calibration_reference import check_against_whole_model
    from cli_subprocess import run_cli_in_subprocess

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out),
                                 "--calib-samples", "4", "--calib-seq-len", "64", "--calib-seed", "1"])
    assert run["rc"] == 0, run["stderr"][-2000:]
    wc = json.loads((out / "omniq.json").read_text())["weight_calibration"]
    assert all(p.get("act_order") is True for name in ("gptq", "gptaq") for p in wc["algorithms"][name]["parameters"])
    ref = check_against_whole_model(out, tiny_dir, tmp_path / "r.yaml", samples=4, seq_len=64, seed=1)
    assert {("gptq", "nvfp4"), ("gptaq", "nvfp4"), ("gptq", "fp8")} <= ref.seen


def test_act_order_on_an_algorithm_it_does_not_apply_to_exits_2_and_writes_nothing(tmp_path):
    from cli_subprocess import run_cli_in_subprocess

    (tmp_path / "r.yaml").write_text("name: x\ndefault: nvfp4\nalgorithm: {name: mse, act_order: true}\n")
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out",
                                 str(tmp_path / "out")])
    assert run["rc"] == 2 and "algorithm mse takes no act_order parameter" in run["stderr"]
    assert len(run["stderr"].strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
