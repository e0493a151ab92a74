"""NVFP4 quality on the bundled `tiny`: weight-calibration algorithms, named recipes and searched recipes.

    nice -n 10 python benchmarks/nvfp4_quality.py [--work DIR] [--seeds 0,1,2] [--algorithms max,mse,...]
        [--fp8-algorithms mse,gptq,...] [--recipes nvfp4,omni-nvfp4,...] [--budgets omni-nvfp4,6.8,...] [--calib-samples 16 --calib-seq-len 256]
        [--samples 16 --seq-len 256] [--json benchmarks/results/nvfp4_quality.json] [--resume]

Every point is made the way a user makes it: `omniq quantize tiny --recipe R --calib-seed S` (each seed a
different sample of the calibration texts) and `omniq validate tiny ARTIFACT --eval eval|eval2 --report`, each
in its own process (wall time and peak RSS of the quantize process recorded; the weight-calibration seconds
from omniq.json). Searched recipes: `omniq search tiny --budget B` (sensitivities on the held-out `calib-tail`
text, disjoint from both evaluation sets), then quantized over the same seeds. The noise floor (BF16 weights
run as a BF16 engine runs them, against the float32 reference, `artifact.bf16_compute_hooks`) is measured on
the same evaluation rows. A budget named after a recipe (`omni-nvfp4`) means that recipe's bits per weight.
An `--algorithms` entry `NAME+act-mse` also sets `activation_calibration: mse` (input_scale searched),
`NAME+norm-tweak` also `compensation: norm-tweak` (BF16 norms fitted layer by layer, omniq.quant.compensation);
`NAME:OPTION` sets that boolean parameter of the algorithm (`gptq:act_order`: `{name: gptq, act_order: true}`).
`--fp8-algorithms`: the same algorithms on all-layer `fp8` (`fp8 ALGO` points; the `fp8` recipe is fp8 max),
over `--fp8-seeds` (default: --seeds; fewer seeds: no spread, so no claim rests on them).
With `--resume`, a seed whose record in --work has the same recipe text and sizes is reused, not rerun; its
run is marked `"reused": true` in the JSON (its time and memory are those of the run that made the record).

Claims are printed only where the seed spreads (min..max over seeds) do not overlap:
    at nvfp4's size, best algorithm KL <= 0.7 x max's, on both sets
    at omni-nvfp4's bits/weight, searched recipe KL <= 0.8 x omni-nvfp4's, on both sets
Writes the JSON (every run's figures) and a PNG chart of bits/weight vs mean KL (eval), each point labelled,
seed spread as error bars, the Pareto frontier drawn. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNNER = ("import json, resource, sys, time\n"
          "from omniq.cli import main\n"
          "t = time.perf_counter()\n"
          "rc = main(sys.argv[1:])\n"
          "print('OMNIQ-RUN ' + json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
          "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)\n")
ALGORITHMS = ("max", "mse", "local-hessian", "gptq", "gptaq", "four-over-six")
FP8_ALGORITHMS = ("mse", "local-hessian", "gptq", "gptaq")
RECIPES = ("nvfp4", "omni-nvfp4", "nano3-nvfp4", "nvfp4-experts", "fp8")
SETS = ("eval", "eval2")


def run(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=ROOT)
    stats = [line for line in p.stderr.splitlines() if line.startswith("OMNIQ-RUN ")]
    info = json.loads(stats[-1][len("OMNIQ-RUN "):]) if stats else {"rc": p.returncode}
    if info["rc"] != 0:
        raise SystemExit(f"omniq {' '.join(args)} failed (rc {info['rc']}): {p.stderr.strip()[-1500:]}")
    return dict(info, stdout=p.stdout)


def plan_bpw(recipe: str) -> float:
    from omniq.model.checkpoint import open_checkpoint
    from omniq.quant import recipe as recipes
    from omniq.quant.plan import make_plan

    return make_plan(open_checkpoint("tiny").arch, recipes.load(recipe)).bits_per_weight


def noise_floor(samples: int, seq_len: int) -> dict:
    """The floor on each set's rows, with the whole-model loop the validate golden is recorded with."""
    sys.path.insert(0, str(ROOT / "tests" / "validate"))
    from record_golden import floor_comparison

    from omniq.validate.artifact import read_artifact
    from omniq.validate.run import eval_texts, token_rows

    ref = read_artifact("tiny")
    out = {}
    for s in SETS:
        cmp = floor_comparison(ref, token_rows(ref.tokenizer, eval_texts(s)[1], samples, seq_len))
        out[s] = {k: v for k, v in cmp.summary().items() if k in ("kl_mean", "kl_p95", "top1_agreement", "tokens")}
    return out


def partial(a, floor, points) -> None:
    """The figures so far (a long run that is stopped still leaves them)."""
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.with_suffix(".partial.json").write_text(json.dumps({"noise_floor": floor, "points": points}, indent=1,
                                                              default=str) + "\n")


def one_seed(label: str, recipe: str, seed: int, work: Path, a) -> dict:
    art = work / f"{label}-s{seed}"
    record = work / f"{label}-s{seed}.run.json"
    settings = {"recipe_text": Path(recipe).read_text() if Path(recipe).is_file() else recipe,
                **{k: getattr(a, k) for k in ("calib_samples", "calib_seq_len", "samples", "seq_len")}}
    if a.resume and record.is_file():          # this seed's figures from an earlier run of the same settings
        done = json.loads(record.read_text())
        if done.get("settings") == settings:
            print(f"  {label} seed {seed}: reused {record.name}", flush=True)
            return dict(done["run"], reused=True)
    q = run(["quantize", "tiny", "--recipe", recipe, "--out", str(art), "--force", "--calib-samples",
             str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len), "--calib-seed", str(seed)])
    m = json.loads((art / "omniq.json").read_text())
    r = {"seed": seed, "quantize_seconds": q["seconds"], "quantize_peak_rss_mib": q["peak_rss_mib"],
         "weight_calibration_seconds": (m.get("weight_calibration") or {}).get("seconds", 0.0),
         "fallback_to_mse": len((m.get("weight_calibration") or {}).get("fallback_to_mse", [])),
         "bytes": sum(p.stat().st_size for p in art.glob("*.safetensors"))}
    for s in SETS:
        rep = work / f"{label}-s{seed}.{s}.json"
        run(["validate", "tiny", str(art), "--eval", s, "--samples", str(a.samples), "--seq-len",
             str(a.seq_len), "--report", str(rep), "--max-kl", "10", "--min-top1", "0", "--max-ppl-ratio", "100",
             "--no-noise-floor", "--force"])       # the floor is measured once below, on the same rows
        v = json.loads(rep.read_text())
        r[s] = {k: v[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")}
    print(f"  {label} seed {seed}: KL eval {r['eval']['kl_mean']:.3e} eval2 {r['eval2']['kl_mean']:.3e}; "
          f"quantize {r['quantize_seconds']:.1f} s, peak {r['quantize_peak_rss_mib']:.0f} MiB", flush=True)
    record.write_text(json.dumps({"settings": settings, "run": r}, indent=1) + "\n")
    return r


def point(label: str, kind: str, recipe: str, seeds, work: Path, a) -> dict:
    """One configuration over the seeds (`--jobs` seeds at once, each in its own omniq processes)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        runs = list(pool.map(lambda seed: one_seed(label, recipe, seed, work, a), seeds))
    out = {"label": label, "kind": kind, "recipe": recipe, "bits_per_weight": plan_bpw(recipe), "runs": runs}
    for s in SETS:
        kls = [r[s]["kl_mean"] for r in runs]
        out[s] = {"kl_mean": statistics.fmean(kls), "kl_min": min(kls), "kl_max": max(kls),
                  "top1_mean": statistics.fmean(r[s]["top1_agreement"] for r in runs)}
    out["quantize_seconds"] = statistics.fmean(r["quantize_seconds"] for r in runs)
    out["quantize_peak_rss_mib"] = max(r["quantize_peak_rss_mib"] for r in runs)
    out["weight_calibration_seconds"] = statistics.fmean(r["weight_calibration_seconds"] for r in runs)
    return out


def claim(name: str, better: dict, base: dict, factor: float) -> dict:
    """better <= factor x base on both sets, claimed only where the seed spreads do not overlap."""
    out = {"claim": name, "candidate": better["label"], "baseline": base["label"], "factor": factor}
    for s in SETS:
        ratio = better[s]["kl_mean"] / base[s]["kl_mean"]
        seeds = min(len(better["runs"]), len(base["runs"]))
        separated = seeds >= 3 and better[s]["kl_max"] < base[s]["kl_min"]     # fewer seeds: no spread, no claim
        out[s] = {"ratio": ratio, "spreads_separate": separated, "met": bool(separated and ratio <= factor)}
    out["met"] = all(out[s]["met"] for s in SETS)
    return out


def pareto(points: list[dict], key: str = "eval") -> list[str]:
    best = float("inf")
    front = []
    for p in sorted(points, key=lambda p: (p["bits_per_weight"], p[key]["kl_mean"])):
        if p[key]["kl_mean"] < best:
            front.append(p["label"])
            best = p[key]["kl_mean"]
    return front


def chart(points: list[dict], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    colors = {"algorithm": "tab:blue", "fp8 algorithm": "tab:purple", "recipe": "tab:green", "searched": "tab:red"}
    for ax, s in zip(axes, SETS):
        for p in points:
            y = p[s]["kl_mean"]
            ax.errorbar(p["bits_per_weight"], y, yerr=[[y - p[s]["kl_min"]], [p[s]["kl_max"] - y]], fmt="o",
                        color=colors[p["kind"]], capsize=3)
            ax.annotate(p["label"], (p["bits_per_weight"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = {lbl: p for p in points for lbl in [p["label"]]}
        fr = [front[lbl] for lbl in pareto(points, s)]
        ax.plot([p["bits_per_weight"] for p in fr], [p[s]["kl_mean"] for p in fr], "--", color="gray",
                label="Pareto frontier")
        ax.axhline(floor[s]["kl_mean"], color="black", lw=0.8, label="noise floor (BF16 engine vs fp32)")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (language model, omniq plan)")
        ax.set_title(f"tiny, {s}: mean KL vs size (bars: min..max over calibration seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean KL(ref || candidate), nats")
    for kind, c in colors.items():
        axes[1].scatter([], [], color=c, label=kind)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/nvfp4_quality"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--fp8-algorithms", default=",".join(FP8_ALGORITHMS))
    ap.add_argument("--fp8-seeds", default=None, help="seeds of the fp8 algorithm points (default: --seeds)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--budgets", default="omni-nvfp4,6.8,8.0")
    ap.add_argument("--search-algorithm", default="max")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/nvfp4_quality.json")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (each quantize + validate process)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse a seed's figures recorded in --work by an earlier run with the same recipe and sizes")
    a = ap.parse_args(argv)
    work = a.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    floor: dict = {}
    points = []
    for algo in [x for x in a.algorithms.split(",") if x]:
        name, *mods = algo.split("+")                     # e.g. gptaq+act-mse, gptaq+norm-tweak
        act = next((m[len("act-"):] for m in mods if m.startswith("act-")), None)
        comp = next((m for m in mods if not m.startswith("act-")), None)
        name, _, option = name.partition(":")            # e.g. gptq:act_order
        spec = f"{{name: {name}, {option}: true}}" if option else name
        stem = algo.replace(":", "-")
        path = work / f"nvfp4-{stem}.yaml"
        path.write_text(f"name: nvfp4-{stem}\ndefault: nvfp4\nalgorithm: {spec}\n"
                        + (f"activation_calibration: {act}\n" if act else "")
                        + (f"compensation: {comp}\n" if comp else ""))
        label = (f"nvfp4 {name}" + (f" {option.replace('_', '-')}" if option else "")
                 + (f" + act {act}" if act else "") + (f" + {comp}" if comp else ""))
        points.append(point(label, "algorithm", str(path), seeds, work, a))
        partial(a, floor, points)
    for algo in [x for x in a.fp8_algorithms.split(",") if x]:
        path = work / f"fp8-{algo}.yaml"
        path.write_text(f"name: fp8-{algo}\ndefault: fp8\nalgorithm: {algo}\n")
        fp8_seeds = [int(x) for x in a.fp8_seeds.split(",")] if a.fp8_seeds else seeds
        points.append(point(f"fp8 {algo}", "fp8 algorithm", str(path), fp8_seeds, work, a))
        partial(a, floor, points)
    for rec in [x for x in a.recipes.split(",") if x]:
        if rec == "nvfp4" and any(p["label"] == "nvfp4 max" for p in points):
            continue                                          # the same artifact as "nvfp4 max"
        points.append(point(rec, "recipe", rec, seeds, work, a))
        partial(a, floor, points)
    for b in [x for x in a.budgets.split(",") if x]:
        is_num = b.replace(".", "", 1).isdigit()
        bpw = float(b) if is_num else plan_bpw(b)
        path = work / f"search-{bpw:.3f}.yaml"
        s = run(["search", "tiny", "--budget", f"{bpw:.6f}", "--out", str(path), "--force", "--algorithm",
                 a.search_algorithm, "--cache", str(work / "sensitivity.json"),
                 "--calib-samples", str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len)])
        print(s["stdout"].splitlines()[0], flush=True)
        p = point(f"search {bpw:.2f}" + ("" if is_num else f" ({b})"), "searched", str(path), seeds, work, a)
        p["search_seconds"] = s["seconds"]
        points.append(p)
        partial(a, floor, points)
    floor = noise_floor(a.samples, a.seq_len)
    by = {p["label"]: p for p in points}
    claims = []
    algos = [p for p in points if p["kind"] == "algorithm" and p["label"] != "nvfp4 max"]
    if "nvfp4 max" in by and algos:
        best = min(algos, key=lambda p: p["eval"]["kl_mean"] + p["eval2"]["kl_mean"])
        claims.append(claim("best algorithm at nvfp4's size <= 0.7 x max", best, by["nvfp4 max"], 0.7))
    searched = [p for p in points if p["kind"] == "searched" and p["label"].endswith("(omni-nvfp4)")]
    if "omni-nvfp4" in by and searched:
        claims.append(claim("searched at omni-nvfp4's bits/weight <= 0.8 x omni-nvfp4", searched[0],
                            by["omni-nvfp4"], 0.8))
    result = {"settings": vars(a) | {"work": str(work), "json": str(a.json)}, "noise_floor": floor,
              "points": points, "pareto_eval": pareto(points, "eval"), "pareto_eval2": pareto(points, "eval2"),
              "claims": claims, "seconds": time.perf_counter() - t0}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    chart(points, floor, a.json.with_suffix(".png"))
    a.json.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"\n{'point':<28} {'bits/w':>6} {'KL eval (min..max)':>28} {'KL eval2 (min..max)':>28} "
          f"{'quant s':>8} {'wcal s':>7} {'peak MiB':>8}")
    for p in points:
        cells = [f"{p[s]['kl_mean']:.3e} ({p[s]['kl_min']:.2e}..{p[s]['kl_max']:.2e})" for s in SETS]
        print(f"{p['label']:<28} {p['bits_per_weight']:>6.2f} {cells[0]:>28} {cells[1]:>28} "
              f"{p['quantize_seconds']:>8.1f} {p['weight_calibration_seconds']:>7.1f} {p['quantize_peak_rss_mib']:>8.0f}")
    print(f"noise floor: eval {floor['eval']['kl_mean']:.3e}, eval2 {floor['eval2']['kl_mean']:.3e} "
          f"({floor['eval']['tokens']} tokens each)")
    for c in claims:
        parts = ", ".join(f"{s} ratio {c[s]['ratio']:.2f}{'' if c[s]['spreads_separate'] else ' (spreads overlap: no claim)'}"
                          for s in SETS)
        print(f"{c['claim']}: {c['candidate']} vs {c['baseline']}: {parts} -> {'MET' if c['met'] else 'NOT MET'}")
    print(f"wrote {a.json} and {a.json.with_suffix('.png')} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
