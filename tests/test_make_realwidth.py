"""scripts/make_realwidth.py: a hub-layout NemotronH of any pattern, sharded, that transformers loads and runs
(tested with the bundled tiny model's widths; the real widths are the same code with the default config)."""

import json
import subprocess
import sys

import torch

from reference_configs import REPO


def test_writes_a_sharded_checkpoint_transformers_runs(tmp_path, tiny_dir):
    out = tmp_path / "rw"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "make_realwidth.py"), str(out), "--pattern", "ME*M",
                        "--config", str(tiny_dir / "config.json"), "--shard-gb", "0.001"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "ME*M" and cfg["num_hidden_layers"] == 4
    from omniq.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(out))
    assert set(index["weight_map"]) == set(ckpt.arch.tensor_by_name)
    assert ckpt.headers["backbone.layers.1.mixer.gate.weight"].dtype == "F32"
    assert ckpt.headers["backbone.layers.0.mixer.in_proj.weight"].dtype == "BF16"
    from transformers import NemotronHForCausalLM

    m = NemotronHForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    ids = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0
