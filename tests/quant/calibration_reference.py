"""The whole-model reference for a streamed quantize with weight calibration: `calibrate_weights` over the
bundled model from the same calibration rows and the artifact's exported global and input scales."""

from types import SimpleNamespace

import torch

from omniq.calib import data as calib_data
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan
from omniq.quant.weight_calibration import calibrate_weights


def check_against_whole_model(artifact, tiny_dir, recipe_path, *, samples: int, seq_len: int,
                              seed: int) -> SimpleNamespace:
    """Assert every calibrated tensor in `artifact` is bit for bit the whole-model run's; return what was
    compared (`seen`: the (algorithm, format) pairs) and the pieces it was computed from."""
    got = open_checkpoint(str(artifact)).read()           # every tensor as stored
    ckpt = open_checkpoint(str(tiny_dir))
    rec = recipes.load(str(recipe_path))
    plan = make_plan(ckpt.arch, rec)
    algos = {lin.name: rec.algorithm_of(lin, ckpt.arch) for lin in plan.quantized}
    rows = calib_data.load(calib_data.default_for(ckpt.path), ckpt.tokenizer, samples=samples, seq_len=seq_len,
                           seed=seed).rows
    scales = {n[: -len(".weight_scale_2")]: t for n, t in got.items() if n.endswith(".weight_scale_2")}
    inputs = {n[: -len(".input_scale")]: t for n, t in got.items() if n.endswith(".input_scale")}
    source = ckpt.read()
    whole = calibrate_weights(ckpt.arch, source, rows, plan.formats, algos, scales, input_scales=inputs)
    seen = set()
    for cw in whole.weights.values():
        for tname, t in cw.tensors().items():
            assert torch.equal(got[tname].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), tname
        seen.add((cw.algorithm, cw.fmt))
    return SimpleNamespace(seen=seen, got=got, ckpt=ckpt, plan=plan, algos=algos, rows=rows, scales=scales,
                           inputs=inputs, source=source, whole=whole)
