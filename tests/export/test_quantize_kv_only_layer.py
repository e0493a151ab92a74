"""A layer whose only quantizers are the KV cache's (nano3-nvfp4: BF16 attention under an FP8 KV cache) quantizes
in the layer-streamed export: ModelOpt's check that the config's weight quantizers matched some module is
skipped for that layer's one-layer shell only (omniq.export.streamed.calibrate_layer)."""

import json
import os

import torch

from conftest import run_cli_in_subprocess
from omniq.model.checkpoint import open_checkpoint


def test_nano3_nvfp4_quantizes_with_kv_only_attention_layers(tmp_path, tiny_dir):
    out = tmp_path / "n3"
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", "nano3-nvfp4", "--out", str(out),
                                 "--calib-samples", "4", "--calib-seq-len", "64"])
    assert run["rc"] == 0, run["stderr"][-2000:]
    arch = open_checkpoint(str(tiny_dir)).arch
    got = open_checkpoint(str(out)).read()
    modules = json.loads((out / "omniq.json").read_text())["modules"]
    for i in arch.attention_layers:
        p = f"{arch.layer_prefix(i)}.mixer"
        assert got[f"{p}.q_proj.weight"].dtype == torch.bfloat16 and modules[f"{p}.q_proj"] == "bf16"
        for kv in ("k", "v"):
            s = got[f"{p}.{kv}_proj.{kv}_scale"]
            assert s.dtype == torch.float32 and float(s) > 0


def test_the_skip_is_for_one_call(monkeypatch):
    from omniq.export.streamed import _skip_weight_check

    key = "MODELOPT_SKIP_WEIGHT_QUANT_CHECK"
    monkeypatch.delenv(key, raising=False)
    with _skip_weight_check(True):
        assert os.environ[key] == "1"
    assert key not in os.environ
    with _skip_weight_check(False):
        assert key not in os.environ
