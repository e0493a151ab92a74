"""`omniq plan` end to end: on the published config (file and config-only directory), a config-only Omni
directory, a checkpoint with towers read from its safetensors headers, and the bundled tiny model."""

import json
import struct
import time
from pathlib import Path

import pytest

from omniq.cli import main
from reference_configs import DATA, omni_config

CONFIG = DATA / "nemotron-3-nano-30b-a3b.config.json"
GiB = 1024 ** 3


def run_json(capsys, *args) -> dict:
    code = main(["plan", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def run_error(capsys, *args) -> str:
    code = main(["plan", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("omniq: error: ")
    return err


def test_plan_from_a_config_file(capsys):
    s = run_json(capsys, CONFIG, "--recipe", "omni-nvfp4")
    assert s["source"]["kind"] == "config" and not s["source"]["omni"]
    assert s["layers"]["nvfp4"] == 5888 and s["layers"]["fp8"] == 98
    assert s["size"]["language_model"]["GiB"] == pytest.approx(18.19, abs=0.005)
    assert s["size"]["language_model"]["GB"] == pytest.approx(19.53, abs=0.005)
    q = s["hf_quant_config"]["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and len(q["quantized_layers"]) == 5888 + 98
    assert s["memory"]["peak_bytes"] > s["memory"]["weights_bytes"] > 58 * GiB


def test_plan_from_a_config_only_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text(CONFIG.read_text())
    s = run_json(capsys, tmp_path, "--recipe", "nano3-nvfp4")
    assert s["source"]["kind"] == "config" and s["source"]["stored_bytes"] is None
    assert s["size"]["language_model"]["GiB"] == pytest.approx(18.01, abs=0.005)
    assert len(s["hf_quant_config"]["quantization"]["exclude_modules"]) == 60
    s = run_json(capsys, tmp_path, "--recipe", "omni-fp8")
    assert s["size"]["language_model"]["GiB"] == pytest.approx(30.09, abs=0.005)


def test_options(capsys):
    s = run_json(capsys, CONFIG, "-r", "nvfp4", "--kv-cache", "fp8", "--batch", "2", "--seq-len", "512",
                 "--device", "b200")
    assert s["kv_cache"] == "fp8" and s["hf_quant_config"]["quantization"]["kv_cache_quant_algo"] == "FP8"
    m = s["memory"]
    assert (m["batch"], m["seq_len"], m["device"], m["device_bytes"]) == (2, 512, "b200", 180 * GiB)
    assert m["fits"] is True
    s = run_json(capsys, CONFIG, "-r", "omni-fp8", "--kv-cache", "none", "--device-memory", "24GiB",
                 "--load-dtype", "fp32")
    assert s["kv_cache"] is None and s["hf_quant_config"]["quantization"]["kv_cache_quant_algo"] is None
    assert s["memory"]["device_bytes"] == 24 * GiB and s["memory"]["fits"] is False
    assert s["memory"]["weights_bytes"] > 117 * GiB


def test_table_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", str(CONFIG), "--recipe", "nano3-nvfp4", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.{4,11,18,25,32,41}.mixer.{in_proj,out_proj}" in out
    assert "backbone.layers.{5,12,19,26,33,42}.mixer.{q_proj,k_proj,v_proj,o_proj}" in out
    assert "exclude_modules (60)" in out and "18.01" in out and "19.34" in out
    assert "h100" in out and "fits" in out


def test_omni_config_only_directory(capsys, omni_config_dir, monkeypatch):
    s = run_json(capsys, omni_config_dir, "--recipe", "omni-nvfp4")
    assert s["source"]["omni"] and s["model"]["prefix"] == "language_model."
    q = s["hf_quant_config"]["quantization"]
    assert all(n.startswith("language_model.backbone.layers.") for n in q["quantized_layers"])
    excl = q["exclude_modules"]
    assert "language_model.lm_head" in excl and "language_model.backbone.layers.5.mixer.q_proj" in excl
    assert {"vision_model.*", "mlp1.*", "sound_encoder.*", "sound_projection.*"} <= set(excl)
    assert not any(n.startswith("backbone.") or n == "lm_head" for n in excl)
    # tower sizes cannot be known without weights
    assert s["size"]["towers"] is None and s["size"]["total"] is None
    assert "unknown without weights" in s["towers_note"] and s["memory"]["towers_included"] is False
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", str(omni_config_dir), "--recipe", "omni-nvfp4"]) == 0
    assert "towers: unknown without weights" in capsys.readouterr().out
    # given the tower size, the totals are the published ones (omni-layout.md / published-recipes.md)
    s = run_json(capsys, omni_config_dir, "--recipe", "omni-nvfp4", "--tower-bytes", "2.7GiB")
    assert round(s["size"]["total"]["GiB"], 1) == 20.9 and s["memory"]["towers_included"] is True
    s = run_json(capsys, omni_config_dir, "--recipe", "omni-fp8", "--tower-bytes", "2.7GiB")
    assert round(s["size"]["total"]["GiB"], 1) == 32.8


# ----- a checkpoint directory: headers only ------------------------------------------------------------------
SMALL = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hybrid_override_pattern": "MEM*E",
    "num_hidden_layers": 5, "hidden_size": 64, "vocab_size": 256, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16,
    "n_groups": 1, "conv_kernel": 4, "chunk_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 64,
}
# tower tensors (names per omni-layout.md's prefixes) and their BF16 bytes, written out by hand
TOWERS = {
    "vision_model.radio_model.blocks.0.attn.qkv.weight": ("BF16", [96, 32], 96 * 32 * 2),
    "mlp1.1.weight": ("BF16", [64, 128], 64 * 128 * 2),
    "sound_encoder.encoder.layers.0.linear.weight": ("BF16", [32, 32], 32 * 32 * 2),
    "sound_projection.linear1.weight": ("F32", [64, 32], 64 * 32 * 4),
}
SIZES = {"BF16": 2, "F32": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file of zeros, written byte by byte (no torch)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = SIZES[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def omni_checkpoint(tmp_path) -> Path:
    from omniq.model.arch import from_config

    (tmp_path / "config.json").write_text(json.dumps(omni_config(SMALL)))
    lm = {t.name: (t.dtype, list(t.shape)) for t in from_config(SMALL, prefix="language_model.").tensors}
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", lm)
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {k: v[:2] for k, v in TOWERS.items()})
    return tmp_path


def test_omni_checkpoint_reads_towers_from_headers(capsys, omni_checkpoint, monkeypatch):
    from omniq.model.checkpoint import Checkpoint

    def no_loading(*a, **k):
        raise AssertionError("plan must not load tensors")

    monkeypatch.setattr(Checkpoint, "read", no_loading)
    monkeypatch.setattr("safetensors.safe_open", no_loading)
    s = run_json(capsys, omni_checkpoint, "--recipe", "omni-nvfp4")
    assert s["source"]["kind"] == "checkpoint" and s["source"]["omni"]
    towers = sum(b for _, _, b in TOWERS.values())
    assert s["size"]["towers"]["bytes"] == towers
    assert s["size"]["passthrough_by_component"] == {
        "vision_tower": 96 * 32 * 2, "vision_projector": 64 * 128 * 2, "audio_encoder": 32 * 32 * 2,
        "audio_projector": 64 * 32 * 4}
    assert s["size"]["total"]["bytes"] == s["size"]["language_model"]["bytes"] + towers
    assert s["memory"]["towers_included"] and s["towers_note"] is None
    # stored bytes: every tensor of both shards
    assert s["source"]["stored_bytes"] == s["size"]["language_model_bf16"]["bytes"] + towers
    q = s["hf_quant_config"]["quantization"]
    assert set(q["quantized_layers"]) == {f"language_model.backbone.layers.1.mixer.experts.{e}.{p}"
                                          for e in range(4) for p in ("up_proj", "down_proj")} | {
        "language_model.backbone.layers.4.mixer.experts.%d.%s" % (e, p)
        for e in range(4) for p in ("up_proj", "down_proj")} | {
        f"language_model.backbone.layers.{i}.mixer.{p}" for i in (0, 2) for p in ("in_proj", "out_proj")} | {
        f"language_model.backbone.layers.{i}.mixer.shared_experts.{p}" for i in (1, 4)
        for p in ("up_proj", "down_proj")} | {"language_model.backbone.layers.3.mixer.o_proj"}


def test_checkpoint_that_does_not_match_its_config(capsys, omni_checkpoint):
    cfg = json.loads((omni_checkpoint / "config.json").read_text())
    cfg["llm_config"]["moe_intermediate_size"] = 48
    (omni_checkpoint / "config.json").write_text(json.dumps(cfg))
    assert "config and weights do not match" in run_error(capsys, omni_checkpoint, "--recipe", "omni-nvfp4")


def test_tiny(capsys, tiny_dir):
    s = run_json(capsys, "tiny", "--recipe", "nvfp4")
    assert s["source"]["kind"] == "checkpoint" and not s["source"]["omni"]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    n_linear = sum({"M": 2, "*": 4, "E": 2 * cfg["n_routed_experts"] + 2, "-": 2}[c]
                   for c in cfg["hybrid_override_pattern"]) + 1
    assert s["layers"] == {"bf16": 1, "fp8": 0, "nvfp4": n_linear - 1, "total": n_linear}
    # the plan's BF16 size is what the bundled safetensors hold
    stored = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
    assert s["source"]["stored_bytes"] <= stored < s["source"]["stored_bytes"] + 64 * 1024
    assert s["size"]["language_model_bf16"]["bytes"] == s["source"]["stored_bytes"]
    # NVFP4: 4 bits per weight, one E4M3 scale per 16, and two fp32 scalars per layer (modelopt-notes.md)
    n = s["params_by_format"]["nvfp4"]
    assert s["bytes_by_format"]["nvfp4"] == n // 2 + n // 16 + 8 * s["layers"]["nvfp4"]
    assert s["size"]["language_model"]["bytes"] < s["source"]["stored_bytes"] / 2
    assert main(["plan", "tiny", "--recipe", "omni-nvfp4"]) == 0
    assert "quantized_layers" in capsys.readouterr().out


# ----- errors: one line, exit 2 ----------------------------------------------------------------------------
def test_errors(capsys, tmp_path):
    assert "unknown recipe 'nvfp5'" in run_error(capsys, CONFIG, "--recipe", "nvfp5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndefault: fp8\nquantize_everything: true\n")
    assert "unknown key 'quantize_everything'" in run_error(capsys, CONFIG, "--recipe", bad)
    bad.write_text("name: bad\ndefault: fp8\nrules:\n  - modules: ['backbone.layers.*.mlp.*']\n    format: bf16\n")
    assert "matches no linear layer" in run_error(capsys, CONFIG, "--recipe", bad)
    bad.write_text("name: bad\ndefault: fp8\nrules:\n  - select: [lm_head]\n    format: nvfp4\n")
    assert "quantizes lm_head" in run_error(capsys, CONFIG, "--recipe", bad)
    bad.write_text("name: bad\ndefault: fp6\n")
    assert "default format 'fp6' is unknown" in run_error(capsys, CONFIG, "--recipe", bad)
    assert "no such config file" in run_error(capsys, tmp_path / "nowhere", "--recipe", "fp8")
    assert "--kv-cache 'int8'" in run_error(capsys, CONFIG, "--recipe", "fp8", "--kv-cache", "int8")
    assert "unknown device" in run_error(capsys, CONFIG, "--recipe", "fp8", "--device", "tpu")
    assert "Omni checkpoints only" in run_error(capsys, CONFIG, "--recipe", "fp8", "--tower-bytes", "2GiB")
    (tmp_path / "notnemotron.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert "unsupported architecture" in run_error(capsys, tmp_path / "notnemotron.json", "--recipe", "fp8")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in run_error(capsys, empty, "--recipe", "fp8")


def test_config_only_plan_is_fast_and_loads_no_weights(tmp_path):
    """A fresh process: the whole plan without torch, safetensors or transformers, in a few seconds."""
    from cli_subprocess import cli_imports

    t0 = time.monotonic()
    r = cli_imports([["plan", str(CONFIG), "--recipe", "omni-nvfp4", "--json"]],
                    ("torch", "safetensors", "transformers", "modelopt"))
    elapsed = time.monotonic() - t0
    assert r["rcs"] == [0] and r["heavy"] == []
    assert json.loads(r["stdout"])["layers"]["nvfp4"] == 5888
    assert elapsed < 10


def test_memory_defaults_are_what_quantize_calibrates_with(capsys):
    import inspect

    from omniq.quant import calibrate, plan_report
    from omniq.commands import quantize

    assert inspect.signature(quantize.quantize).parameters["calib_seq_len"].default == plan_report.CALIB_SEQ_LEN
    assert inspect.signature(quantize.quantize).parameters["calib_samples"].default == plan_report.QUANTIZE_SAMPLES
    doc = run_json(capsys, CONFIG, "--recipe", "fp8")
    m = doc["memory"]
    assert (m["batch"], m["seq_len"]) == (calibrate.BATCH_SIZE, plan_report.CALIB_SEQ_LEN)
    st = doc["memory_streamed"]       # what quantize's preflight compares with the memory limit
    assert (st["samples"], st["seq_len"]) == (plan_report.QUANTIZE_SAMPLES, plan_report.CALIB_SEQ_LEN)
    assert 0 < st["peak_bytes"] < m["peak_bytes"]


def test_bundled_omni_checkpoint(capsys):
    from omniq.model.checkpoint import bundled_names, resolve

    if "tiny-omni" not in bundled_names():
        pytest.skip("the bundled tiny-omni checkpoint is not in this tree")
    path = resolve("tiny-omni")
    towers = lm = 0
    for f in path.glob("*.safetensors"):          # the headers, read here by hand
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            if name.startswith("language_model."):
                lm += size
            else:
                towers += size
    s = run_json(capsys, "tiny-omni", "--recipe", "omni-nvfp4")
    assert s["source"]["omni"] and s["size"]["towers"]["bytes"] == towers
    assert s["size"]["language_model_bf16"]["bytes"] == lm
    assert s["size"]["total"]["bytes"] == s["size"]["language_model"]["bytes"] + towers
    assert all(n.startswith("language_model.") for n in s["hf_quant_config"]["quantization"]["quantized_layers"])
