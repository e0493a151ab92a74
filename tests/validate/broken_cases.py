"""Deliberately broken copies of a quantized checkpoint, edited tensor by tensor: the held-back cases the
default gates are calibrated against (tests/validate/test_gates.py, benchmarks/gate_cases.py).

    scales-x4        every weight scale of the Mamba in_proj layers x4 (FP8 weight_scale; NVFP4 weight_scale_2)
    experts-swapped  routed experts 0 and 1 of every MoE layer swapped (all their tensors)
    expert-transposed  routed expert 2's up_proj stored transposed in every MoE layer (FP8 only: a packed
                     NVFP4 weight cannot be transposed in place); a non-square model refuses it on shape
    expert-zeroed    routed expert 2's weights all zero in every MoE layer (codes 0, scales kept)
    kv-scale-x8      every k_scale x8 (needs an FP8 KV cache)

When the directory holds omniq's manifest, omniq.json is rewritten with the new sha256 (checksums made
consistent, so only the numbers can tell).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "omniq.json"


def _scales_x4(t: dict) -> None:
    names = [n for n in t if n.endswith("mixer.in_proj.weight_scale_2")] or \
            [n for n in t if n.endswith("mixer.in_proj.weight_scale")]
    assert names, "no Mamba in_proj scales"
    for n in names:
        t[n] = t[n] * 4


def _swap(t: dict) -> None:
    names = [n for n in t if ".experts.0." in n]
    assert names, "no routed experts"
    for n in names:
        other = n.replace(".experts.0.", ".experts.1.")
        t[n], t[other] = t[other], t[n]


def _transpose(t: dict) -> None:
    names = [n for n in t if ".experts.2." in n and n.endswith(".up_proj.weight")]
    assert names and all(t[n].dtype == torch.float8_e4m3fn for n in names), "needs FP8 routed experts"
    for n in names:
        t[n] = t[n].t().contiguous()


def _zero(t: dict) -> None:
    names = [n for n in t if ".experts.2." in n and n.endswith(".weight")]
    assert names, "no routed experts"
    for n in names:
        t[n] = torch.zeros_like(t[n].view(torch.uint8)).view(t[n].dtype)


def _kv_x8(t: dict) -> None:
    names = [n for n in t if n.endswith(".k_scale")]
    assert names, "no FP8 KV cache scales"
    for n in names:
        t[n] = t[n] * 8


CASES = {"scales-x4": _scales_x4, "experts-swapped": _swap, "expert-transposed": _transpose,
         "expert-zeroed": _zero, "kv-scale-x8": _kv_x8}


def make(src: Path, dest: Path, case: str) -> Path:
    """A copy of `src` with one case's edit (its single safetensors file rewritten)."""
    shutil.copytree(src, dest)
    files = sorted(dest.glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(str(files[0]))
    CASES[case](tensors)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    m = dest / MANIFEST
    if m.is_file():
        from omniq.checksums import sha256_file

        manifest = json.loads(m.read_text())
        manifest["files"][files[0].name] = sha256_file(files[0])
        m.write_text(json.dumps(manifest, indent=2) + "\n")
    return dest
