"""Every figure the README cites, from one command: `omniq quantize` / `omniq validate` / `omniq plan` and the
benchmark scripts, run here, their outputs read back, and the numbers written to one JSON file.

    python benchmarks/figures.py [--quick] [--work DIR] [--json benchmarks/results/figures.json]
                                 [--only bundled,accuracy,gates,broken,drift,omni,plan,help,timing]

Sections (each one a key of the JSON file; the README's tables cite them):

  bundled    the bundled model's held-out perplexity and the unigram baseline: `omniq/bundled/tiny/
             training.json`, written by scripts/train_tiny.py (not re-trained here: 10 minutes).
  accuracy   `omniq quantize tiny` with fp8, fp8 + `--kv-cache fp8`, nvfp4, nvfp4 + `--kv-cache fp8` and
             `benchmarks/recipes/mixed.yaml` (NVFP4 routed experts, FP8 elsewhere), then
             benchmarks/validate_figures.py on those artifacts: mean / p95 KL, top-1, perplexity ratio against
             the float32 reference, with the BF16-engine noise floor, on the `eval` and `eval2` sets.
  gates      the default gates `omniq validate` applies per format (omniq.validate.gates.gates_for).
  broken     two deliberately broken copies of the fp8 artifact, each through `omniq validate --report`:
             every Mamba `in_proj` weight scale x4, and routed experts 0 and 1 swapped in every MoE layer.
  drift      `omniq validate --positions` on long rows (KL per position bucket), fp8 and nvfp4.
  omni       benchmarks/omni_calib_mix.py (tiny-omni, omni-nvfp4, text-only and multimodal calibration),
             per-modality KL from the reports it leaves in its --out directory.
  plan       `omniq plan tests/data/nemotron-3-nano-30b-a3b.config.json --recipe R --json` for NVIDIA's
             published recipes: linear layers per format, size, bits per weight.
  help       wall-clock of `omniq --help` (best of 5): the CLI imports nothing heavy before a command runs.
  timing     benchmarks/quantize_bench.py and benchmarks/validate_throughput.py (full run only: minutes, and
             noisy on a shared machine).

`--quick` runs everything small (8 x 64 calibration tokens, 8 x 64 evaluation tokens, short drift rows, 2
media samples, no timing) to prove the chain works; its numbers are not the README's. The full run calibrates
on 16 x 256 tokens of the bundled calib split (the configuration omniq/validate/gates.py and the README
state) and evaluates 64 x 256 tokens per set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "figures.json"
CONFIG_30B = ROOT / "tests" / "data" / "nemotron-3-nano-30b-a3b.config.json"
MIXED = ROOT / "benchmarks" / "recipes" / "mixed.yaml"
SECTIONS = ("bundled", "accuracy", "gates", "broken", "drift", "omni", "plan", "help", "timing")
# artifact name -> quantize arguments (names as benchmarks/validate_figures.py expects them)
ARTIFACTS = {"fp8": ["--recipe", "fp8"], "fp8-kv": ["--recipe", "fp8", "--kv-cache", "fp8"],
             "nvfp4": ["--recipe", "nvfp4"], "nvfp4-kv": ["--recipe", "nvfp4", "--kv-cache", "fp8"],
             "mixed": ["--recipe", str(MIXED)]}
PUBLISHED = ("omni-fp8", "omni-nvfp4", "nano3-nvfp4", "nvfp4-experts", "nvfp4")
FULL = {"calib": (16, 256), "eval": (64, 256), "sets": "eval,eval2", "drift": (8, 2048), "media": 64}
QUICK = {"calib": (8, 64), "eval": (8, 64), "sets": "eval", "drift": (2, 256), "media": 2}


def omniq(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`omniq ARGS` as a user runs it (python -m omniq.cli), in this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "omniq.cli", *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise SystemExit(f"omniq {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"benchmarks/{name} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def quantized(work: Path, name: str, size: dict) -> Path:
    art = work / "artifacts" / name
    if not (art / "omniq.json").is_file():
        samples, seq = size["calib"]
        omniq("quantize", "tiny", *ARTIFACTS[name], "--out", str(art), "--force",
              "--calib-samples", str(samples), "--calib-seq-len", str(seq))
    return art


def validated(reference: str, art: Path, report: Path, *extra: str) -> dict:
    p = omniq("validate", reference, str(art), "--report", str(report), "--force", *extra, check=False)
    if p.returncode not in (0, 1):        # 1: a gate failed, which the broken artifacts must do
        raise SystemExit(f"omniq validate {art} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return json.loads(report.read_text())


def metrics(r: dict) -> dict:
    return {k: r[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")}


# ----- sections --------------------------------------------------------------------------------------------
def bundled(work: Path, size: dict) -> dict:
    t = json.loads((ROOT / "omniq" / "bundled" / "tiny" / "training.json").read_text())
    keep = ("eval_tokens", "eval_perplexity_fp32", "eval_perplexity_bf16", "unigram_perplexity", "params")
    return {"source": "omniq/bundled/tiny/training.json (scripts/train_tiny.py)",
            **{k: t[k] for k in keep if k in t}}


def accuracy(work: Path, size: dict) -> dict:
    for name in ARTIFACTS:
        quantized(work, name, size)
    out = work / "validate_figures.json"
    samples, seq = size["eval"]
    script("validate_figures.py", str(work / "artifacts"), "--samples", str(samples), "--seq-len", str(seq),
           "--sets", size["sets"], "--candidates", ",".join(ARTIFACTS), "--json", str(out))
    return {"calibration": {"samples": size["calib"][0], "seq_len": size["calib"][1], "split": "bundled calib"},
            "evaluation": {"samples": samples, "seq_len": seq}, "sets": json.loads(out.read_text())}


def gates(work: Path, size: dict) -> dict:
    from omniq.validate.gates import gates_for

    return {fmt: {k: v for k, v in gates_for(fmt).as_dict().items() if k != "source"}
            for fmt in ("fp8", "nvfp4", "mixed")}


def _rewrite_tensors(src: Path, dest: Path, change) -> None:
    """A copy of an artifact with its tensors changed by `change(tensors)`; omniq.json's hashes follow."""
    import hashlib

    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    for f in sorted(dest.glob("*.safetensors")):
        tensors = load_file(str(f))
        if change(tensors):
            save_file(tensors, str(f), metadata={"format": "pt"})
    manifest = json.loads((dest / "omniq.json").read_text())
    manifest["files"] = {n: hashlib.sha256((dest / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (dest / "omniq.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _scales_x4(tensors: dict) -> bool:
    hit = [n for n in tensors if re.search(r"\.mixer\.in_proj\.weight_scale$", n)]
    for n in hit:
        tensors[n] = tensors[n] * 4
    return bool(hit)


def _swap_experts(tensors: dict) -> bool:
    hit = False
    for n in [n for n in tensors if re.search(r"\.mixer\.experts\.0\.", n)]:
        other = n.replace(".experts.0.", ".experts.1.")
        if other in tensors:
            tensors[n], tensors[other] = tensors[other], tensors[n]
            hit = True
    return hit


def broken(work: Path, size: dict) -> dict:
    fp8 = quantized(work, "fp8", size)
    samples, seq = size["eval"]
    out = {}
    for label, change in (("mamba_in_proj_scales_x4", _scales_x4), ("experts_0_1_swapped", _swap_experts)):
        art = work / "broken" / label
        _rewrite_tensors(fp8, art, change)
        r = validated("tiny", art, work / "broken" / f"{label}.json", "--samples", str(samples),
                      "--seq-len", str(seq))
        out[label] = {**metrics(r), "format": r["format"], "passed": r["passed"]}
    return out


def drift(work: Path, size: dict) -> dict:
    samples, seq = size["drift"]
    out = {"samples": samples, "seq_len": seq}
    for name in ("fp8", "nvfp4"):
        r = validated("tiny", quantized(work, name, size), work / f"drift-{name}.json", "--positions",
                      "--samples", str(samples), "--seq-len", str(seq))
        out[name] = {bucket: {"kl_mean": b["kl_mean"], "top1_agreement": b["top1_agreement"]}
                     for bucket, b in r["positions"].items()}
    return out


def omni(work: Path, size: dict) -> dict:
    d = work / "omni"
    script("omni_calib_mix.py", "--media-samples", str(size["media"]), "--out", str(d),
           *(["--calib", *map(str, size["calib"]), "--eval", *map(str, size["eval"])] if size is QUICK else []))
    out = {}
    for k, label in enumerate(("text_only_calibration", "multimodal_calibration")):
        r = json.loads((d / f"report{k}.json").read_text())
        out[label] = {m: {"kl_mean": v["kl_mean"], "top1_agreement": v["top1_agreement"], "tokens": v["tokens"]}
                      for m, v in r["modalities"].items()}
    return out


def plan(work: Path, size: dict) -> dict:
    out = {}
    for recipe in PUBLISHED:
        d = json.loads(omniq("plan", str(CONFIG_30B), "--recipe", recipe, "--json").stdout)
        lm = d["size"]["language_model"]
        out[recipe] = {"layers": d["layers"], "GiB": lm["GiB"], "GB": lm["GB"],
                       "bits_per_weight": d["bits_per_weight"], "quant_algo": d["quant_algo"]}
    return out


def help(work: Path, size: dict) -> dict:  # noqa: A001 - the section's name
    best = None
    for _ in range(5):
        t0 = time.perf_counter()
        omniq("--help")
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return {"omniq_help_seconds_best_of_5": round(best, 3), "note": "includes the Python interpreter start"}


def timing(work: Path, size: dict) -> dict:
    if size is QUICK:
        return {"skipped": "--quick"}
    q = script("quantize_bench.py", "--models", "tiny", "--recipes", "fp8,nvfp4")
    lines = q.stdout.splitlines()
    starts = [k for k, line in enumerate(lines) if line == "{"]      # its last output: one indented JSON object
    last = ["\n".join(lines[starts[-1]:])] if starts else []
    v = work / "validate_throughput.json"
    script("validate_throughput.py", str(quantized(work, "nvfp4", size)), "--json", str(v))
    return {"quantize_bench": json.loads(last[-1]) if last else q.stdout[-2000:],
            "validate_throughput": json.loads(v.read_text()), "cpus": os.cpu_count(),
            "note": "wall-clock on a shared machine: noisy"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="everything small: proves the chain, not the README")
    ap.add_argument("--work", type=Path, help="keep artifacts and reports here (reused when present)")
    ap.add_argument("--json", type=Path, default=None, help=f"output [default: {DEFAULT_JSON.relative_to(ROOT)}; "
                                                             "--quick: WORK/figures.json]")
    ap.add_argument("--only", default=",".join(SECTIONS))
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    work = args.work or Path(tempfile.mkdtemp(prefix="omniq-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = args.json or (work / "figures.json" if args.quick else DEFAULT_JSON)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    result = {"command": "python benchmarks/figures.py" + (" --quick" if args.quick else ""),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    if out_path.is_file():            # a partial rerun (--only) keeps the other sections
        result = {**json.loads(out_path.read_text()), **result}
    for name in only:
        t0 = time.perf_counter()
        result[name] = globals()[name](work, size)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
