"""How fast `omniq validate` evaluates, next to one plain forward pass of the reference.

    python benchmarks/validate_throughput.py CANDIDATE [--reference tiny] [--samples 16 --seq-len 256]
                                             [--threads N] [--device cpu] [--repeat 3] [--json out.json]

Times, on the same token rows of the bundled `eval` text (best of --repeat runs each, interleaved, since a
shared machine's timings are noisy; wall-clock and the process's CPU time, which with one thread is the
figure another process's load disturbs least):
  reference forward   the float32 forward of the BF16 reference alone, whole model in memory, BATCH_ROWS rows
                      per batch as validate runs them (the floor: what one forward costs); also with all rows
                      in one batch (what layer-major evaluation could gain from larger matmuls);
  validate            the layer-streamed evaluation `omniq validate` runs (`omniq.validate.stream.run`:
                      reading each layer of both checkpoints from the shards, the reference, the noise floor
                      stream and the candidate, and the metrics), with and without the noise-floor stream;
                      and the same with `--reference-cache` hit (filled by one untimed run before: only the
                      candidate's stream runs through the layers, `omniq.validate.reference_cache`).
Prints tokens/s and the ratio validate / one reference forward (in throughput: 1.0 = as fast as one
forward; the goal of issue 12 is at least 0.5 with two streams), and the load average before and after.
`--breakdown`: one more run of the plain forward and of each validate, with the CPU seconds spent in each
part (mixer kind per stream's linear hook, the candidate's activation quantization, the weights'
dequantization, the logits scoring), to show where validate's time beyond one forward per stream goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omniq.model import forward  # noqa: E402
from omniq.validate import artifact, reference_cache, stream  # noqa: E402
from omniq.validate.artifact import read_artifact  # noqa: E402
from omniq.validate.run import BATCH_ROWS, eval_texts, text_items, token_rows  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def breakdown(runs: dict) -> dict:
    """{run: {part: CPU seconds}} of one call of each of `runs`, with omniq's functions wrapped in timers
    (the forward's mixers and lm_head keyed by the stream's linear hook; nested parts are inside them)."""
    parts: dict[str, float] = {}
    saved = []

    def timer(owner, name, key_of):
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        def timed(*a, **k):
            c = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                key = key_of(a)
                parts[key] = parts.get(key, 0.0) + time.process_time() - c
        setattr(owner, name, timed)

    def hook_name(a):
        hook = next((x for x in a if callable(x) and not isinstance(x, torch.Tensor)), None)
        return getattr(hook, "__qualname__", type(hook).__name__).split(".")[0]

    for name in ("moe", "mamba", "attention", "lm_head"):
        timer(forward, name, lambda a, n=name: f"{n} ({hook_name(a)})")
    timer(artifact.EngineLinear, "prepare", lambda a: "candidate activation quantization (inside the mixers)")
    timer(artifact.Artifact, "dequantize", lambda a: "weight dequantization")
    timer(stream, "compare_logits", lambda a: "logits scoring (float64)")
    out = {}
    try:
        for run, fn in runs.items():
            parts.clear()
            c = time.process_time()
            fn()
            out[run] = {"total": round(time.process_time() - c, 3),
                        **{k: round(v, 3) for k, v in sorted(parts.items())}}
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate")
    ap.add_argument("--reference", default="tiny")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--breakdown", action="store_true", help="CPU seconds per part, one more run of each")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t_read = time.perf_counter()
    ref = read_artifact(args.reference)
    cand = read_artifact(args.candidate)
    t_read = time.perf_counter() - t_read
    rows = token_rows(ref.tokenizer, eval_texts("eval")[1], args.samples, args.seq_len)
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    # the plain forward holds the whole reference in float32 on the device, read once (not timed)
    weights = {n: ref.weights[n].to(device) for n in ref.base_names}

    def plain(batch=BATCH_ROWS):
        with torch.inference_mode():
            for s in range(0, rows.shape[0], batch):
                forward.logits(ref.arch, weights, rows[s: s + batch, :-1].to(device))

    cache_dir = Path(tempfile.mkdtemp(prefix="omniq-reference-cache-"))

    def streamed(noise_floor, cached=False):
        def one():
            items = text_items(rows)
            entry = (reference_cache.open_entry(cache_dir, ref, items, noise_floor=noise_floor, device=device)
                     if cached else None)
            if cached and not entry.hit:
                raise RuntimeError("the reference cache was not hit")
            return stream.run(ref, cand, items, device=device, noise_floor=noise_floor, cache=entry).summary()
        return one

    def fill(noise_floor):          # one untimed run that stores the reference streams
        items = text_items(rows)
        entry = reference_cache.open_entry(cache_dir, ref, items, noise_floor=noise_floor, device=device)
        stream.run(ref, cand, items, device=device, noise_floor=noise_floor, cache=entry)

    runs = {"plain": plain, "plain_one_batch": lambda: plain(rows.shape[0]), "validate": streamed(True),
            "validate_no_floor": streamed(False), "validate_cached": streamed(True, True),
            "validate_no_floor_cached": streamed(False, True)}
    fill(True)
    fill(False)
    load_before = os.getloadavg()
    plain()                                                       # warm-up
    times = {k: [] for k in runs}
    for _ in range(args.repeat):
        for k, fn in runs.items():
            times[k].append(_timed(fn))
    best = {k: min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    result = {
        "candidate": str(cand.path), "format": cand.format, "kv_cache": cand.kv_cache, "tokens": tokens,
        "threads": torch.get_num_threads(), "device": str(device), "open_seconds": round(t_read, 2),
        "batch_rows": BATCH_ROWS,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "reference_forward_tokens_per_s": round(tokens / best["plain"], 1),
        "reference_forward_one_batch_tokens_per_s": round(tokens / best["plain_one_batch"], 1),
        "validate_tokens_per_s": round(tokens / best["validate"], 1),
        "validate_no_noise_floor_tokens_per_s": round(tokens / best["validate_no_floor"], 1),
        "validate_vs_one_forward": round(best["plain"] / best["validate"], 2),
        "validate_no_noise_floor_vs_one_forward": round(best["plain"] / best["validate_no_floor"], 2),
        "validate_reference_cached_tokens_per_s": round(tokens / best["validate_cached"], 1),
        "validate_reference_cached_vs_one_forward": round(best["plain"] / best["validate_cached"], 2),
        "validate_no_noise_floor_reference_cached_vs_one_forward":
            round(best["plain"] / best["validate_no_floor_cached"], 2),
        "cpu_validate_reference_cached_vs_one_forward": round(cpu["plain"] / cpu["validate_cached"], 2),
        "cpu_validate_vs_one_forward": round(cpu["plain"] / cpu["validate"], 2),
        "cpu_validate_no_noise_floor_vs_one_forward": round(cpu["plain"] / cpu["validate_no_floor"], 2),
        "seconds": {k: [round(w, 2) for w, _ in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(c, 2) for _, c in v] for k, v in times.items()},
    }
    print(f"{tokens} tokens ({rows.shape[0]} x {rows.shape[1] - 1}), {result['threads']} threads, {device}, "
          f"{cand.format}{' + FP8 KV' if cand.kv_cache else ''} candidate; opening both: {t_read:.1f}s; "
          f"best of {args.repeat}; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("                                        wall tokens/s   x one forward   (CPU time: x one forward)")
    print(f"  reference forward ({BATCH_ROWS} rows a batch)   {result['reference_forward_tokens_per_s']:10.1f}")
    print(f"  reference forward (all rows at once) {result['reference_forward_one_batch_tokens_per_s']:10.1f}"
          f"   {best['plain'] / best['plain_one_batch']:10.2f}        ({cpu['plain'] / cpu['plain_one_batch']:.2f})")
    print(f"  validate, 3 streams (+ noise floor)  {result['validate_tokens_per_s']:10.1f}"
          f"   {result['validate_vs_one_forward']:10.2f}        ({result['cpu_validate_vs_one_forward']:.2f})")
    print(f"  validate, 2 streams                  {result['validate_no_noise_floor_tokens_per_s']:10.1f}"
          f"   {result['validate_no_noise_floor_vs_one_forward']:10.2f}"
          f"        ({result['cpu_validate_no_noise_floor_vs_one_forward']:.2f})")
    for k, label in (("validate_cached", "validate, 3 streams, reference cached"),
                     ("validate_no_floor_cached", "validate, 2 streams, reference cached")):
        print(f"  {label:<37}{tokens / best[k]:10.1f}   {best['plain'] / best[k]:10.2f}"
              f"        ({cpu['plain'] / cpu[k]:.2f})")
    if args.breakdown:
        result["breakdown_cpu_seconds"] = breakdown({k: v for k, v in runs.items() if k != "plain_one_batch"})
        for run, parts in result["breakdown_cpu_seconds"].items():
            print(f"  {run}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    shutil.rmtree(cache_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
