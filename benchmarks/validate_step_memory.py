"""Anonymous memory of the layer-streamed validate after each step, with and without returning freed pages.

    python benchmarks/validate_step_memory.py REFERENCE CANDIDATE [--samples 2 --seq-len 128] [--no-give-back]
                                              [--reference-cache DIR] [--no-lazy-trim]

Runs `omniq.validate.stream.run` (three streams) in this process on the bundled `eval` rows and prints, after
the embedding step, every decoder layer and the head, the process's RssAnon (/proc/self/status) and the time
so far; with --no-give-back, `omniq.heap.give_back` is replaced by a no-op (glibc then keeps freed pages).
Also each step's peak resident memory (VmHWM, reset after every step through /proc/self/clear_refs), which
is what a cgroup limit meets inside a step. `--reference-cache DIR`: run with that cache (once to fill it,
then once hitting it, each printed); `--no-lazy-trim`: the matrix-by-matrix layers do not give pages back
between reads (`artifact.LAZY_TRIM_EVERY`), to show what that costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def anon_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 2**20
    return 0.0


def step_peak_gib() -> float:
    """VmHWM since the last call (the kernel's high-water mark, reset after reading)."""
    peak = 0.0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            peak = int(line.split()[1]) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-give-back", action="store_true")
    ap.add_argument("--reference-cache", type=Path)
    ap.add_argument("--no-lazy-trim", action="store_true")
    a = ap.parse_args(argv)
    import torch

    from omniq.validate import artifact, reference_cache, stream
    from omniq.validate.artifact import read_artifact
    from omniq.validate.run import eval_texts, text_items, token_rows

    torch.set_num_threads(1)
    if a.no_give_back:
        stream.give_back = lambda *args, **kw: None
    if a.no_give_back or a.no_lazy_trim:
        artifact.give_back = lambda *args, **kw: None
    ref, cand = read_artifact(a.reference), read_artifact(a.candidate)
    rows = token_rows(ref.tokenizer, eval_texts("eval")[1], a.samples, a.seq_len)
    t = time.perf_counter()

    def progress(done, steps):
        print(f"step {done}/{steps}: anonymous {anon_gib():.2f} GiB, peak in the step {step_peak_gib():.2f} GiB, "
              f"{time.perf_counter() - t:.0f} s", flush=True)

    print(f"estimate {stream.estimate_bytes(ref, cand, rows.shape[0] * (rows.shape[1] - 1))['total_bytes'] / 2**30:.2f} GiB; "
          f"give_back {'off' if a.no_give_back else 'on'}, lazy layers' trim "
          f"{'off' if a.no_give_back or a.no_lazy_trim else f'every {artifact.LAZY_TRIM_EVERY} reads'}")
    step_peak_gib()
    for run in (("fill", "hit") if a.reference_cache else ("plain",)):
        items = text_items(rows)
        entry = (reference_cache.open_entry(a.reference_cache, ref, items, noise_floor=True, device="cpu")
                 if a.reference_cache else None)
        print(f"{run}{'' if entry is None else f' (reference cache hit: {entry.hit})'}:", flush=True)
        t = time.perf_counter()
        stream.run(ref, cand, items, progress=progress, cache=entry).summary()


if __name__ == "__main__":
    main()
