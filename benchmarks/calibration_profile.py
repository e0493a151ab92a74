"""Where the streamed quantize's calibration time goes, layer by layer, on a real-width checkpoint.

    python benchmarks/calibration_profile.py /work/scratch/rw5 [--recipe fp8] [--layers 0,1]
        [--samples 16 --seq-len 128] [--profile] [--rows 20] [--weight-amax-every-batch] [--finite-ab]

Runs the streamed quantize's own steps (`omniq.export.streamed`: skeleton, every block's inputs, then per
layer `materialize` and `calibrate_layer` with the expert-coverage hooks of `--expert-calibration all`) on
the chosen decoder layers only (a later layer gets the hidden states the earlier chosen ones produced, so
`--layers 1` alone runs layer 1 on the embedding output: fine for timing, not for numbers) and prints, per
layer: seconds to read it from the shards, seconds to calibrate it, the matmul FLOPs the calibration did
(`quantize_scale.calibration_flops`' count for that layer, plus the forced expert tokens of the coverage
hooks) and the achieved rate, by wall clock and by this process's CPU time. `--profile`: torch.profiler's
operator table of each calibration (self CPU time), `--rows` lines of it. `--weight-amax-every-batch`: ModelOpt's
own behaviour (every weight quantizer collects its weight again in every forward; `calibrate_layer`'s
`weight_amax_once=False`), for an A / B against the default. `--finite-ab`: after reading a layer, the
load-time NaN / inf check of its floating tensors timed both ways (`streamed._all_finite`'s aminmax pass,
and the blockwise `torch.isfinite(...).all()` it replaced). One thread (torch.set_num_threads(1)), like the
quantize child of benchmarks/quantize_scale.py. Timing on a shared machine is noisy; the load average is
printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_flops(arch, layer: int, tokens: int, forced: int = 0) -> float:
    """Matmul FLOPs of decoder layer `layer`'s linears over `tokens` tokens (routed experts top-k per token),
    plus `forced` extra expert-token passes (one up and one down projection each) of the coverage hooks."""
    per_token = 0.0
    expert_pass = 0.0
    for lin in arch.linears:
        if lin.layer != layer:
            continue
        macs = lin.in_features * lin.out_features
        if lin.expert is not None:
            per_token += 2 * macs * arch.num_experts_per_tok / arch.n_routed_experts
            expert_pass += 2 * macs / arch.n_routed_experts
        else:
            per_token += 2 * macs
    return per_token * tokens + expert_pass * forced


def finite_ab(block) -> None:
    """Time the NaN / inf check of `block`'s floating tensors: omniq's aminmax pass vs blockwise isfinite."""
    import torch

    from omniq.export.streamed import _all_finite

    def blockwise_isfinite(t, chunk_elements: int = 1 << 24) -> bool:
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        step = max(1, chunk_elements // max(rows.shape[1], 1))
        return all(bool(torch.isfinite(rows[a:a + step]).all()) for a in range(0, rows.shape[0], step))

    tensors = [t for t in list(block.parameters()) + list(block.buffers()) if t.is_floating_point()]
    times = {}
    for name, check in (("aminmax", _all_finite), ("isfinite", blockwise_isfinite),
                        ("aminmax again", _all_finite)):
        t, c = time.perf_counter(), time.process_time()
        assert all(check(x) for x in tensors)
        times[name] = (time.perf_counter() - t, time.process_time() - c)
    print("finite check of the layer: " + ", ".join(f"{n} {w:.2f} s ({c:.2f} CPU s)" for n, (w, c) in times.items()),
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", default="fp8")
    ap.add_argument("--layers", default="0,1")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--weight-amax-every-batch", action="store_true")
    ap.add_argument("--finite-ab", action="store_true")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from omniq.calib import data as calib_data
    from omniq.calib.experts import ExpertCoverage, ExpertPolicy
    from omniq.commands.quantize import open_source, resolve_recipe
    from omniq.export import streamed
    from omniq.model import names
    from omniq.model.checkpoint import TensorReader
    from omniq.quant import calibrate as cal
    from omniq.quant.modelopt_config import enabled_quantizers, modelopt_config
    from omniq.quant.plan import make_plan

    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}", flush=True)
    ckpt = open_source(a.checkpoint)
    plan = make_plan(ckpt.arch, resolve_recipe(a.recipe, None))
    config, enabled = modelopt_config(plan), enabled_quantizers(plan)
    rows = calib_data.load("tiny-calib", ckpt.tokenizer, samples=a.samples, seq_len=a.seq_len).rows
    batches = [rows[i:i + cal.BATCH_SIZE] for i in range(0, rows.shape[0], cal.BATCH_SIZE)]
    model = streamed.build_skeleton(ckpt)
    streamed.register_modelopt_plugins(model)
    source = TensorReader(ckpt)
    streamed.materialize(model.model.embeddings, names.NATIVE_EMBEDDINGS, source)
    hidden, kwargs = [], []
    for b in batches:
        h, kw = streamed.block_inputs(model, b)
        hidden.append(h)
        kwargs.append(kw)
    streamed.release(model.model.embeddings)
    coverage = ExpertCoverage(ExpertPolicy(), ckpt.arch)
    tokens = rows.numel()
    with coverage.installed(model):
        for i in [int(x) for x in a.layers.split(",")]:
            block = model.model.layers[i]
            t = time.perf_counter()
            n = streamed.materialize(block, names.native_layer(i), source)
            read_s = time.perf_counter() - t
            if a.finite_ab:
                finite_ab(block)
            before = sum(coverage.layers[i].forced) if i in coverage.layers else 0
            prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    if a.profile else contextlib.nullcontext())
            t, c = time.perf_counter(), time.process_time()
            with prof:
                shell = streamed.calibrate_layer(model, i, config, hidden, kwargs, enabled=enabled,
                                                 weight_amax_once=not a.weight_amax_every_batch)
            calib_s, calib_cpu = time.perf_counter() - t, time.process_time() - c
            forced = (sum(coverage.layers[i].forced) - before) if i in coverage.layers else 0
            flops = layer_flops(ckpt.arch, i, tokens, forced)
            print(f"layer {i} ({block.block_type}): read {n / 2**30:.2f} GiB in {read_s:.1f} s; calibrate "
                  f"{calib_s:.2f} s ({calib_cpu:.2f} CPU s), {flops / 1e9:.1f} GFLOP ({forced} forced expert "
                  f"tokens), {flops / calib_s / 1e9:.1f} GFLOP/s wall, {flops / calib_cpu / 1e9:.1f} per CPU s"
                  f"{' (weight amax every batch)' if a.weight_amax_every_batch else ''}; load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            if a.profile:
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows), flush=True)
            del shell
            streamed.release(block)
    source.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
