"""Task accuracy of the bundled model's FP8 and NVFP4 artifacts (`omniq eval`), the figures of docs/eval.md.

    python benchmarks/eval_figures.py [--artifact fp8=DIR --artifact nvfp4=DIR] [--limit N] [--broken]
                                      [--calib-samples 16 --calib-seq-len 128] [--out JSON]

For each recipe (default fp8 and nvfp4) it uses the given artifact or makes one with `omniq quantize tiny
--recipe R` (the calibration size given), then runs `omniq eval tiny ARTIFACT --tasks omniq-docstring-cloze`
(every example unless --limit); `--broken` adds `fp8-scales-x4`, a copy of the fp8 artifact with every
Mamba in_proj weight scale x4 (the broken case of tests/validate/conftest.py), which the gate must fail.
It prints per artifact: reference and candidate accuracy with lm-eval's
standard errors, delta, recovery, the gate, and the eval's wall time (a shared 2-core machine: noisy).
Writes the eval.json reports' figures, the artifacts' calibration and the commands to --out
(default benchmarks/results/eval_figures.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "omniq-docstring-cloze"


def broken_copy(src: Path, dst: Path) -> str:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        for k in [k for k in t if k.endswith("mixer.in_proj.weight_scale")]:
            t[k] = t[k] * 4
        save_file(t, str(f), metadata={"format": "pt"})
    return str(dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", default=[], help="RECIPE=DIR: use this artifact")
    ap.add_argument("--recipes", default="fp8,nvfp4")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--broken", action="store_true", help="also the fp8 artifact with in_proj scales x4")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "eval_figures.json")
    a = ap.parse_args(argv)
    given = dict(x.split("=", 1) for x in a.artifact)
    omniq = [sys.executable, "-m", "omniq.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes.split(",") + (["fp8-scales-x4"] if a.broken else []):
            art = given.get(recipe)
            made = None
            if recipe == "fp8-scales-x4":
                art = broken_copy(Path(given.get("fp8") or Path(tmp) / "fp8"), Path(tmp) / recipe)
                made = ["fp8 artifact, every mixer.in_proj.weight_scale x4"]
            elif art is None:
                art = str(Path(tmp) / recipe)
                made = [*omniq, "quantize", "tiny", "--recipe", recipe, "--out", art, "--calib-samples",
                        str(a.calib_samples), "--calib-seq-len", str(a.calib_seq_len)]
                subprocess.run(made, check=True, capture_output=True)
            report = Path(tmp) / f"eval-{recipe}.json"
            cmd = [*omniq, "eval", "tiny", art, "--tasks", TASK, "--out", str(report)]
            if a.limit:
                cmd += ["--limit", str(a.limit)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if p.returncode not in (0, 1):
                sys.stderr.write(p.stderr)
                return p.returncode
            doc = json.loads(report.read_text())
            mpath = Path(art) / "omniq.json"
            manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
            cal = {k: v for k, v in (manifest.get("calibration") or {}).items() if k != "sample_sha256"}
            rows.append({"recipe": recipe, "exit_code": p.returncode, "seconds": round(seconds, 1),
                         "calibration": cal, "quantize": made and " ".join(made[2:] or made).replace(art, "OUT"),
                         "eval": " ".join(cmd[2:]).replace(art, "ARTIFACT").replace(str(report), "eval.json"),
                         **doc["tasks"][TASK], "lm_eval": doc["lm_eval"]})
    print(f"omniq eval on {TASK} (bundled tiny as the reference; acc ± lm-eval stderr):")
    print(f"{'artifact':13} {'n':>4} {'reference':>14} {'candidate':>14} {'delta':>15} {'recovery':>9} "
          f"{'gate':>5} {'s':>6}")
    for r in rows:
        print(f"{r['recipe']:13} {r['samples']:>4} {r['reference']:.3f} ± {r['reference_stderr']:.3f} "
              f"{r['candidate']:.3f} ± {r['candidate_stderr']:.3f} {r['delta']:+.3f} ± {r['delta_stderr']:.3f} "
              f"{r['recovery']:>9.3f} {'pass' if r['passed'] else 'FAIL':>5} {r['seconds']:>6.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"task": TASK, "limit": a.limit, "rows": rows}, indent=1) + "\n")
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
