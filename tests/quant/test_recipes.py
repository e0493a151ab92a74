"""Recipes as data: the named recipes pick the layers NVIDIA's releases describe, on every NemotronH layout,
and a bad recipe file is refused with a clear message."""

from pathlib import Path

import pytest
import yaml

from omniq.errors import OmniqError
from omniq.model.arch import from_config
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan

PUBLISHED = ("fp8", "nvfp4", "nano3-nvfp4", "omni-fp8", "omni-nvfp4", "nvfp4-experts", "nvfp4-experts-shared")


def _layout(real_config, pattern: str):
    return from_config(dict(real_config, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern)))


def _fmt(plan, name):
    return plan.formats[name]


def test_named_recipes_load():
    assert set(PUBLISHED) <= set(recipes.builtin_recipes())
    for name in PUBLISHED:
        r = recipes.load(name)
        assert r.name == name and r.description


@pytest.mark.parametrize("name, kv", [("nano3-nvfp4", "fp8"), ("omni-fp8", "fp8"), ("omni-nvfp4", "fp8"),
                                      ("nvfp4-experts", "none"), ("fp8", "none"), ("nvfp4", "none")])
def test_kv_cache_of_named_recipes(name, kv):
    # published-recipes.md: all three NVIDIA releases pair the weights with an FP8 KV cache
    assert recipes.load(name).kv_cache == kv


def test_kv_cache_override():
    r = recipes.load("nvfp4").with_kv_cache("fp8")
    assert r.kv_cache == "fp8" and r.name == "nvfp4"
    assert recipes.load("omni-fp8").with_kv_cache("none").kv_cache == "none"
    with pytest.raises(OmniqError, match="--kv-cache 'int8'"):
        recipes.load("fp8").with_kv_cache("int8")


# ----- layer choices on other layouts: derived from the pattern, never from indices -------------------------
DENSE = "M-M*-M*E"      # 0 M, 1 -, 2 M, 3 *, 4 -, 5 M, 6 *, 7 E


def test_nano3_nvfp4_on_a_layout_with_dense_mlp_layers(real_config):
    plan = make_plan(_layout(real_config, DENSE), recipes.load("nano3-nvfp4"))
    f = plan.formats
    # the Mamba layer directly before each attention layer (2 before 3, 5 before 6) stays BF16
    for i in (2, 5):
        assert f[f"backbone.layers.{i}.mixer.in_proj"] == f[f"backbone.layers.{i}.mixer.out_proj"] == "bf16"
    assert f["backbone.layers.0.mixer.in_proj"] == f["backbone.layers.0.mixer.out_proj"] == "nvfp4"
    for i in (3, 6):
        for p in "qkvo":
            assert f[f"backbone.layers.{i}.mixer.{p}_proj"] == "bf16"
    # dense MLP layers are "everything else that is linear": NVFP4
    for i in (1, 4):
        assert f[f"backbone.layers.{i}.mixer.up_proj"] == f[f"backbone.layers.{i}.mixer.down_proj"] == "nvfp4"
    assert f["backbone.layers.7.mixer.experts.0.up_proj"] == "nvfp4"
    assert f["backbone.layers.7.mixer.shared_experts.down_proj"] == "nvfp4"
    assert f["lm_head"] == "bf16"
    excl = plan.exclude_modules()
    assert {f"backbone.layers.{i}.mixer.conv1d" for i in (0, 2, 5)} <= set(excl)
    assert len(excl) == 1 + 2 * 2 + 2 * 4 + 3


def test_omni_nvfp4_on_a_layout_with_dense_mlp_layers(real_config):
    plan = make_plan(_layout(real_config, DENSE), recipes.load("omni-nvfp4"))
    f = plan.formats
    assert f["backbone.layers.7.mixer.experts.3.down_proj"] == "nvfp4"
    assert f["backbone.layers.7.mixer.shared_experts.up_proj"] == "fp8"
    for i in (0, 2, 5):
        assert f[f"backbone.layers.{i}.mixer.in_proj"] == f[f"backbone.layers.{i}.mixer.out_proj"] == "fp8"
    for i in (3, 6):
        assert [f[f"backbone.layers.{i}.mixer.{p}_proj"] for p in "qkvo"] == ["bf16", "bf16", "bf16", "fp8"]
    for i in (1, 4):   # always-active MLPs, like the shared experts
        assert f[f"backbone.layers.{i}.mixer.up_proj"] == "fp8"
    assert plan.quant_algo == "MIXED_PRECISION"


def test_nvfp4_experts_on_a_layout_with_dense_mlp_layers(real_config):
    arch = _layout(real_config, DENSE)
    only_routed = make_plan(arch, recipes.load("nvfp4-experts"))
    with_shared = make_plan(arch, recipes.load("nvfp4-experts-shared"))
    routed = {lin.name for lin in arch.linears if lin.role in ("expert_up", "expert_down")}
    shared = {lin.name for lin in arch.linears if lin.role in ("shared_up", "shared_down")}
    assert {lin.name for lin in only_routed.quantized} == routed
    assert {lin.name for lin in with_shared.quantized} == routed | shared
    assert only_routed.quant_algo == with_shared.quant_algo == "NVFP4"
    assert only_routed.formats["backbone.layers.1.mixer.up_proj"] == "bf16"


def test_attention_first_or_after_a_non_mamba_layer(real_config):
    # attention at 0 has no layer before it; attention at 3 follows an MoE layer: no Mamba layer feeds
    # them directly, so nano3-nvfp4 keeps only the attention projections BF16 there.
    plan = make_plan(_layout(real_config, "*MEE*M*E"), recipes.load("nano3-nvfp4"))
    assert plan.formats["backbone.layers.1.mixer.in_proj"] == "nvfp4"
    assert plan.formats["backbone.layers.5.mixer.in_proj"] == "bf16"      # 5 M feeds 6 *
    assert plan.formats["backbone.layers.0.mixer.q_proj"] == "bf16"


def test_transformers5_config_style_gives_the_same_plan(real_config):
    words = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
    t5 = dict(real_config)
    t5["layers_block_type"] = [words[c] for c in t5.pop("hybrid_override_pattern")]
    for name in ("nano3-nvfp4", "omni-nvfp4"):
        r = recipes.load(name)
        assert make_plan(from_config(t5), r).formats == make_plan(from_config(real_config), r).formats


def test_module_globs_in_user_recipes(tmp_path, real_config):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "mine", "default": "fp8", "rules": [
        {"modules": ["backbone.layers.1.mixer.experts.*"], "format": "nvfp4"}]}))
    plan = make_plan(from_config(real_config), recipes.load(str(p)))
    assert plan.formats["backbone.layers.1.mixer.experts.5.up_proj"] == "nvfp4"
    assert plan.formats["backbone.layers.3.mixer.experts.5.up_proj"] == "fp8"
    assert plan.counts["nvfp4"] == 2 * 128


# ----- validation ------------------------------------------------------------------------------------------
def _write(tmp_path: Path, data) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


BASE = {"name": "r", "default": "fp8"}


@pytest.mark.parametrize("data, message", [
    (dict(BASE, quantise="all"), "unknown key 'quantise'"),
    (dict(BASE, default="int4"), "default format 'int4' is unknown"),
    (dict(BASE, kv_cache="int8"), "kv_cache 'int8' is unknown"),
    (dict(BASE, rules=[{"select": ["attention"], "format": "fp4"}]), r"rules\[0\] format 'fp4' is unknown"),
    (dict(BASE, rules=[{"select": ["attention"]}]), r"rules\[0\] has no format"),
    (dict(BASE, rules=[{"select": ["attn"], "format": "bf16"}]), r"rules\[0\] selector 'attn' is unknown"),
    (dict(BASE, rules=[{"select": ["attention"], "format": "bf16", "layers": [1]}]),
     r"rules\[0\] has unknown key 'layers'"),
    (dict(BASE, rules=[{"format": "bf16"}]), r"rules\[0\] selects nothing"),
    (dict(BASE, rules=[{"select": ["lm_head"], "format": "fp8"}]), "quantizes lm_head"),
    (dict(BASE, rules="attention"), "rules must be a list"),
    ({"default": "fp8"}, "missing required key 'name'"),
    ({"name": "r"}, "missing required key 'default'"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_invalid_recipe_files(tmp_path, data, message):
    with pytest.raises(OmniqError, match=message) as e:
        recipes.load(_write(tmp_path, data))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("rule, message", [
    ({"modules": ["backbone.layers.*.mixer.gate_proj"], "format": "fp8"}, "matches no linear layer"),
    ({"modules": ["vision_model.*"], "format": "bf16"}, "matches no linear layer"),
    ({"modules": ["lm_head"], "format": "nvfp4"}, "quantizes lm_head"),
    # ModelOpt shares one input quantizer between the experts of a layer: quantize cannot split them
    ({"modules": ["backbone.layers.1.mixer.experts.7.*"], "format": "nvfp4"}, "routed experts of layer 1"),
])
def test_recipe_checked_against_the_model(tmp_path, real_config, rule, message):
    r = recipes.load(_write(tmp_path, dict(BASE, rules=[rule])))
    with pytest.raises(OmniqError, match=message) as e:
        make_plan(from_config(real_config), r)
    assert e.value.exit_code == 2


def test_a_broad_glob_may_cover_lm_head(tmp_path, real_config):
    r = recipes.load(_write(tmp_path, dict(BASE, default="bf16", rules=[{"modules": ["*"], "format": "fp8"}])))
    plan = make_plan(from_config(real_config), r)
    assert plan.formats["lm_head"] == "bf16" and plan.counts["fp8"] == len(plan.arch.linears) - 1


def test_unknown_recipe_name():
    with pytest.raises(OmniqError, match="unknown recipe 'nvfp5'.*nano3-nvfp4"):
        recipes.load("nvfp5")
    with pytest.raises(OmniqError, match="does not exist"):
        recipes.load("/nonexistent/recipe.yaml")


def test_selector_matching_nothing_is_a_warning_not_an_error(tmp_path, real_config):
    # Nano has no dense `-` layers: a rule for them decides nothing, which the plan reports
    r = recipes.load(_write(tmp_path, dict(BASE, rules=[{"select": ["mlp"], "format": "bf16"}])))
    plan = make_plan(from_config(real_config), r)
    assert plan.rule_counts == [0]
    assert len(plan.warnings) == 1 and "rules[0]" in plan.warnings[0]
    assert not make_plan(from_config(real_config), recipes.load("omni-nvfp4")).warnings
