"""Residual rotation (omniq.quant.rotation) and BF16-parameter compensation (omniq.quant.compensation)."""

import pytest
import torch

from omniq.model import forward
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import compensation as comp
from omniq.quant import formats, rotation


@pytest.fixture(scope="module")
def tiny():
    from omniq.validate.artifact import read_artifact

    ref = read_artifact("tiny")
    return ref.arch, {n: ref.weights[n] for n in ref.base_names}


def _rotated(arch, w, seed=0):
    q = rotation.orthogonal(arch.hidden_size, seed)
    roles = rotation.roles(arch)
    wd = {k: t.double() for k, t in w.items()}
    return {k: rotation.rotate_tensor(k, t, q, roles.get(k), wd.__getitem__).float() for k, t in wd.items()}


@pytest.mark.parametrize("n", [256, 48])
def test_orthogonal_is_orthogonal(n):
    q = rotation.orthogonal(n, 3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, rotation.orthogonal(n, 4))       # the seed matters


def test_rotation_keeps_the_function_and_changes_what_is_quantized(tiny):
    arch, w = tiny
    rw = _rotated(arch, w)
    x = torch.randint(0, arch.vocab_size, (1, 48))
    a, b = forward.logits(arch, w, x), forward.logits(arch, rw, x)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    names = set(w)
    assert set(rw) == names and all(rw[n].shape == w[n].shape for n in names)
    # every pre-mixer norm is folded (ones) and in_proj's weight is no longer the original
    lp = arch.layer_prefix(0)
    assert torch.equal(rw[f"{lp}.norm.weight"], torch.ones_like(w[f"{lp}.norm.weight"]))
    assert not torch.allclose(rw[f"{lp}.mixer.in_proj.weight"], w[f"{lp}.mixer.in_proj.weight"])
    # Mamba's gated norm and conv are untouched
    assert torch.equal(rw[f"{lp}.mixer.norm.weight"], w[f"{lp}.mixer.norm.weight"])


def test_rotation_refuses_tied_embeddings(tiny):
    from dataclasses import replace

    arch, _ = tiny
    with pytest.raises(ValueError, match="untied"):
        rotation.check(replace(arch, tie_word_embeddings=True))


def test_tweakable_names_per_layer_kind():
    arch = open_checkpoint("tiny").arch
    mamba, moe = arch.kinds.index("M"), arch.kinds.index("E")
    assert comp.tweakable(arch, mamba, ("norm", "mixer-norm", "D")) == [
        f"{arch.layer_prefix(mamba)}.norm.weight", f"{arch.layer_prefix(mamba)}.mixer.norm.weight",
        f"{arch.layer_prefix(mamba)}.mixer.D"]
    assert comp.tweakable(arch, moe, ("norm", "mixer-norm")) == [f"{arch.layer_prefix(moe)}.norm.weight"]
    with pytest.raises(ValueError, match="unknown"):
        comp.tweakable(arch, mamba, ("bogus",))


def test_fit_layer_lowers_the_quantized_layers_error(tiny):
    """Layer 0 (Mamba) with NVFP4 weights and inputs: fitting its norms brings its output closer to the
    reference's; the fitted tensors are BF16 of the original shapes; a fit that cannot help keeps nothing."""
    arch, w = tiny
    i = 0
    names = [n for n in w if arch.layer_index(n) == i]
    ref = {n: w[n] for n in names}
    quantized = dict(ref)
    quantizers = {}
    for lin in arch.linears:
        if lin.layer == i:
            wt = ref[f"{lin.name}.weight"]
            quantized[f"{lin.name}.weight"] = formats.nvfp4_fake_quant_weight(wt)
            quantizers[lin.name] = (lambda x: formats.nvfp4_fake_quant(x, torch.tensor(0.01)))
    g = torch.Generator().manual_seed(0)
    xs = [forward.embed(arch, w, torch.randint(0, arch.vocab_size, (2, 64), generator=g))]
    with torch.no_grad():
        targets = [forward.decoder_layer(arch, ref, i, x) for x in xs]
    fitted, rec = comp.fit_layer(arch, i, quantized, xs, targets, quantizers,
                                 comp.tweakable(arch, i, ("norm", "mixer-norm")), steps=30, lr=3e-3)
    assert rec.kept and rec.loss_after < 0.99 * rec.loss_before
    assert set(fitted) == set(rec.names)
    assert all(t.dtype == torch.bfloat16 and t.shape == ref[n].shape for n, t in fitted.items())
    _, none = comp.fit_layer(arch, i, quantized, xs, targets, quantizers, rec.names, steps=0, lr=1e-3)
    assert not none.kept and none.loss_after == none.loss_before


def test_recipe_compensation_parses_and_round_trips():
    from omniq.errors import OmniqError
    from omniq.quant import recipe as recipes

    r = recipes.parse({"name": "x", "default": "nvfp4", "compensation": "norm-tweak"}, "t")
    assert r.compensation == recipes.Compensation("norm-tweak")
    assert recipes.parse(r.as_dict(), "t").compensation == r.compensation
    assert recipes.parse({"name": "x", "default": "nvfp4"}, "t").compensation.name == "none"
    assert set(recipes.COMPENSATION_PARAMS) == set(comp.KINDS)
    with pytest.raises(OmniqError, match="needs quantized layers"):
        recipes.parse({"name": "x", "default": "bf16", "compensation": "norm-tweak"}, "t")
    with pytest.raises(OmniqError, match="lr"):
        recipes.parse({"name": "x", "default": "nvfp4", "compensation": {"name": "norm-tweak", "lr": 0}}, "t")


def test_distill_weights_starts_at_max_and_lowers_the_kl(tiny):
    """Quantization-aware distillation of every linear of layers 0-1 (NVFP4 weights and inputs): its starting
    KL is that of max calibration's weights; a few steps lower it and return float32 weights of the original
    shapes that differ from the reference's; zero steps keep the reference's weights, bit for bit."""
    from omniq.quant.weight_calibration import fake_quant

    arch, w = tiny
    lins = [lin.name for lin in arch.linears if lin.layer in (0, 1)]
    quantized = {m: ("nvfp4", None) for m in lins}
    quantizers = {m: (lambda x: formats.nvfp4_fake_quant(x, torch.tensor(0.01))) for m in lins}
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, arch.vocab_size, (2, 32), generator=g)]
    with torch.no_grad():
        ref_logp = [torch.log_softmax(forward.logits(arch, w, x), -1) for x in rows]
    maxed = {f"{m}.weight": fake_quant(w[f"{m}.weight"], "nvfp4") for m in lins}
    max_kl = comp._model_kl(arch, w, rows, ref_logp, quantizers, lambda: maxed, False)
    assert max_kl > 0
    res = comp.distill_weights(arch, w, quantized, rows, ref_logp, quantizers, steps=6, lr=3e-3)
    assert res.fit.loss_before == pytest.approx(max_kl, rel=1e-6)
    assert res.fit.kept and res.fit.loss_after < 0.95 * res.fit.loss_before
    assert set(res.latent) == set(maxed) and res.norms == {}
    assert all(t.dtype == torch.float32 and t.shape == w[n].shape for n, t in res.latent.items())
    assert any(not torch.equal(t, w[n].float()) for n, t in res.latent.items())
    none = comp.distill_weights(arch, w, quantized, rows, ref_logp, quantizers, steps=0, lr=3e-3)
    assert not none.fit.kept and none.fit.loss_after == none.fit.loss_before
    assert all(torch.equal(t, w[n].float()) for n, t in none.latent.items())
