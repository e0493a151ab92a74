"""norm-tweak's memory per decoder layer, measured beside `omniq.quant.memory.compensation_fit_bytes`.

    python scripts/make_realwidth.py --pattern ME /work/scratch/rwME
    python benchmarks/compensation_memory.py /work/scratch/rwME [--recipe benchmarks/recipes/nvfp4-norm-tweak.yaml]
        [--samples 8 --seq-len 128] [--json benchmarks/results/compensation_memory_rwME.json]

Runs omniq's weight calibration stream (`LayerByLayer`, as the layer-streamed quantize drives it: each layer's
tensors read from the shards on access, max weights, no ModelOpt) with the recipe's compensation on random
token rows (memory does not depend on the text), and around each layer's `compensation.fit_layer` samples
this process's anonymous RSS (RssAnon, every 0.02 s): `at_entry` (the fit's view of the layer, its inputs
and targets already made), `peak` during the fit, so `peak - at_entry` is the fit's own autograd and
transient memory, printed beside the predicted `autograd` term; `view_measured` is RssAnon at entry minus
RssAnon before `_compensate` began, less two row sets (the targets and the fit's copy of the inputs): the
view as built, beside the predicted `view` (glibc's freed heap pages kept while it is built show here:
compare a run with MALLOC_MMAP_THRESHOLD_=1048576, a fixed threshold that maps every block of 1 MiB or more
apart and unmaps it when freed; the JSON records the MALLOC_ variables). Also each layer's fit seconds (wall
and CPU) and loss before / after. One thread (`--threads`).

Results on rwME (8 x 128, 5 steps): benchmarks/results/compensation_memory_rwME.json and
compensation_memory_rwME_mmap1m.json (MALLOC_MMAP_THRESHOLD_=1048576) with the view cloned tensor by tensor
(before `compensation.layer_view`; both predate the `malloc_env` field), compensation_memory_rwME_layer_view.json
with `layer_view` (its `predicted_retained_bytes` is a term tried and dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Largest RssAnon seen by a sampling thread between `reset()` and `value`."""

    def __init__(self, every: float = 0.02):
        self.every, self.value, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.value = max(self.value, rss_anon())
            self._stop.wait(self.every)

    def reset(self):
        self.value = rss_anon()

    def stop(self):
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", default=str(ROOT / "benchmarks" / "recipes" / "nvfp4-norm-tweak.yaml"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from omniq.model.checkpoint import TensorReader, open_checkpoint
    from omniq.quant import compensation as comp, memory, recipe as recipes, weight_calibration as wc
    from omniq.quant.plan import make_plan

    torch.set_num_threads(a.threads)
    ck = open_checkpoint(a.checkpoint)
    arch, rec = ck.arch, recipes.load(a.recipe)
    if rec.compensation.name == "none":
        print(f"{a.recipe}: the recipe has no compensation", file=sys.stderr)
        return 2
    plan = make_plan(arch, rec)
    reader = TensorReader(ck)
    rows = torch.randint(0, arch.vocab_size, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    cal = wc.LayerByLayer(arch, rows, plan.formats, {}, reader.get(arch.embedding_weight), keep_weights=False,
                          compensation=rec.compensation)
    peak = Peak()
    layers: list[dict] = []
    fit_layer, compensate = comp.fit_layer, wc.LayerByLayer._compensate
    state: dict = {}

    def measured_compensate(self, i, *args):
        state["before"] = rss_anon()
        return compensate(self, i, *args)

    def measured_fit(arch_, i, *args, **kwargs):
        entry = rss_anon()
        peak.reset()
        t, c = time.perf_counter(), time.process_time()
        out = fit_layer(arch_, i, *args, **kwargs)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        pred = memory.compensation_fit_bytes(plan, i, rows=min(wc.BATCH_ROWS, a.samples), seq_len=a.seq_len)
        row_set = a.samples * a.seq_len * arch.hidden_size * 4
        r = {"layer": i, "kind": arch.kinds[i], "before_compensate_bytes": state["before"], "at_entry_bytes": entry,
             "peak_bytes": peak.value, "fit_bytes": peak.value - entry,
             "view_measured_bytes": entry - state["before"] - 2 * row_set,
             "predicted_view_bytes": pred["view"], "predicted_autograd_bytes": pred["autograd"],
             "fit_wall_s": wall, "fit_cpu_s": cpu, "loss_before": out[1].loss_before, "loss_after": out[1].loss_after}
        layers.append(r)
        g = 2 ** 30
        print(f"layer {i} ({r['kind']}): view {r['view_measured_bytes'] / g:.3f} GiB (predicted "
              f"{pred['view'] / g:.3f}), fit's own {r['fit_bytes'] / g:.3f} GiB (predicted autograd "
              f"{pred['autograd'] / g:.3f}), peak {r['peak_bytes'] / g:.3f} GiB; fit {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU ({rec.compensation.steps} steps)", flush=True)
        return out

    comp.fit_layer, wc.LayerByLayer._compensate = measured_fit, measured_compensate
    try:
        for i in range(arch.num_layers):
            cal.layer(i, wc.LayerWeights(reader.get, cal.layer_tensor_names(i)), {}, None)
    finally:
        comp.fit_layer, wc.LayerByLayer._compensate = fit_layer, compensate
        peak.stop()
    est = memory.streamed_estimate(plan, samples=a.samples, seq_len=a.seq_len, compensation=True)
    doc = {"checkpoint": a.checkpoint, "recipe": a.recipe,
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "compensation": rec.compensation.as_dict(),
           "samples": a.samples, "seq_len": a.seq_len, "threads": a.threads, "batch_rows": wc.BATCH_ROWS,
           "layers": layers, "streamed_estimate": est.as_dict()}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
