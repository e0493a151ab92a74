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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.transformed_tiny import SETS, kl, omniq, write_transformed  # noqa: E402


def make_rotated(out: Path, seed: int) -> None:
    from omniq.model.checkpoint import open_checkpoint
    from omniq.quant import rotation

    arch = open_checkpoint("tiny").arch
    rotation.check(arch)
    q = rotation.orthogonal(arch.hidden_size, seed)
    roles = rotation.roles(arch)
    write_transformed(out, lambda k, t, read: rotation.rotate_tensor(k, t, q, roles.get(k), read))


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
