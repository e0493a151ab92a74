"""Weight calibration arithmetic (omniq.quant.weight_search, omniq.quant.gptq) and the recipe's `algorithm:`."""

import pytest
import torch

from omniq.errors import OmniqError
from omniq.quant import formats, gptq, weight_search as ws
from omniq.quant import recipe as recipes


def _weight(out=64, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 5] = 0.2                                   # an outlier: max scales waste resolution on its block
    return w.to(torch.bfloat16)


def _inputs(inp=128, n=2048, seed=1):
    """Correlated inputs with uneven channel scales (what makes GPTQ and local-hessian matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    return (torch.randn(n, inp, generator=g) @ mix) * torch.linspace(0.2, 3.0, inp)


def _block_err(w, deq, h=None):
    d = ws._blocks(deq.float() - w.float())
    return ws._block_error(d, torch.zeros_like(d), h)


def test_max_scales_pack_exactly_like_formats():
    w = _weight()
    ws2 = formats.nvfp4_global_scale(w.float().abs().amax())
    a = formats.nvfp4_quantize(w, ws2)
    b = ws.nvfp4_pack(w, ws.nvfp4_search_scales(w, ws2, "max"), ws2)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))


@pytest.mark.parametrize("method", ["mse", "four-over-six"])
def test_search_never_worse_than_max_per_block_and_better_overall(method):
    w = _weight()
    ws2 = formats.nvfp4_global_scale(w.float().abs().amax())
    base = formats.nvfp4_quantize(w, ws2).dequantize(w.shape[-1])
    new = ws.nvfp4_weight(w, ws2, method)
    e_max, e_new = _block_err(w, base), _block_err(w, new.dequantize(w.shape[-1]))
    assert bool((e_new <= e_max + 1e-12).all())
    assert float(e_new.sum()) < 0.9 * float(e_max.sum())
    assert not torch.equal(new.weight_scale.view(torch.uint8), formats.nvfp4_block_scales(w, ws2).view(torch.uint8))


def test_four_over_six_picks_only_the_scale_to_6_or_to_4():
    w = _weight()
    ws2 = formats.nvfp4_global_scale(w.float().abs().amax())
    codes = ws.nvfp4_search_scales(w, ws2, "four-over-six").float()
    amax = ws._blocks(w.float()).abs().amax(-1)
    to6 = (amax / (6 * ws2)).clamp(formats.E4M3_MIN_SCALE, 448).to(torch.float8_e4m3fn).float()
    to4 = (amax / (4 * ws2)).clamp(formats.E4M3_MIN_SCALE, 448).to(torch.float8_e4m3fn).float()
    assert bool(((codes == to6) | (codes == to4)).all()) and bool((codes == to4).any())


def test_local_hessian_weights_the_error_by_the_inputs():
    w = _weight()
    x = _inputs()
    hb = ws.block_hessians(x.T @ x / x.shape[0])
    ws2 = formats.nvfp4_global_scale(w.float().abs().amax())
    lh = ws.nvfp4_weight(w, ws2, "local-hessian", hb).dequantize(128)
    mse = ws.nvfp4_weight(w, ws2, "mse").dequantize(128)
    # per block, local-hessian is optimal for its own (input-weighted) error among the same candidates
    assert bool((_block_err(w, lh, hb) <= _block_err(w, mse, hb) + 1e-9).all())
    assert float(_block_err(w, lh, hb).sum()) < float(_block_err(w, mse, hb).sum())
    # with an identity Hessian it is the plain mse search
    eye = torch.eye(16).expand(8, 16, 16)
    assert torch.equal(ws.nvfp4_search_scales(w, ws2, "local-hessian", eye).view(torch.uint8),
                       ws.nvfp4_search_scales(w, ws2, "mse").view(torch.uint8))
    with pytest.raises(ValueError):
        ws.nvfp4_search_scales(w, ws2, "local-hessian")


def test_fp8_search_scale():
    w = _weight()
    base = formats.fp8_quantize(w)
    s = ws.fp8_search_scale(w, "mse")
    err = lambda q: float((q.dequantize() - w.float()).square().sum())  # noqa: E731
    assert err(formats.fp8_quantize(w, s)) <= err(base)
    assert float(s) <= float(base.weight_scale)
    assert ws.fp8_search_scale(w, "max") == base.weight_scale


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = _weight()
    ws2 = formats.nvfp4_global_scale(w.float().abs().amax())
    r = gptq.gptq(w, torch.eye(128), "nvfp4", weight_scale_2=ws2, scales="max")
    assert torch.equal(r.dequantized(), formats.nvfp4_fake_quant_weight(w, ws2))
    f = gptq.gptq(w, torch.eye(128), "fp8", scales="max")
    assert torch.equal(f.dequantized(), formats.fp8_fake_quant_weight(w.float()))   # fp32 quotient (ModelOpt: bf16)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_gptq_lowers_the_output_error_and_packs_to_what_it_computed(fmt):
    w = _weight()
    x = _inputs()
    h = x.T @ x / x.shape[0]
    r = gptq.gptq(w, h, fmt, block_size=32)
    rtn = formats.nvfp4_fake_quant_weight(w) if fmt == "nvfp4" else formats.fp8_fake_quant_weight(w)
    out_err = lambda q: float((x @ (q - w.float()).T).square().mean())  # noqa: E731
    assert out_err(r.dequantized()) < 0.8 * out_err(rtn)
    # the values GPTQ hands to the packer give back exactly the weights it computed with
    if fmt == "nvfp4":
        packed = ws.nvfp4_pack(r.values, r.weight_scale, r.weight_scale_2).dequantize(128)
    else:
        packed = formats.fp8_quantize(r.values, r.weight_scale).dequantize()
    assert torch.equal(packed, r.dequantized())


def test_gptq_batched_equals_one_by_one():
    ws_ = torch.stack([_weight(seed=s).float() for s in range(3)])
    hs = torch.stack([(lambda x: x.T @ x / x.shape[0])(_inputs(seed=s)) for s in range(3)])
    batched = gptq.gptq(ws_, hs, "nvfp4")
    for k in range(3):
        one = gptq.gptq(ws_[k], hs[k], "nvfp4")
        assert torch.equal(one.dequantized(), batched.dequantized()[k])


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    """U (from J H J's Cholesky and a triangular inverse) is upper triangular with a positive diagonal and
    U^T U = (H + damping * mean(diag H) * I)^-1, dead input channels given diag 1; 300 inputs: halves that
    are not whole leaves of `_lower_inverse`."""
    x = _inputs(inp=300, n=200)
    x[:, 7] = 0.0
    h = x.T @ x / x.shape[0]
    u = gptq._inverse_cholesky(h, 0.01).double()
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    hd = h.double()
    hd[7, 7] = 1.0
    hd += 0.01 * hd.diagonal().mean() * torch.eye(300, dtype=torch.float64)
    assert float((u.T @ u @ hd - torch.eye(300, dtype=torch.float64)).abs().max()) < 1e-3


def test_lower_inverse_by_halves_inverts():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(517, 517, generator=g, dtype=torch.float64).tril() + 30 * torch.eye(517, dtype=torch.float64)
    inv = gptq._lower_inverse(low, leaf=64)
    assert torch.equal(inv, inv.tril())
    assert float((inv @ low - torch.eye(517, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("scales", ["mse", "max"])
def test_group_codes_are_the_block_scale_search(scales):
    """GPTQ's per-group choice on the transposed group gives the codes `weight_search` chooses for the same
    16 columns."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 200, 16, generator=g) * 0.02 * torch.rand(3, 200, 1, generator=g) ** 3
    ws2 = formats.nvfp4_global_scale(1.0) * w.abs().amax(dim=(-2, -1))
    codes = gptq._group_codes(w.transpose(-1, -2).contiguous(), ws2.reshape(3, 1, 1), scales)
    for b in range(3):
        want = ws.nvfp4_search_scales(w[b], ws2[b], scales)[:, 0]
        assert torch.equal(codes[b].view(torch.uint8), want.view(torch.uint8))


def test_gptq_refuses_bad_block_size():
    with pytest.raises(ValueError, match="multiple"):
        gptq.gptq(_weight(), torch.eye(128), "nvfp4", block_size=24)


# ----- recipes ------------------------------------------------------------------------------------------
def _parse(**kw):
    return recipes.parse(dict({"name": "t", "default": "nvfp4"}, **kw), "t")


def test_recipe_algorithms_parse_and_apply_per_rule(tiny_dir):
    from omniq.model.checkpoint import open_checkpoint

    r = _parse(algorithm="mse", rules=[
        {"select": ["routed_experts"], "format": "nvfp4",
         "algorithm": {"name": "gptq", "damping": 0.05, "block_size": 64, "min_tokens": 10}},
        {"select": ["attention"], "format": "fp8", "algorithm": "local-hessian"},
        {"select": ["mamba_feeding_attention"], "format": "bf16"}])
    arch = open_checkpoint(str(tiny_dir)).arch
    by_role = {lin.role: r.algorithm_of(lin, arch) for lin in arch.linears}
    assert by_role["expert_up"] == recipes.Algorithm("gptq", 0.05, 64, 10)
    assert by_role["attn_q"].name == "local-hessian" and by_role["shared_up"].name == "mse"
    assert by_role["lm_head"].name == "max"
    feeding = [lin for lin in arch.linears if lin.layer in arch.mamba_feeding_attention]
    assert all(r.algorithm_of(lin, arch).name == "max" for lin in feeding)      # bf16 layers: nothing to do
    d = r.as_dict()
    assert d["algorithm"] == "mse" and d["rules"][0]["algorithm"]["damping"] == 0.05
    assert recipes.parse(d, "again").as_dict() == d
    assert "algorithm" not in recipes.load("nvfp4").as_dict()                      # max: as before


@pytest.mark.parametrize("kw, message", [
    ({"algorithm": "awq"}, "algorithm 'awq' is unknown"),
    ({"default": "fp8", "algorithm": "four-over-six"}, "four-over-six does not apply to fp8"),
    ({"rules": [{"select": ["attention"], "format": "bf16", "algorithm": "gptq"}]}, "gptq does not apply to bf16"),
    ({"algorithm": {"name": "mse", "damping": 0.1}}, "takes no damping"),
    ({"algorithm": {"name": "gptq", "block_size": 24}}, "multiple of 16"),
    ({"algorithm": {"name": "gptq", "damping": 0}}, "damping"),
    ({"algorithm": {"damping": 0.1}}, "mapping with name"),
])
def test_recipe_algorithm_errors(kw, message):
    with pytest.raises(OmniqError, match=message):
        _parse(**kw)


def test_layer_by_layer_hook_reads_one_layer_and_matches_the_whole_model_run(tiny_dir):
    """The streamed quantize's hook (`LayerByLayer.exported_layer`): each call reads only its own layer's
    source tensors, puts the calibrated weight and weight_scale in place of the exported ones, and gives
    exactly what `calibrate_weights` gives over the model held whole (the same arithmetic, one layer held)."""
    from omniq.model.checkpoint import open_checkpoint
    from omniq.quant.weight_calibration import LayerByLayer, calibrate_weights

    ckpt = open_checkpoint(str(tiny_dir))
    arch = ckpt.arch
    source = ckpt.read()
    names = [lin.name for lin in arch.linears if lin.layer is not None]
    algos = {n: recipes.Algorithm("gptq" if k % 3 == 0 else "local-hessian" if k % 3 == 1 else "mse")
             for k, n in enumerate(names)}
    fmts = {n: "nvfp4" for n in names}
    ws2 = {n: formats.nvfp4_global_scale(source[f"{n}.weight"].float().abs().amax()) for n in names}
    rows = torch.randint(0, arch.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    whole = calibrate_weights(arch, source, rows, fmts, algos, ws2)

    emb = f"{arch.prefix}backbone.embeddings.weight"
    cal = LayerByLayer(arch, rows, fmts, algos, source[emb], keep_weights=False)   # as quantize runs it
    read: list[str] = []
    hook = cal.exported_layer(lambda n: read.append(n) or source[n])
    for i in range(arch.num_layers):
        read.clear()
        mine = [lin.name for lin in arch.linears if lin.layer == i]
        exported = {f"{n}.{leaf}": torch.zeros(1) for n in mine for leaf in ("weight", "weight_scale")}
        exported.update({f"{n}.weight_scale_2": ws2[n] for n in mine})
        out = hook(i, exported)
        assert read and all(n.startswith(f"{arch.layer_prefix(i)}.") for n in read)
        for n in mine:
            want = whole.weights[n].tensors()
            for leaf in ("weight", "weight_scale"):
                got = out[f"{n}.{leaf}"]
                assert got.dtype == want[f"{n}.{leaf}"].dtype
                assert torch.equal(got.view(torch.uint8), want[f"{n}.{leaf}"].view(torch.uint8)), (n, leaf)
    assert cal.result.stats_bytes == whole.stats_bytes > 0
    assert cal.result.weights == {}          # no layer's float32 weights outlive its step
    with pytest.raises(ValueError, match="expects layer"):
        hook(0, {})
