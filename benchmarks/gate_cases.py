"""Honest and deliberately broken artifacts against this run's noise floor: the figures behind the
per-format multipliers and the per-layer SQNR gate of `omniq.validate.gates`.

    python benchmarks/gate_cases.py ART_DIR [--reference tiny] [--samples 16 --seq-len 256] [--json out.json]

ART_DIR holds ModelOpt exports of the reference named fp8, nvfp4, mixed, fp8-kv, nvfp4-kv (any subset; made
with `tests/validate/make_artifacts.py omniq/bundled/tiny ART_DIR fp8 nvfp4 mixed fp8-kv nvfp4-kv`). The
broken cases of `tests/validate/broken_cases.py` are made from them in a temporary directory. For every
case it prints, next to the noise floor measured on the same rows (`artifact.bf16_compute_hooks`): mean KL
and its ratio to the floor's, top-1 disagreement and its ratio, perplexity excess, the lowest per-layer
weight SQNR with its module, and the verdict of the default gates (`gates.from_floor` + the layer gate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "validate"))

import broken_cases  # noqa: E402
from omniq.errors import OmniqError  # noqa: E402
from omniq.model import forward  # noqa: E402
from omniq.validate import gates  # noqa: E402
from omniq.validate.artifact import bf16_compute_hooks, read_artifact  # noqa: E402
from omniq.validate.metrics import Comparison, layers_sqnr  # noqa: E402
from omniq.validate.run import BATCH_ROWS, eval_texts, token_rows  # noqa: E402

HONEST = ("fp8", "fp8-kv", "nvfp4", "nvfp4-kv", "mixed")
BROKEN = (("fp8", "scales-x4"), ("nvfp4", "scales-x4"), ("fp8", "experts-swapped"), ("nvfp4", "experts-swapped"),
          ("mixed", "experts-swapped"), ("fp8", "expert-transposed"), ("nvfp4", "expert-zeroed"),
          ("mixed", "expert-zeroed"), ("fp8-kv", "kv-scale-x8"), ("nvfp4-kv", "kv-scale-x8"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--reference", default="tiny")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", default="eval")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    ref = read_artifact(args.reference)
    tmp = Path(tempfile.mkdtemp(prefix="gate-cases-"))
    cases: dict[str, Path] = {n: args.artifacts / n for n in HONEST if (args.artifacts / n).is_dir()}
    for base, case in BROKEN:
        if base in cases:
            cases[f"{base} {case}"] = broken_cases.make(cases[base], tmp / f"{base}-{case}", case)
    arts, refused = {}, {}
    for name, p in cases.items():
        try:
            arts[name] = read_artifact(p)
        except OmniqError as e:          # exit 2: e.g. a transposed matrix of a non-square model
            refused[name] = str(e)
    _, docs = eval_texts(args.eval)
    rows = token_rows(ref.tokenizer, docs, args.samples, args.seq_len)
    floor_cmp, cmp = Comparison(), {n: Comparison() for n in arts}
    kv_amax = {n: {} for n in arts}
    kv_hooks = {n: a.kv() and gates.recording_kv(a.kv(), kv_amax[n]) for n, a in arts.items()}
    lin_f, kv_f = bf16_compute_hooks(ref.weights)
    with torch.inference_mode():
        for start in range(0, rows.shape[0], BATCH_ROWS):
            batch = rows[start: start + BATCH_ROWS]
            x, y = batch[:, :-1], batch[:, 1:]
            r = forward.logits(ref.arch, ref.weights, x)
            floor_cmp.add(r, forward.logits(ref.arch, ref.weights, x, linear=lin_f, kv=kv_f), y)
            for n, a in arts.items():
                cmp[n].add(r, forward.logits(a.arch, a.weights, x, linear=a.linear(), kv=kv_hooks[n]), y)
    floor = floor_cmp.summary()
    out = {"floor": floor, "cases": {}}
    print(f"noise floor ({floor['tokens']} tokens of {args.eval}): KL {floor['kl_mean']:.3e}  top-1 "
          f"{100 * floor['top1_agreement']:.2f} %  ppl ratio {floor['ppl_ratio']:.5f}")
    print(f"{'case':28s} {'KL':>9s} {'xfloor':>7s} {'top-1':>7s} {'xfloor':>7s} {'ppl-1':>8s} "
          f"{'min SQNR':>8s}  {'verdict':8s} worst layer / failure")
    d0 = max(1 - floor["top1_agreement"], 1e-9)
    for n, a in arts.items():
        m = cmp[n].summary()
        sq = layers_sqnr(ref.weights, a.weights, sorted(a.quantized))
        worst = min(sq, key=sq.get)
        g = gates.from_floor(floor, gates.gate_format(a), None)
        failures = (gates.check(m, g) + gates.check_layers(sq, {k: v.weight_format for k, v in a.quantized.items()}, g)
                    + gates.check_kv(kv_amax[n], a.kv_scales))
        out["cases"][n] = {**m, "min_sqnr_db": sq[worst], "worst": worst, "gates": g.as_dict(), "failures": failures}
        print(f"{n:28s} {m['kl_mean']:9.3e} {m['kl_mean'] / floor['kl_mean']:7.1f} "
              f"{100 * m['top1_agreement']:6.2f}% {(1 - m['top1_agreement']) / d0:7.1f} {m['ppl_ratio'] - 1:8.4f} "
              f"{sq[worst] if math.isfinite(sq[worst]) else float('inf'):8.1f}  {'FAIL' if failures else 'pass':8s} "
              f"{failures[0] if failures else worst}")
    for n, why in refused.items():
        out["cases"][n] = {"refused": why}
        print(f"{n:28s} refused (exit 2): {why}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
