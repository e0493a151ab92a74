"""Probe: NVFP4 of the residual-rotated `tiny` (omniq.quant.rotation) against NVFP4 of `tiny` itself.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_rotation_probe.py --work DIR [--seeds 0]
        [--recipes nvfp4,R.yaml] [--rotation-seed 0] [--samples 8 --seq-len 256]

Writes DIR/tiny-rot (the bundled `tiny` with its residual stream rotated: same tensor names, shapes and
BF16 dtype; the function equal up to the BF16 rounding of the rotated weights), then for each recipe and
calibration seed `omniq quantize DIR/tiny-rot --recipe R --calib tiny-calib --calib-seed S` and `omniq
validate tiny ARTIFACT --eval eval|eval2` (the reference is the unrotated `tiny`), each in its own process.
Also validates tiny-rot itself (BF16: the rotation's own error). Prints mean KL per set; with --baseline
DIR2 the artifacts of `tiny` quantized with the same recipes and seeds there (nvfp4_quality.py's naming
`LABEL-sS`) are validated beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SETS = ("eval", "eval2")


def omniq(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "omniq.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"omniq {' '.join(map(str, args))} failed (rc {p.returncode}): {p.stderr.strip()[-1500:]}")
    return p.stdout


def make_rotated(out: Path, seed: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from omniq.model.checkpoint import BUNDLED_DIR, open_checkpoint
    from omniq.quant import rotation

    src = BUNDLED_DIR / "tiny"
    arch = open_checkpoint("tiny").arch
    rotation.check(arch)
    q = rotation.orthogonal(arch.hidden_size, seed)
    roles = rotation.roles(arch)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    for shard in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        new = {k: rotation.rotate_tensor(k, t, q, roles.get(k), tensors.__getitem__).contiguous()
               for k, t in tensors.items()}
        save_file(new, str(shard), metadata=meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def kl(art: Path, s: str, a, report: Path) -> dict:
    """KL against the unrotated `tiny`; the per-layer weight SQNR gate is off (a rotated weight is compared
    with the unrotated one there, so its SQNR says nothing)."""
    gates = a.work / "no-sqnr-gates.yaml"
    gates.write_text("nvfp4: {min_layer_sqnr_db: -100}\nfp8: {min_layer_sqnr_db: -100}\n")
    omniq("validate", "tiny", art, "--eval", s, "--samples", a.samples, "--seq-len", a.seq_len, "--report", report,
          "--max-kl", "10", "--min-top1", "0", "--max-ppl-ratio", "100", "--no-noise-floor", "--force",
          "--gates", gates)
    v = json.loads(report.read_text())
    return {k: v[k] for k in ("kl_mean", "top1_agreement")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--recipes", default="nvfp4")
    ap.add_argument("--rotation-seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rot = a.work / "tiny-rot"
    make_rotated(rot, a.rotation_seed)
    out = {"rotation_seed": a.rotation_seed, "bf16": {}, "points": {}}
    for s in SETS:
        out["bf16"][s] = kl(rot, s, a, a.work / f"tiny-rot.{s}.json")
    print(f"tiny-rot (BF16): KL eval {out['bf16']['eval']['kl_mean']:.3e} eval2 {out['bf16']['eval2']['kl_mean']:.3e}",
          flush=True)
    for recipe in a.recipes.split(","):
        label = Path(recipe).stem
        for seed in (int(x) for x in a.seeds.split(",")):
            art = a.work / f"rot-{label}-s{seed}"
            omniq("quantize", rot, "--recipe", recipe, "--out", art, "--force", "--calib", "tiny-calib",
                  "--calib-samples", a.calib_samples, "--calib-seq-len", 256, "--calib-seed", seed)
            r = {s: kl(art, s, a, a.work / f"{art.name}.{s}.json") for s in SETS}
            out["points"][f"{label} s{seed}"] = r
            print(f"rotated {label} seed {seed}: KL eval {r['eval']['kl_mean']:.3e} eval2 {r['eval2']['kl_mean']:.3e}"
                  f"; top-1 {r['eval']['top1_agreement']:.4f} / {r['eval2']['top1_agreement']:.4f}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
