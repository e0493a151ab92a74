"""Measure the figures behind `omniq validate`'s default gates on the bundled model.

    python benchmarks/validate_figures.py ART_DIR [--samples 64 --seq-len 256] [--json out.json]

ART_DIR holds ModelOpt exports of the bundled model named fp8, fp8-kv, nvfp4, nvfp4-kv (made with
`tests/validate/make_artifacts.py omniq/bundled/tiny ART_DIR fp8 fp8-kv nvfp4 nvfp4-kv`, or by
`omniq quantize`). For each evaluation set (`eval` and `eval2`, disjoint) it reports, against the float32
forward of the BF16 reference:

  noise floor   the same BF16 weights run as a BF16 engine runs them: every linear layer's input, weight and
                output rounded to bfloat16 (fp32 accumulation) and K / V kept in bfloat16;
  fp8, fp8-kv, nvfp4, nvfp4-kv   the artifacts read from their files (`omniq.validate.artifact`).

The reference's logits are computed once per batch and shared by all candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omniq.model import forward  # noqa: E402
from omniq.validate.artifact import bf16_compute_hooks, read_artifact  # noqa: E402
from omniq.validate.metrics import Comparison  # noqa: E402
from omniq.validate.run import BATCH_ROWS, eval_texts, token_rows  # noqa: E402

CANDIDATES = ("fp8", "fp8-kv", "nvfp4", "nvfp4-kv")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--reference", default="tiny")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sets", default="eval,eval2")
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help="artifact directory names under ART_DIR to compare (benchmarks/figures.py adds mixed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    ref = read_artifact(args.reference)
    cands = {"noise floor": (ref, bf16_compute_hooks(ref.weights))}
    for name in args.candidates.split(","):
        if (args.artifacts / name).is_dir():
            art = read_artifact(args.artifacts / name)
            cands[name] = (art, (art.linear(), art.kv()))
    results: dict = {}
    for eval_set in args.sets.split(","):
        _, docs = eval_texts(eval_set)
        rows = token_rows(ref.tokenizer, docs, args.samples, args.seq_len)
        cmp = {name: Comparison() for name in cands}
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, rows.shape[0], BATCH_ROWS):
                batch = rows[start: start + BATCH_ROWS]
                x, y = batch[:, :-1], batch[:, 1:]
                ref_logits = forward.logits(ref.arch, ref.weights, x)
                for name, (art, (linear, kv)) in cands.items():
                    cmp[name].add(ref_logits, forward.logits(art.arch, art.weights, x, linear=linear, kv=kv), y)
        results[eval_set] = {name: c.summary() for name, c in cmp.items()}
        print(f"{eval_set}: {rows.numel() - rows.shape[0]} tokens in {time.perf_counter() - t0:.0f}s", flush=True)

    header = f"{'configuration':14s} " + " ".join(
        f"| {s + ' KL mean':>14s} {s + ' KL p95':>13s} {'top-1':>7s} {'ppl ratio':>9s}" for s in results)
    print(header)
    for name in cands:
        line = f"{name:14s} "
        for s in results:
            r = results[s][name]
            line += (f"| {r['kl_mean']:14.3e} {r['kl_p95']:13.3e} {100 * r['top1_agreement']:6.2f}% "
                     f"{r['ppl_ratio']:9.4f}")
        print(line)
    for s in results:
        print(f"{s}: reference perplexity {results[s]['fp8' if 'fp8' in results[s] else 'noise floor']['ppl_reference']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
