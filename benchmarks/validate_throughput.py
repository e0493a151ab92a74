"""How fast `omniq validate` evaluates, next to one plain forward pass of the reference.

    python benchmarks/validate_throughput.py CANDIDATE [--reference tiny] [--samples 16 --seq-len 256]
                                             [--threads N] [--json out.json]

Times, on the same token rows of the bundled `eval` text:
  reference forward   the float32 forward of the BF16 reference alone (the floor: what one forward costs);
  candidate forward   the candidate read from its files (dequantized weights, activations and KV cache
                      quantized in the hooks);
  validate            the whole evaluation `omniq validate` runs: both forwards plus the metrics.
Reading the checkpoints (done once per run) is reported apart.
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
from omniq.validate.artifact import read_artifact  # noqa: E402
from omniq.validate.run import BATCH_ROWS, compare, eval_texts, token_rows  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate")
    ap.add_argument("--reference", default="tiny")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_read = time.perf_counter()
    ref = read_artifact(args.reference)
    cand = read_artifact(args.candidate)
    t_read = time.perf_counter() - t_read
    rows = token_rows(ref.tokenizer, eval_texts("eval")[1], args.samples, args.seq_len)
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    linear, kv = cand.linear(), cand.kv()

    def over_batches(fn):
        def run():
            with torch.inference_mode():
                for s in range(0, rows.shape[0], BATCH_ROWS):
                    fn(rows[s: s + BATCH_ROWS, :-1])
        return run

    over_batches(lambda x: forward.logits(ref.arch, ref.weights, x))()          # warm-up
    t_ref = _timed(over_batches(lambda x: forward.logits(ref.arch, ref.weights, x)))
    t_cand = _timed(over_batches(lambda x: forward.logits(cand.arch, cand.weights, x, linear=linear, kv=kv)))
    t_val = _timed(lambda: compare(ref, cand, rows))
    result = {
        "candidate": str(cand.path), "format": cand.format, "kv_cache": cand.kv_cache, "tokens": tokens,
        "threads": torch.get_num_threads(), "read_seconds": round(t_read, 2),
        "reference_forward_tokens_per_s": round(tokens / t_ref, 1),
        "candidate_forward_tokens_per_s": round(tokens / t_cand, 1),
        "validate_tokens_per_s": round(tokens / t_val, 1),
        "validate_vs_one_forward": round(t_val / t_ref, 2),
    }
    print(f"{tokens} tokens ({rows.shape[0]} x {rows.shape[1] - 1}), {result['threads']} threads, "
          f"{cand.format}{' + FP8 KV' if cand.kv_cache else ''} candidate; reading both: {t_read:.1f}s")
    print(f"  reference forward  {result['reference_forward_tokens_per_s']:10.1f} tokens/s")
    print(f"  candidate forward  {result['candidate_forward_tokens_per_s']:10.1f} tokens/s")
    print(f"  validate           {result['validate_tokens_per_s']:10.1f} tokens/s "
          f"({result['validate_vs_one_forward']:.2f}x one reference forward)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
