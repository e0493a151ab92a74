"""The layer plan on the published 30B-A3B config, checked against what NVIDIA's releases contain
(shared/reference/published-recipes.md, omni-layout.md); the expected values are the documents' figures."""

import pytest

from omniq.errors import OmniqError
from omniq.model import omni
from omniq.model.arch import from_config
from omniq.quant import memory as mem
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan, weight_bytes
from omniq.quant.plan_report import group_names

GiB = 1024 ** 3


def _plan(cfg, name, prefix=""):
    return make_plan(from_config(cfg, prefix=prefix), recipes.load(name))


# NVIDIA's hf_quant_config.json of NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4, exclude_modules, written out from
# published-recipes.md ("Text Nano 3 NVFP4"): lm_head; in_proj/out_proj of layers 4, 11, 18, 25, 32, 41;
# q/k/v/o_proj of layers 5, 12, 19, 26, 33, 42; conv1d of every M layer of the pattern (23 entries).
NANO3_NVFP4_EXCLUDE = (
    ["lm_head"]
    + [f"backbone.layers.{i}.mixer.{p}" for i in (4, 11, 18, 25, 32, 41) for p in ("in_proj", "out_proj")]
    + [f"backbone.layers.{i}.mixer.{p}_proj" for i in (5, 12, 19, 26, 33, 42) for p in "qkvo"]
    + [f"backbone.layers.{i}.mixer.conv1d" for i in (0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 25, 28, 30, 32,
                                                       35, 37, 39, 41, 44, 46, 48, 50)]
)


def test_nano3_nvfp4_exclude_list_is_nvidias(real_config):
    assert len(NANO3_NVFP4_EXCLUDE) == 60
    plan = _plan(real_config, "nano3-nvfp4")
    excl = plan.exclude_modules()
    assert len(excl) == len(set(excl)) == 60
    assert set(excl) == set(NANO3_NVFP4_EXCLUDE)
    q = plan.hf_quant_config({"name": "modelopt"})["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["kv_cache_quant_algo"] == "FP8" and q["group_size"] == 16
    assert "quantized_layers" not in q
    # "Everything else that is linear is NVFP4 (routed and shared experts, the other 17 Mamba layers' in/out_proj)"
    assert plan.counts == {"bf16": 1 + 12 + 24, "fp8": 0, "nvfp4": 23 * 128 * 2 + 23 * 2 + 17 * 2}


def test_nano3_nvfp4_size(real_config):
    assert round(_plan(real_config, "nano3-nvfp4").total_bytes / GiB, 2) == 18.01


def test_omni_nvfp4_layers_and_size(real_config):
    plan = _plan(real_config, "omni-nvfp4", prefix=omni.LLM_PREFIX)
    q = plan.hf_quant_config()["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] == "FP8"
    layers = q["quantized_layers"]
    by_algo = {}
    for name, entry in layers.items():
        by_algo.setdefault(entry["quant_algo"], []).append(name)
    assert len(by_algo["NVFP4"]) == 5888 and len(by_algo["FP8"]) == 98 and set(by_algo) == {"NVFP4", "FP8"}
    assert all(e["group_size"] == 16 for e in layers.values() if e["quant_algo"] == "NVFP4")
    assert all(n.startswith("language_model.backbone.layers.") for n in layers)
    # 98 FP8 = 23 in_proj + 23 out_proj + 23 shared up_proj + 23 shared down_proj + 6 o_proj
    fp8 = by_algo["FP8"]
    for suffix, n in (("mixer.in_proj", 23), ("mixer.out_proj", 23), ("shared_experts.up_proj", 23),
                      ("shared_experts.down_proj", 23), ("mixer.o_proj", 6)):
        assert sum(x.endswith(suffix) for x in fp8) == n
    assert all(".mixer.experts." in x for x in by_algo["NVFP4"])
    size = plan.total_bytes
    assert round(size / GiB, 2) == 18.19 and round(size / 1e9, 2) == 19.53
    # + towers 2.7 GiB = the published 20.9 GiB
    assert round(size / GiB + 2.7, 1) == 20.9


def test_omni_nvfp4_keeps_qkv_and_lm_head_bf16_and_lists_towers(real_config):
    plan = _plan(real_config, "omni-nvfp4", prefix=omni.LLM_PREFIX)
    excl = plan.exclude_modules()
    assert "language_model.lm_head" in excl
    for i in (5, 12, 19, 26, 33, 42):
        for p in "qkv":
            assert f"language_model.backbone.layers.{i}.mixer.{p}_proj" in excl
        assert f"language_model.backbone.layers.{i}.mixer.o_proj" not in excl
    assert {"vision_model.*", "mlp1.*", "sound_encoder.*", "sound_projection.*"} <= set(excl)
    assert len(excl) == 1 + 18 + 23 + 4


def test_omni_fp8_size(real_config):
    plan = _plan(real_config, "omni-fp8", prefix=omni.LLM_PREFIX)
    assert round(plan.total_bytes / GiB, 2) == 30.09
    assert round(plan.total_bytes / GiB + 2.7, 1) == 32.8        # published Omni FP8 size
    # every linear layer except lm_head is FP8; the router is not a linear layer of the plan
    assert plan.quant_algo == "FP8" and plan.counts["bf16"] == 1 and plan.kv_cache == "fp8"
    assert not any("gate" in lin.name for lin in plan.quantized)


def test_plain_and_omni_plans_agree_up_to_the_prefix(real_config):
    for name in ("omni-fp8", "omni-nvfp4", "nano3-nvfp4"):
        a, b = _plan(real_config, name), _plan(real_config, name, prefix=omni.LLM_PREFIX)
        assert {omni.LLM_PREFIX + k: v for k, v in a.formats.items()} == b.formats
        assert a.total_bytes == b.total_bytes


def test_bf16_size_is_the_published_language_model(real_config):
    # omni-layout.md: "the language model alone 58.8 GiB"; 31.58 B parameters
    plan = _plan(real_config, "fp8")
    assert round(plan.original_bytes / GiB, 1) == 58.8
    assert round(plan.params / 1e9, 2) == 31.58
    # effective bits per weight from the published size and parameter count
    assert round(_plan(real_config, "nano3-nvfp4").bits_per_weight, 1) == round(18.01 * GiB * 8 / 31.58e9, 1)


def test_weight_bytes_follow_modelopts_export_layout():
    # modelopt-notes.md: FP8 weight F8_E4M3 + fp32 weight_scale + input_scale; NVFP4 U8 [out, in/2] +
    # F8_E4M3 weight_scale [out, in/16] + fp32 weight_scale_2 + fp32 input_scale
    assert weight_bytes("bf16", 32, 64) == 32 * 64 * 2
    assert weight_bytes("fp8", 32, 64) == 32 * 64 + 4 + 4
    assert weight_bytes("nvfp4", 32, 64) == 32 * 32 + 32 * 4 + 4 + 4


def test_kv_cache_scales_counted(real_config):
    with_kv = make_plan(from_config(real_config), recipes.load("fp8").with_kv_cache("fp8"))
    without = make_plan(from_config(real_config), recipes.load("fp8"))
    # k_proj.k_scale and v_proj.v_scale (fp32 scalars) per attention layer
    assert with_kv.total_bytes - without.total_bytes == 6 * 2 * 4
    assert len(with_kv.kv_scale_tensors) == 12


def test_rule_counts(real_config):
    plan = _plan(real_config, "omni-nvfp4")
    assert plan.rule_counts == [5888, 98]
    assert sum(1 for i in plan.decided_by.values() if i is None) == 19


# ----- compact display --------------------------------------------------------------------------------------
def test_group_names():
    names = [f"backbone.layers.{i}.mixer.{p}" for i in (4, 11, 18) for p in ("in_proj", "out_proj")]
    assert group_names(names) == [("backbone.layers.{4,11,18}.mixer.{in_proj,out_proj}", 6)]
    experts = [f"backbone.layers.{i}.mixer.experts.{e}.up_proj" for i in (1, 3) for e in range(128)]
    assert group_names(experts) == [("backbone.layers.{1,3}.mixer.experts.{0..127}.up_proj", 256)]
    assert group_names(["lm_head", "vision_model.*", "backbone.layers.5.mixer.q_proj"]) == [
        ("lm_head", 1), ("vision_model.*", 1), ("backbone.layers.5.mixer.q_proj", 1)]
    assert group_names(NANO3_NVFP4_EXCLUDE) == [
        ("lm_head", 1),
        ("backbone.layers.{4,11,18,25,32,41}.mixer.{in_proj,out_proj}", 12),
        ("backbone.layers.{5,12,19,26,33,42}.mixer.{q_proj,k_proj,v_proj,o_proj}", 24),
        ("backbone.layers.{0,2,4,7,9,11,14,16,18,21,23,25,28,30,32,35,37,39,41,44,46,48,50}.mixer.conv1d", 23),
    ]
    assert group_names([f"a.{i}.b" for i in (0, 1, 2, 5, 7, 8)]) == [("a.{0..2,5,7,8}.b", 6)]


# ----- calibration memory ------------------------------------------------------------------------------------
def test_memory_weights_are_the_bf16_model(real_config):
    plan = _plan(real_config, "omni-nvfp4")
    est = mem.estimate(plan, batch=1, seq_len=2048, device="h200")
    assert round(est.weights / GiB, 1) == 58.8          # omni-layout.md: language model alone 58.8 GiB
    fp32 = mem.estimate(plan, batch=1, seq_len=2048, device="h200", dtype="fp32")
    assert round(fp32.weights / est.weights, 2) == 2.0
    towers = mem.estimate(plan, device="h200", extra_weight_bytes=mem.parse_size("2.7GiB"))
    assert round((towers.weights - est.weights) / GiB, 2) == 2.7
    assert est.total == est.weights + est.quantizer_state + est.activations + est.overhead
    assert est.device_bytes == 141 * GiB and est.fits is True


def test_memory_activations_scale_with_tokens(real_config):
    plan = _plan(real_config, "nano3-nvfp4")
    a = mem.estimate(plan, batch=1, seq_len=1024, device="h100")
    b = mem.estimate(plan, batch=4, seq_len=1024, device="h100")
    # logits: vocab x tokens, in bf16 from lm_head and their fp32 copy; calibration keeps one position per row
    assert a.activation_parts["logits"] == 131072 * 1 * (2 + 4)
    assert b.activation_parts["logits"] == 4 * a.activation_parts["logits"]
    every = mem.estimate(plan, batch=1, seq_len=1024, device="h100", logits_positions=None)
    assert every.activation_parts["logits"] == 131072 * 1024 * (2 + 4)
    assert every.activations > a.activations
    assert b.activation_parts["hidden_states"] == 4 * a.activation_parts["hidden_states"]
    assert b.activations > 3.9 * a.activations
    assert b.weights == a.weights
    huge = mem.estimate(plan, batch=64, seq_len=8192, device="h100")
    assert huge.fits is False and huge.headroom < 0


def test_memory_devices_and_sizes(real_config):
    plan = _plan(real_config, "fp8")
    assert mem.estimate(plan, device="cpu").device_bytes > 0
    assert mem.estimate(plan, device="b200").device_bytes == 180 * GiB
    assert mem.estimate(plan, device="x", device_memory="96GiB").device_bytes == 96 * GiB
    assert mem.parse_size("141 GB") == 141 * 10 ** 9
    assert mem.parse_size("2.7G") == int(2.7 * GiB)
    assert mem.parse_size("80") == 80 * GiB
    assert mem.parse_size("512MiB") == 512 * 1024 ** 2
    with pytest.raises(OmniqError, match="unknown device"):
        mem.estimate(plan, device="tpu-v5")
    with pytest.raises(OmniqError, match="expected a number"):
        mem.parse_size("lots")
    with pytest.raises(OmniqError, match="must be positive"):
        mem.estimate(plan, batch=0)
