"""Artifacts for the validate tests, made once per session.

Real ModelOpt exports of the bundled model (made in a separate process, see make_artifacts.py; or, to save
the minutes on a busy machine, OMNIQ_TEST_ARTIFACTS=DIR made by `make_artifacts.py omniq/bundled/tiny DIR fp8
nvfp4 nvfp4-kv mixed --rows 4 --seq 128`), and
deliberately wrong variants of them edited tensor by tensor: weight scales multiplied by 4, two experts
swapped, another model, another tokenizer, a declaration that contradicts the tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
MADE = ("fp8", "nvfp4", "nvfp4-kv", "mixed")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    prebuilt = os.environ.get("OMNIQ_TEST_ARTIFACTS")     # a directory made by make_artifacts.py (same options)
    if prebuilt and all((Path(prebuilt) / name / "config.json").is_file() for name in MADE):
        return {name: Path(prebuilt) / name for name in MADE}
    out = tmp_path_factory.mktemp("artifacts")
    proc = subprocess.run([sys.executable, str(HERE / "make_artifacts.py"), str(tiny_dir), str(out), *MADE,
                           "--rows", "4", "--seq", "128"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: out / name for name in MADE}


def copy_with(src: Path, dest: Path, edit) -> Path:
    """Copy a checkpoint directory and rewrite its single safetensors file through `edit(tensors)`."""
    shutil.copytree(src, dest)
    files = sorted(dest.glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(str(files[0]))
    edit(tensors)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="session")
def broken_scales(artifacts, tmp_path_factory) -> Path:
    """The FP8 artifact with every weight_scale of the Mamba in_proj layers multiplied by 4."""

    def edit(t):
        for name in [n for n in t if n.endswith("mixer.in_proj.weight_scale")]:
            t[name] = t[name] * 4

    return copy_with(artifacts["fp8"], tmp_path_factory.mktemp("broken") / "fp8-scales-x4", edit)


@pytest.fixture(scope="session")
def swapped_experts(artifacts, tmp_path_factory) -> Path:
    """The FP8 artifact with routed experts 0 and 1 of every MoE layer swapped (all their tensors)."""

    def edit(t):
        for name in [n for n in t if ".experts.0." in n]:
            other = name.replace(".experts.0.", ".experts.1.")
            t[name], t[other] = t[other], t[name]

    return copy_with(artifacts["fp8"], tmp_path_factory.mktemp("broken") / "fp8-experts-swapped", edit)


@pytest.fixture(scope="session")
def other_tokenizer(artifacts, tmp_path_factory) -> Path:
    """The FP8 artifact with a tokenizer whose vocabulary gives two tokens each other's ids."""
    dest = tmp_path_factory.mktemp("other") / "fp8-other-tokenizer"
    shutil.copytree(artifacts["fp8"], dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (500, 501)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


@pytest.fixture(scope="session")
def other_model(tiny_dir, tmp_path_factory) -> Path:
    """A different (random, smaller) NemotronH with the same tokenizer: same layout rules, other config."""
    from omniq.model.arch import from_config

    dest = tmp_path_factory.mktemp("other") / "other-model"
    dest.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(hybrid_override_pattern="M*E", num_hidden_layers=3, n_routed_experts=8)
    arch = from_config(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {t.name: (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16) for t in arch.tensors}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, dest / f)
    return dest


@pytest.fixture(scope="session")
def misdeclared(artifacts, tmp_path_factory) -> Path:
    """The NVFP4 artifact whose hf_quant_config.json says FP8."""
    dest = tmp_path_factory.mktemp("other") / "nvfp4-declared-fp8"
    shutil.copytree(artifacts["nvfp4"], dest)
    hq = json.loads((dest / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "FP8"
    (dest / "hf_quant_config.json").write_text(json.dumps(hq))
    cfg = json.loads((dest / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest
