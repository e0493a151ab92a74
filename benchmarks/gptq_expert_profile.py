"""Where one MoE layer's gptq / gptaq weight calibration spends its time, at the real width.

    python scripts/make_realwidth.py /work/scratch/rwE --pattern E
    python benchmarks/gptq_expert_profile.py /work/scratch/rwE [--recipe benchmarks/recipes/nvfp4-gptq.yaml]
        [--layer 0] [--experts 24] [--samples 16 --seq-len 128] [--baseline DIR] [--repeat 1] [--json PATH]

Runs `LayerByLayer.layer` (the streamed quantize's weight calibration step, its weights read from the shards on
access as there) on one decoder layer, the calibration rows' embeddings as its inputs (for a later layer too:
fine for timing, not for numbers), and times its parts by
wrapping the functions that do them (the outermost call of each, so a recursive call is counted once):

    forward (first)    the layer's first forward: every linear but the routed experts recorded, routes counted
    forward (chunks)   the per-chunk forwards over the kept inputs (only the chunk's experts computed)
    statistics         inside those forwards, the recorder's own work: X^T X (gptaq: the inputs' quantization,
                       Xq^T Xq and X^T Xq) beside the linears' matmuls (`forward.plain_linear`'s calls)
    target             gptaq's float64 least-squares target (`gptq.asymmetric_target`)
    factorisation      the inverse Hessian's Cholesky factor (`gptq._inverse_cholesky`)
    block scales       NVFP4's per-group scale choice inside the column loop (`gptq._group_codes`)
    column loop        the rest of `gptq.gptq`: the rounding of each column and the lazy-batch updates
    packing            `CalibratedWeight.compact`
    rest               the layer step's remainder (the other linears' calibration, the forward making the
                       next layer's inputs, input scales)

Every part is given in CPU seconds of the process (the machine is shared; wall seconds are recorded too).
`--experts N`: only the first N routed experts of each projection keep the recipe's algorithm (the others are
max), so the chunk figures are for N of them; `scaled_to_all` multiplies the per-expert parts by 128 / N. Each
part is printed with its FLOPs (counted from the shapes: Hessians 2 n in^2 per expert, the factorisation
4/3 in^3, gptaq's LU solve 2/3 in^3 + 4 in^2 out, GPTQ's lazy updates out in^2) and its rate, beside this
machine's float32 / float64 matmul and float64 Cholesky rates measured in the same process (best of 3).
`--baseline DIR`: another checkout (a `git archive` of an earlier commit) run the same way in a child
process before each run of this tree, interleaved, for a before / after under the same load. One torch thread.
Writes benchmarks/results/gptq_expert_profile.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gptq_expert_profile.json"


class Timers:
    """Seconds (wall, CPU) and call counts per part; `wrap(obj, attr, part)` times the outermost calls."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active: set[str] = set()

    def add(self, part, wall, cpu):
        self.wall[part] = self.wall.get(part, 0.0) + wall
        self.cpu[part] = self.cpu.get(part, 0.0) + cpu
        self.calls[part] = self.calls.get(part, 0) + 1

    def timed(self, fn, part_of):
        def inner(*args, **kwargs):
            part = part_of(*args, **kwargs) if callable(part_of) else part_of
            if part in self.active:
                return fn(*args, **kwargs)
            self.active.add(part)
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - t, time.process_time() - c)
                self.active.discard(part)
        return inner

    def wrap(self, obj, attr, part_of):
        if hasattr(obj, attr):
            setattr(obj, attr, self.timed(getattr(obj, attr), part_of))


def rates() -> dict:
    """This process's float32 / float64 matmul and float64 / float32 Cholesky rates (FLOP/s, best of 3)."""
    import torch

    def best(fn, flops):
        fn()
        out = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            out.append(flops / (time.perf_counter() - t))
        return max(out)

    n = 2688
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(n, n, generator=g)
    spd = a32 @ a32.T / n + torch.eye(n)
    out = {}
    for dt in (torch.float32, torch.float64):
        a = a32.to(dt)
        out[f"matmul_{n}_{str(dt)[6:]}"] = best(lambda: a @ a, 2 * n ** 3)
        s = spd.to(dt)
        out[f"cholesky_{n}_{str(dt)[6:]}"] = best(lambda: torch.linalg.cholesky(s), n ** 3 / 3)
    w = torch.randn(6, 1856, 128, generator=g)
    u = torch.randn(6, 128, n - 128, generator=g)
    out["bmm_6x1856x128x2560_float32"] = best(lambda: w @ u, 2 * 6 * 1856 * 128 * (n - 128))
    return out


def profile(a) -> dict:
    import torch

    torch.set_num_threads(1)
    from omniq.calib import data as calib_data
    from omniq.commands.quantize import open_source, resolve_recipe
    from omniq.model import forward
    from omniq.model.checkpoint import TensorReader
    from omniq.quant import gptq as gptq_mod, weight_calibration as wcal
    from omniq.quant.plan import make_plan
    from omniq.quant.recipe import Algorithm

    machine = rates()
    ckpt = open_source(a.checkpoint)
    arch = ckpt.arch
    rec = resolve_recipe(a.recipe, None)
    plan = make_plan(arch, rec)
    algorithms = {lin.name: rec.algorithm_of(lin, arch) for lin in plan.quantized}
    lins = [lin for lin in arch.linears if lin.layer == a.layer]
    experts = sorted({lin.expert for lin in lins if lin.expert is not None})
    n_experts = len(experts) if a.experts is None else min(a.experts, len(experts))
    for lin in lins:
        if lin.expert is not None and lin.expert >= n_experts:
            algorithms[lin.name] = Algorithm("max")
    rows = calib_data.load("tiny-calib", ckpt.tokenizer, samples=a.samples, seq_len=a.seq_len, seed=0).rows
    reader = TensorReader(ckpt)
    cal = wcal.LayerByLayer(arch, rows, plan.formats, algorithms, reader.get(arch.embedding_weight),
                            keep_weights=False, activation=rec.activation_calibration)
    cal.next_layer = a.layer          # the layer gets the embeddings as its inputs: fine for timing

    T = Timers()
    phase = {"forward": "forward (first)"}

    def linear_part(name, x):
        return "plain linears" if T.active & {"forward (first)", "forward (chunks)"} else "plain (other)"

    real_plain = forward.plain_linear

    def plain_linear(weights):
        return T.timed(real_plain(weights), linear_part)

    forward.plain_linear = plain_linear
    T.wrap(wcal._Recorder, "__call__", "recorder")
    T.wrap(forward, "decoder_layer", lambda *args, **kw: phase["forward"] if "linear" in kw and isinstance(
        kw["linear"], wcal._Recorder) else "forward (next inputs)")
    real_chunks = wcal._expert_chunks

    def expert_chunks(*args, **kw):        # called after the first forward, before the chunks' forwards
        phase["forward"] = "forward (chunks)"
        return real_chunks(*args, **kw)

    wcal._expert_chunks = expert_chunks
    T.wrap(wcal, "_gptq_stack", "gptq stack")
    def of_experts(part):        # the routed experts' batched calls apart from the other linears' (`quantize_one`)
        return lambda *args, **kw: part if "gptq stack" in T.active else f"{part} (other linears)"

    for attr, part in (("gptq", "gptq"), ("asymmetric_target", "target"), ("_inverse_cholesky", "factorisation"),
                       ("_group_codes", "block scales")):
        T.wrap(gptq_mod, attr, of_experts(part))
    T.wrap(wcal.CalibratedWeight, "compact", "packing")

    weights = wcal.LayerWeights(reader.get, cal.layer_tensor_names(a.layer))
    t, c = time.perf_counter(), time.process_time()
    done = cal.layer(a.layer, weights, {})
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    reader.close()

    def parts_of(w: dict, total: float) -> dict:
        parts = {
            "forward (first)": w.get("forward (first)", 0),
            "forward (chunks)": w.get("forward (chunks)", 0),
            "statistics": w.get("recorder", 0) - w.get("plain linears", 0),
            "expert and other matmuls in the forwards": w.get("plain linears", 0),
            "target": w.get("target", 0),
            "factorisation": w.get("factorisation", 0),
            "block scales": w.get("block scales", 0),
            "column loop": w.get("gptq", 0) - w.get("factorisation", 0) - w.get("block scales", 0),
            "gptq stack other": w.get("gptq stack", 0) - w.get("gptq", 0) - w.get("target", 0),
            "packing": w.get("packing", 0),
            "forward (next inputs)": w.get("forward (next inputs)", 0),
            "other linears' gptq": w.get("gptq (other linears)", 0) + w.get("target (other linears)", 0),
        }
        inside = ("statistics", "expert and other matmuls in the forwards")     # parts of the forwards
        parts["rest"] = total - sum(v for k, v in parts.items() if k not in inside)
        return parts

    w, cp, n = T.wall, T.cpu, T.calls
    parts, parts_cpu = parts_of(w, wall), parts_of(cp, cpu)
    # FLOPs of the calibrated routed experts (their shapes and routed tokens)
    algo_names = {algorithms[l.name].name for l in lins if l.expert is not None and l.expert < n_experts}
    tokens = {name: cw.tokens or 0 for name, cw in done.items()}
    flops = {"statistics": 0.0, "factorisation": 0.0, "target": 0.0, "lazy updates": 0.0}
    for lin in lins:
        if lin.expert is None or lin.expert >= n_experts or done.get(lin.name) is None:
            continue
        if done[lin.name].algorithm not in ("gptq", "gptaq"):
            continue
        i_, o_ = lin.in_features, lin.out_features
        k = 2 if done[lin.name].algorithm == "gptaq" else 1
        flops["statistics"] += k * 2 * tokens[lin.name] * i_ ** 2
        flops["factorisation"] += 4 / 3 * i_ ** 3
        if k == 2:
            flops["target"] += 2 / 3 * i_ ** 3 + 4 * i_ ** 2 * o_
        flops["lazy updates"] += o_ * i_ ** 2
    out = {"tree": str(Path(wcal.__file__).resolve().parents[2]), "checkpoint": a.checkpoint, "recipe": a.recipe,
           "algorithms": sorted(algo_names), "layer": a.layer, "experts": n_experts, "of_experts": len(experts),
           "samples": a.samples, "seq_len": a.seq_len, "threads": torch.get_num_threads(),
           "load_average_before": os.getloadavg()[0], "layer_wall_s": wall, "layer_cpu_s": cpu,
           "parts_wall_s": parts, "parts_cpu_s": parts_cpu, "timers_wall_s": w, "timers_cpu_s": cp, "calls": n, "flops": flops,
           "rates_flop_per_cpu_s": {k: flops[k] / parts_cpu[k] for k in ("statistics", "factorisation", "target")
                                    if parts_cpu.get(k, 0) > 0},
           "machine_flop_per_s": machine, "fallbacks": len(cal.result.fallbacks),
           "scaled_to_all_experts_wall_s": None, "scaled_to_all_experts_cpu_s": None}
    if n_experts < len(experts):
        per_expert = ("forward (chunks)", "target", "factorisation", "block scales", "column loop",
                      "gptq stack other", "packing")
        scale = len(experts) / n_experts
        out["scaled_to_all_experts_wall_s"] = wall + (scale - 1) * sum(parts[k] for k in per_expert)
        out["scaled_to_all_experts_cpu_s"] = cpu + (scale - 1) * sum(parts_cpu[k] for k in per_expert)
    out["load_average_after"] = os.getloadavg()[0]
    return out


def show(r: dict) -> None:
    print(f"{r['tree']}: layer {r['layer']} ({', '.join(r['algorithms'])}, {r['experts']} of {r['of_experts']} "
          f"experts): {r['layer_cpu_s']:.1f} CPU s ({r['layer_wall_s']:.1f} s wall); load average "
          f"{r['load_average_before']:.2f} -> {r['load_average_after']:.2f}", flush=True)
    for k, v in r.get("parts_cpu_s", r["parts_wall_s"]).items():
        f = r["flops"].get(k)
        rate = f" ({f / 1e9:.1f} GFLOP, {f / v / 1e9:.1f} GFLOP per CPU s)" if f and v > 0 else ""
        print(f"  {k:42s} {v:8.2f} CPU s ({r['parts_wall_s'][k]:.2f} s wall){rate}")
    print(f"  lazy updates: {r['flops']['lazy updates'] / 1e9:.1f} GFLOP (inside the column loop)")
    print("  machine: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in r["machine_flop_per_s"].items()))
    if r["scaled_to_all_experts_wall_s"]:
        print(f"  scaled to all {r['of_experts']} experts: {r.get('scaled_to_all_experts_cpu_s') or 0:.0f} CPU s "
              f"({r['scaled_to_all_experts_wall_s']:.0f} s wall)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", default=str(ROOT / "benchmarks" / "recipes" / "nvfp4-gptq.yaml"))
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--tree", default=None, help=argparse.SUPPRESS)      # the child's checkout (--baseline)
    a = ap.parse_args(argv)
    tree = Path(a.tree or ROOT).resolve()
    sys.path.insert(0, str(tree))
    if a.tree:
        print("RESULT " + json.dumps(profile(a)), flush=True)
        return 0
    runs = []
    for _ in range(a.repeat):
        for t in ([a.baseline] if a.baseline else []) + [str(ROOT)]:
            args = [sys.executable, __file__, a.checkpoint, "--recipe", a.recipe, "--layer", str(a.layer),
                    "--samples", str(a.samples), "--seq-len", str(a.seq_len), "--tree", t]
            if a.experts is not None:
                args += ["--experts", str(a.experts)]
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=t)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1][len("RESULT "):])
            r["role"] = "baseline" if t == a.baseline else "this tree"
            show(r)
            runs.append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    Path(a.json).write_text(json.dumps({"commit": commit, "runs": runs}, indent=1) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
