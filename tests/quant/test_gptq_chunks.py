"""Routed experts under gptq / gptaq are calibrated a chunk of experts at a time (`LayerByLayer.layer`,
`memory.gptq_expert_chunk`): each chunk's statistics are recomputed from the layer's kept calibration inputs
by a forward that skips every expert outside the chunk. They are the statistics the one-pass recording of
every expert gives, and the chunk size does not change the weights."""

import torch

from omniq.model.checkpoint import open_checkpoint
from omniq.model import forward
from omniq.quant import memory, recipe as recipes, weight_calibration as wcal
from omniq.quant.plan import make_plan


def _moe_layer(tiny_dir):
    ckpt = open_checkpoint(str(tiny_dir))
    arch = ckpt.arch
    i = arch.kinds.index("E")
    return ckpt, arch, i, [lin for lin in arch.linears if lin.layer == i]


def test_chunk_statistics_are_the_one_pass_statistics(tiny_dir):
    ckpt, arch, i, lins = _moe_layer(tiny_dir)
    source = ckpt.read()
    weights = {n: source[n] for n in source if n.startswith(f"{arch.layer_prefix(i)}.")}
    xs = [torch.randn(2, 64, arch.hidden_size, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    # gptaq on the up projections (their inputs quantized as the engine does), gptq on the down ones
    want = {lin.name: "asymmetric" if lin.role == "expert_up" else "hessian" for lin in lins if lin.expert is not None}
    quantize = {n: wcal._input_quantizer("nvfp4", torch.tensor(0.01)) for n in want}
    whole = wcal._Recorder(weights, want, quantize)
    routes: dict = {}
    for x in xs:
        forward.decoder_layer(arch, weights, i, x, linear=whole, route_stats=routes)
    counts = routes[i].tolist()
    experts = sorted({lin.expert for lin in lins if lin.expert is not None})
    seen = set()
    for role in ("expert_up", "expert_down"):
        group = [lin for lin in lins if lin.role == role]
        for chunk in (group[k:k + 5] for k in range(0, len(group), 5)):
            names = {lin.name for lin in chunk}
            rec = wcal._Recorder(weights, want, quantize, record=names, skip=wcal._unneeded(lins, names))
            for x in xs:
                forward.decoder_layer(arch, weights, i, x, linear=rec)
            assert set(rec.stats) == {n for n in names if whole.tokens[n]}
            for lin in chunk:
                assert rec.tokens[lin.name] == whole.tokens[lin.name] == counts[lin.expert]
                if whole.tokens[lin.name]:
                    assert torch.equal(rec.stats[lin.name], whole.stats[lin.name]), lin.name
                if role == "expert_up" and whole.tokens[lin.name]:
                    assert torch.equal(rec.cross[lin.name], whole.cross[lin.name]), lin.name
                seen.add(lin.name)
    assert len(seen) == 2 * len(experts)
    # a chunk's forward reads none of the other experts' weights nor the shared expert's
    reads = []

    class Reading(dict):
        def __getitem__(self, k):
            reads.append(k)
            return dict.__getitem__(self, k)

    names = {lin.name for lin in lins if lin.role == "expert_down" and lin.expert in (0, 1)}
    rec = wcal._Recorder(Reading(weights), want, quantize, record=names, skip=wcal._unneeded(lins, names))
    forward.decoder_layer(arch, Reading(weights), i, xs[0], linear=rec)
    read_linears = {r[: -len(".weight")] for r in reads if r.endswith(".weight") and (".experts." in r or "shared" in r)}
    assert read_linears <= names | {n.replace("down_proj", "up_proj") for n in names}


def test_chunk_size_does_not_change_the_weights(tiny_dir, monkeypatch):
    """The whole-model run (`calibrate_weights`) with chunks of 16 experts (all of tiny's) and of 3: the same
    bytes, for gptq and gptaq (with act-order on the down projections); the fallbacks are the same."""
    from omniq.calib import data as calib_data

    ckpt = open_checkpoint(str(tiny_dir))
    rec = recipes.parse({"name": "t", "default": "nvfp4", "algorithm": "max", "rules": [
        {"select": ["expert_up"], "format": "nvfp4", "algorithm": {"name": "gptaq", "min_tokens": 70}},
        {"select": ["expert_down"], "format": "fp8", "algorithm": {"name": "gptq", "act_order": True,
                                                                      "min_tokens": 70}}]}, "t")
    plan = make_plan(ckpt.arch, rec)
    algos = {lin.name: rec.algorithm_of(lin, ckpt.arch) for lin in plan.quantized}
    rows = calib_data.load(calib_data.default_for(ckpt.path), ckpt.tokenizer, samples=4, seq_len=64, seed=0).rows
    source = ckpt.read()
    runs = []
    for chunk in (16, 3):
        monkeypatch.setattr(memory, "GPTQ_EXPERT_CHUNK", chunk)
        runs.append(wcal.calibrate_weights(ckpt.arch, source, rows, plan.formats, algos))
    a, b = runs
    assert a.fallbacks == b.fallbacks and 0 < len(a.fallbacks) < len(a.weights)
    assert {cw.algorithm for cw in a.weights.values()} == {"gptaq", "gptq", "mse"}
    assert a.weights.keys() == b.weights.keys()
    for name, cw in a.weights.items():
        for t, u in zip(cw.tensors().values(), b.weights[name].tensors().values()):
            assert torch.equal(t.reshape(-1).view(torch.uint8), u.reshape(-1).view(torch.uint8)), name
    assert b.stats_bytes < a.stats_bytes
