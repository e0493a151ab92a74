"""The ModelOpt config is the layer plan, on transformers' native quantizer names, and nothing else.

(That ModelOpt, given this config, enables exactly these quantizers on the real model is checked inside every
`quantize` run by `calibrate.check_calibrated`, exercised end to end in tests/export/test_quantize_e2e.py.)
"""

import fnmatch

import pytest

from omniq.errors import OmniqError
from omniq.model.arch import from_config
from omniq.quant import recipe as recipes
from omniq.quant.modelopt_config import FP8, NVFP4, enabled_quantizers, modelopt_config, quantizers_of
from omniq.quant.plan import make_plan

TINY = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hybrid_override_pattern": "MEM*EMEM*E",
        "hidden_size": 256, "vocab_size": 4096, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "mamba_num_heads": 8, "mamba_head_dim": 32, "ssm_state_size": 32, "n_groups": 2, "chunk_size": 64,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256, "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 512}


def _plan(recipe, kv=None, cfg=TINY):
    return make_plan(from_config(cfg), recipes.load(recipe).with_kv_cache(kv))


def _resolve(config, quantizers):
    """Apply the ordered entries the way ModelOpt does (fnmatch, later wins) to a list of quantizer names."""
    state = {q: None for q in quantizers}
    for e in config["quant_cfg"]:
        for q in quantizers:
            if fnmatch.fnmatch(q, e["quantizer_name"]):
                state[q] = e.get("cfg") if e["enable"] else None
    return state


def _all_quantizers(arch):
    """Every quantizer name ModelOpt 0.47 creates on transformers' NemotronH (observed with mtq.quantize)."""
    out = []
    for i, kind in enumerate(arch.kinds):
        p = f"model.layers.{i}.mixer"
        if kind == "M":
            for m in ("in_proj", "out_proj", "conv1d"):
                out += [f"{p}.{m}.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")]
        elif kind == "*":
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out += [f"{p}.{m}.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")]
            out += [f"{p}.{x}_bmm_quantizer" for x in "qkvp"]
        elif kind == "E":
            for proj in ("up_proj", "down_proj"):
                out.append(f"{p}.experts.{proj}_input_quantizer")
                out += [f"{p}.experts.{proj}_weight_quantizers.{e}" for e in range(arch.n_routed_experts)]
                out += [f"{p}.shared_experts.{proj}.{q}" for q in ("input_quantizer", "weight_quantizer",
                                                                   "output_quantizer")]
    out += [f"lm_head.{q}" for q in ("input_quantizer", "weight_quantizer", "output_quantizer")]
    return out


def test_fp8_enables_every_planned_linear_and_nothing_else():
    plan = _plan("fp8")
    cfg = modelopt_config(plan)
    assert cfg["algorithm"] == "max" and cfg["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}
    state = _resolve(cfg, _all_quantizers(plan.arch))
    on = {q for q, c in state.items() if c is not None}
    assert on == set(enabled_quantizers(plan))
    assert all(state[q] == FP8 for q in on)
    # what must never be quantized
    assert not any("conv1d" in q or "lm_head" in q or "bmm" in q or "output_quantizer" in q for q in on)
    # experts: one weight quantizer per expert, one shared input quantizer per projection and layer
    assert "model.layers.1.mixer.experts.up_proj_weight_quantizers.15" in on
    assert "model.layers.9.mixer.experts.down_proj_input_quantizer" in on
    # the 16 per-expert entries of a layer collapse into one wildcard entry
    names = [e["quantizer_name"] for e in cfg["quant_cfg"]]
    assert "model.layers.1.mixer.experts.up_proj_weight_quantizers.*" in names
    assert len(names) == len(set(names))


def test_expert_quantizer_names_map_hub_names():
    arch = from_config(TINY)
    lin = arch.linear_by_name["backbone.layers.4.mixer.experts.7.down_proj"]
    q = quantizers_of(lin)
    assert (q.weight, q.input) == ("model.layers.4.mixer.experts.down_proj_weight_quantizers.7",
                                   "model.layers.4.mixer.experts.down_proj_input_quantizer")
    lin = arch.linear_by_name["backbone.layers.3.mixer.o_proj"]
    assert quantizers_of(lin).weight == "model.layers.3.mixer.o_proj.weight_quantizer"


def test_mixed_plan_and_kv_cache():
    plan = _plan("nano3-nvfp4", kv="fp8")
    state = _resolve(modelopt_config(plan), _all_quantizers(plan.arch))
    on = {q for q, c in state.items() if c is not None}
    # attention and the Mamba layers feeding it stay BF16, exactly as the plan says
    assert not any(".layers.3.mixer." in q and "proj" in q for q in on)
    assert not any(q.startswith(("model.layers.2.", "model.layers.7.")) for q in on)
    assert state["model.layers.0.mixer.in_proj.weight_quantizer"] == NVFP4
    assert state["model.layers.3.mixer.k_bmm_quantizer"] == FP8
    assert state["model.layers.8.mixer.v_bmm_quantizer"] == FP8
    assert state["model.layers.3.mixer.q_bmm_quantizer"] is None and state["model.layers.3.mixer.p_bmm_quantizer"] is None
    # the config's quantized linears are exactly the plan's quantized linears
    planned = {q for lin in plan.quantized for q in (quantizers_of(lin).weight, quantizers_of(lin).input)}
    assert {q for q in on if "bmm" not in q} == planned


def test_real_model_config_is_compact():
    import json
    from pathlib import Path

    cfg = json.loads((Path(__file__).parents[1] / "data" / "nemotron-3-nano-30b-a3b.config.json").read_text())
    plan = make_plan(from_config(cfg), recipes.load("nano3-nvfp4"))
    entries = modelopt_config(plan)["quant_cfg"]
    # the deny-all entry + 17 Mamba x 2 x 2 + 23 MoE x (2 inputs + 2 expert wildcards + 4 shared) + 6 x K, V
    assert len(entries) == 1 + 17 * 4 + 23 * 8 + 6 * 2


def test_experts_of_one_layer_must_share_a_format(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: split-experts\ndefault: fp8\nrules:\n"
                 "  - modules: ['backbone.layers.1.mixer.experts.3.up_proj']\n    format: nvfp4\n")
    with pytest.raises(OmniqError, match="routed experts of layer 1"):
        make_plan(from_config(TINY), recipes.load(str(f)))
    from omniq.quant.plan import LayerPlan

    with pytest.raises(OmniqError, match="routed experts of layer 1"):   # a plan built around make_plan
        modelopt_config(LayerPlan(from_config(TINY), recipes.load(str(f))))
