"""Peak memory and time of exporting one real-width MoE layer, under three heap policies.

    python benchmarks/export_layer_memory.py /work/scratch/rw5 [--layer 1] [--recipe omni-nvfp4] [--rounds 2]

Each run is its own process (one thread): the layer's tensors are read from the shards, calibrated with
16 x 128 random tokens (max calibration), then `omniq.export.streamed.export_layer` packs it while a thread
samples RssAnon every 5 ms. Policies, interleaved round by round (a shared machine's timings are noisy):
  omniq      the shipped export: heap trimmed every `streamed.TRIM_EVERY` packed weights;
  no-trim    the same without those trims (glibc keeps the freed temporaries' pages);
  mmap-1m    no trims, but glibc's mmap threshold fixed at 1 MiB (mallopt), so every temporary of 1 MiB or more
             is its own mapping, returned on free.
Prints one JSON line per run (peak above the calibrated layer, packed bytes, export seconds) and writes
benchmarks/results/export_layer_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "export_layer_memory.json"

CHILD = r"""
import ctypes, json, sys, threading, time
src, layer, recipe, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if policy == "mmap-1m":
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD (fixed: no dynamic growth)
import torch
import omniq.export.streamed as st
from omniq.commands.quantize import resolve_recipe
from omniq.heap import give_back
from omniq.model import names
from omniq.model.checkpoint import TensorReader, open_checkpoint
from omniq.quant.modelopt_config import enabled_quantizers, modelopt_config
from omniq.quant.plan import make_plan
if policy != "omniq":
    st.TRIM_EVERY = 1 << 30

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
ckpt = open_checkpoint(src)
plan = make_plan(ckpt.arch, resolve_recipe(recipe, None))
model = st.build_skeleton(ckpt)
st.register_modelopt_plugins(model)
source = TensorReader(ckpt)
st.materialize(model.model.embeddings, names.NATIVE_EMBEDDINGS, source)
rows = torch.randint(0, ckpt.arch.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
hidden, kwargs = [], []
for k in range(0, 16, 4):
    h, kw = st.block_inputs(model, rows[k:k + 4]); hidden.append(h); kwargs.append(kw)
st.release(model.model.embeddings)
st.materialize(model.model.layers[layer], names.native_layer(layer), source)
shell = st.calibrate_layer(model, layer, modelopt_config(plan), hidden, kwargs, enabled=enabled_quantizers(plan))
give_back(collect=True)
base = anon(); peak[0] = base
t = time.perf_counter()
out = st.export_layer(shell, model, ckpt.arch)
dt = time.perf_counter() - t
packed = sum(v.numel() * v.element_size() for v in out.tensors.values())
print(json.dumps({"policy": policy, "export_s": round(dt, 2), "calibrated_layer_gib": round(base / 2**30, 3),
                  "peak_gib": round(peak[0] / 2**30, 3), "peak_above_layer_gib": round((peak[0] - base) / 2**30, 3),
                  "packed_gib": round(packed / 2**30, 3)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--layer", type=int, default=1, help="an MoE layer of the checkpoint (rw5 `MEM*E`: 1)")
    ap.add_argument("--recipe", default="omni-nvfp4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="omniq,no-trim,mmap-1m")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = []
    for r in range(a.rounds):
        for policy in a.policies.split(","):
            p = subprocess.run([sys.executable, "-c", CHILD, a.checkpoint, str(a.layer), a.recipe, policy],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            run = json.loads(p.stdout.strip().splitlines()[-1])
            run.update(round=r, load_average=round(os.getloadavg()[0], 2))
            runs.append(run)
            print(json.dumps(run), flush=True)
    doc = {"checkpoint": a.checkpoint, "layer": a.layer, "recipe": a.recipe, "runs": runs}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
