"""The 52-layer Nemotron 3 Nano quantize, extrapolated from the measured 5- and 12-layer real-width runs.

    python benchmarks/extrapolate_52.py [benchmarks/results/quantize_scale.json] [--tokens 16384]

Reads the runs `benchmarks/quantize_scale.py` recorded for the 12-layer real-width checkpoint `rw12`
(`MEM*EMEM*EME`; `rw5` when there is no 12-layer run), per recipe and per setting (inside the cgroup limit or
not), and scales each stage by the work it does, at the rate that run achieved: calibration by the matmul
FLOPs of the calibration forward (`quantize_scale.calibration_flops`' count, from the real 30B-A3B config,
at --tokens), export (packing, verify, manifest) by the bytes written (the plan's size of the real model for
that recipe), loading and preparing by the BF16 bytes read. Peak memory: the growth from 5 to 12 layers
measured, and the plan's 52-layer prediction (`omniq.quant.memory.streamed_estimate`, `predicted` in the JSON)
times the measured / predicted ratio of the run used. An estimate from rates, printed as one.

Runs that timed `calibrate_layer` apart from reading the layer (`StageClock` in quantize_scale.py, session 4
on) give calibration and reading separately: calibration scaled by the FLOPs done (routed tokens plus the
forced expert tokens; at 52 layers the most `--expert-calibration all` can force, 64 tokens for every expert
of every MoE layer), reading by the BF16 bytes; the 12-layer run is used for them when it has those figures,
else the 5-layer one. Also printed: the total with calibration at its CPU-time rate (what the process got of
the cores; on this shared machine the wall-clock rate depends on the other jobs' load). The 5 -> 12 layer
peak growth is printed only for runs of the same commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def _flops_per_token(arch) -> float:
    per_token = 0.0
    for lin in arch.linears:
        if lin.role == "lm_head":
            continue
        share = arch.num_experts_per_tok / arch.n_routed_experts if lin.expert is not None else 1
        per_token += 2 * lin.in_features * lin.out_features * share
    return per_token


def _forced_bound(arch) -> float:
    """The most forced-expert FLOPs `--expert-calibration all` can add: every routed expert of every MoE layer
    topped up by the full `min_tokens` (omniq.calib.experts.DEFAULT_MIN_TOKENS) tokens."""
    from benchmarks.quantize_scale import expert_pass_flops
    from omniq.calib.experts import DEFAULT_MIN_TOKENS
    from omniq.model.arch import MOE

    return len(arch.layers_of(MOE)) * arch.n_routed_experts * DEFAULT_MIN_TOKENS * expert_pass_flops(arch)


def extrapolate(doc: dict, tokens: int) -> list[dict]:
    import sys

    sys.path.insert(0, str(ROOT))
    from omniq.model.arch import from_config
    from omniq.quant import recipe as recipes
    from omniq.quant.plan import make_plan

    real = from_config(json.loads((ROOT / "tests" / "data" / "nemotron-3-nano-30b-a3b.config.json").read_text()))
    runs = {}
    for r in doc["runs"]:
        if r.get("tool") == "omniq" and r.get("rc") == 0 and r.get("seconds"):
            runs[(r["model"], r["recipe"], "cgroup_max_usage_bytes" in r)] = r
    # predictions of the current code (the JSON's `predicted` are those of the code that ran)
    from benchmarks.quantize_scale import predictions

    pred = {(p["model"], p["recipe"]): p["predicted_peak_bytes"]
            for p in predictions(sorted({k[1] for k in runs}), doc["samples"], doc["seq_len"])}
    flops52 = _flops_per_token(real) * tokens + _forced_bound(real)
    out = []
    for (recipe, cg) in sorted({(k[1], k[2]) for k in runs}):
        base = runs.get(("rw12", recipe, cg)) or runs.get(("rw5", recipe, cg))
        r5 = runs.get(("rw5", recipe, cg))
        # calibration from the deepest run that timed calibrate_layer apart from reading (StageClock)
        timed = next((r for r in (runs.get(("rw12", recipe, cg)), r5) if r and "stage_clock" in r), None)
        plan = make_plan(real, recipes.load(recipe))
        work = {"export": (plan.total_bytes, base["output_bytes"]),
                "load": (plan.original_bytes, base["source_bytes"]),
                "prepare": (plan.original_bytes, base["source_bytes"])}
        per_stage = {s: base["seconds"].get(s, 0.0) * w52 / w for s, (w52, w) in work.items()}
        cpu_calibrate = None
        if timed is not None:
            clock, done = timed["stage_clock"], timed["calib_flops_done"]
            per_stage["calibrate"] = clock["wall_s"]["calibrate_layer"] * flops52 / done
            per_stage["read_layers"] = clock["wall_s"]["materialize"] * plan.original_bytes / timed["source_bytes"]
            cpu_calibrate = clock["cpu_s"]["calibrate_layer"] * flops52 / done
            rate = done / clock["wall_s"]["calibrate_layer"]
        else:              # older runs: the whole calibrate stage (reading included) scaled by FLOPs
            timed = base
            per_stage["calibrate"] = base["seconds"]["calibrate"] * flops52 / base["calib_flops"]
            rate = base["calib_flops"] / base["seconds"]["calibrate"]
        ratio = base["peak_anon_bytes"] / pred[(base["model"], recipe)]
        # peak growth only between runs of the same code (`commit`, recorded since session 4)
        same_code = r5 is not None and r5.get("commit") == base.get("commit")
        growth = (base["peak_anon_bytes"] / r5["peak_anon_bytes"] - 1) if same_code and base is not r5 else None
        out.append({"recipe": recipe, "in_cgroup": cg, "from": base["model"], "calibration_from": timed["model"],
                    "tokens": tokens, "calib_flops_52": flops52,
                    "seconds": per_stage, "total_s": sum(per_stage.values()),
                    "total_s_calibration_at_cpu_rate": (sum(per_stage.values()) - per_stage["calibrate"]
                                                        + cpu_calibrate) if cpu_calibrate else None,
                    "peak_growth_5_to_12": growth,
                    "peak_52_gib": pred.get(("real52", recipe), 0) * ratio / GIB,
                    "measured_vs_predicted": {m: runs[(m, recipe, cg)]["peak_anon_bytes"] / pred[(m, recipe)]
                                              for m in ("rw5", "rw12") if (m, recipe, cg) in runs},
                    "calib_flops_per_s": rate, "load_average": timed.get("load_average")})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_scale.json")
    ap.add_argument("--tokens", type=int, default=16384)
    a = ap.parse_args(argv)
    rows = extrapolate(json.loads(a.json.read_text()), a.tokens)
    for x in rows:
        s = x["seconds"]
        g = x["peak_growth_5_to_12"]
        cpu = x["total_s_calibration_at_cpu_rate"]
        print(f"{x['recipe']:10} {'in 6 GiB cgroup' if x['in_cgroup'] else 'no cgroup':15} from {x['from']}"
              + (f" (calibration from {x['calibration_from']})" if x["calibration_from"] != x["from"] else "")
              + ": 52 layers, "
              f"{x['tokens']} calibration tokens: about {x['total_s'] / 60:.0f} min ("
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in s.items()) + " min"
              + (f"; {cpu / 60:.0f} min with calibration at its CPU-time rate" if cpu else "")
              + "); peak anonymous memory "
              + (f"{g * 100:+.1f} % from 5 to 12 layers, " if g is not None else "") + "52 layers about "
              f"{x['peak_52_gib']:.2f} GiB (calibration {x['calib_flops_52'] / 1e12:.1f} TFLOP at "
              f"{x['calib_flops_per_s'] / 1e9:.1f} GFLOP/s wall, load "
              f"{x['load_average']:.1f}); measured / predicted peak "
              + ", ".join(f"{m} {v:.2f}" for m, v in x["measured_vs_predicted"].items())
              )
    return rows


if __name__ == "__main__":
    main()
