"""What the probes of a function-preserving transform of `tiny` share (nvfp4_rotation_probe.py,
nvfp4_reorder_probe.py): writing the transformed checkpoint, running `omniq`, and validating an artifact
of it against the untransformed `tiny`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SETS = ("eval", "eval2")


def omniq(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "omniq.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"omniq {' '.join(map(str, args))} failed (rc {p.returncode}): {p.stderr.strip()[-1500:]}")
    return p.stdout


def write_transformed(out: Path, transform: Callable) -> None:
    """DIR `out`: the bundled tiny with each tensor t of its shards replaced by transform(name, t, read)
    (`read(name)` gives any tensor of the same shard, untransformed); written beside it, then renamed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from omniq.model.checkpoint import BUNDLED_DIR

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(BUNDLED_DIR / "tiny", tmp)
    for shard in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        new = {k: transform(k, t, tensors.__getitem__).contiguous() for k, t in tensors.items()}
        save_file(new, str(shard), metadata=meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def kl(art: Path, s: str, a, report: Path) -> dict:
    """KL of `art` against the untransformed `tiny` on eval set `s` (`a`: the probe's work, samples, seq_len);
    the per-layer weight SQNR gate is off (a transformed weight compared with the untransformed one says
    nothing)."""
    gates = a.work / "no-sqnr-gates.yaml"
    gates.write_text("nvfp4: {min_layer_sqnr_db: -100}\nfp8: {min_layer_sqnr_db: -100}\n")
    omniq("validate", "tiny", art, "--eval", s, "--samples", a.samples, "--seq-len", a.seq_len, "--report", report,
          "--max-kl", "10", "--min-top1", "0", "--max-ppl-ratio", "100", "--no-noise-floor", "--force",
          "--gates", gates)
    v = json.loads(report.read_text())
    return {k: v[k] for k in ("kl_mean", "top1_agreement")}
