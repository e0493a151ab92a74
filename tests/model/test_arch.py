"""NemotronH layout derived from a config: checked against facts of the published 30B-A3B model."""

import pytest

from omniq.errors import OmniqError
from omniq.model.arch import from_config, native_name


def test_real_config_layout(real_config):
    a = from_config(real_config)
    # shared/reference/omni-layout.md: derived sizes of the language model
    assert len(a.layers_of("M")) == 23 and len(a.layers_of("E")) == 23 and len(a.layers_of("*")) == 6
    assert a.attention_layers == [5, 12, 19, 26, 33, 42]
    assert a.mamba_feeding_attention == [4, 11, 18, 25, 32, 41]
    assert a.mamba_inner == 4096 and a.conv_dim == 6144 and a.in_proj_out == 10304
    assert round(a.num_params / 1e9, 2) == 31.58
    assert round(a.params_by_component()["routed_experts"] / 1e9, 2) == 29.37


def test_both_config_styles_agree(real_config):
    words = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
    t5 = dict(real_config)
    t5["layers_block_type"] = [words[c] for c in t5.pop("hybrid_override_pattern")]
    assert from_config(t5).kinds == from_config(real_config).kinds
    t5["layers_block_type"] = ["linear_attention" if w == "mamba" else w for w in t5["layers_block_type"]]
    assert from_config(t5).kinds == from_config(real_config).kinds


def test_linear_names_are_hub_layout(real_config):
    a = from_config(real_config)
    names = {lin.name for lin in a.linears}
    assert "backbone.layers.1.mixer.experts.127.down_proj" in names
    assert "backbone.layers.1.mixer.shared_experts.up_proj" in names
    assert "backbone.layers.5.mixer.q_proj" in names and "lm_head" in names
    assert not any("gate" in n or "conv1d" in n for n in names)  # router and conv1d are not linear layers
    assert native_name("backbone.layers.1.mixer.experts.7.up_proj") == "model.layers.1.mixer.experts"
    assert native_name("language_model.backbone.layers.0.mixer.in_proj", "language_model.") == \
        "model.layers.0.mixer.in_proj"


def test_dense_mlp_layers(real_config):
    cfg = dict(real_config, hybrid_override_pattern="M-M*-E", num_hidden_layers=6)
    a = from_config(cfg)
    assert a.mamba_feeding_attention == [2]
    roles = [lin.role for lin in a.linears if lin.layer == 1]
    assert roles == ["mlp_up", "mlp_down"]


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"hybrid_override_pattern": "MEX"}, "unknown layer letters"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
])
def test_bad_configs(real_config, change, message):
    with pytest.raises(OmniqError, match=message):
        from_config(dict(real_config, **change))
