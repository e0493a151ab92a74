"""The name codec (omniq.model.names): hub <-> transformers spellings, the Omni prefix, experts, KV scales,
engine and declaration spellings."""

from omniq.model import names
from omniq.model.arch import native_name


def test_native_and_hub_spellings_round_trip():
    assert names.hub_from_native("model.layers.3.mixer.in_proj.weight") == "backbone.layers.3.mixer.in_proj.weight"
    assert names.hub_from_native("model.embedding.weight") == "backbone.embeddings.weight"
    assert names.hub_from_native("backbone.embedding.weight", "language_model.") == \
        "language_model.backbone.embeddings.weight"
    assert names.hub_from_native("model.layers.1.mixer.experts.up_proj", "language_model.", expert=5) == \
        "language_model.backbone.layers.1.mixer.experts.5.up_proj.weight"
    assert native_name("language_model.backbone.layers.1.mixer.experts.5.up_proj", "language_model.") == \
        "model.layers.1.mixer.experts"
    assert names.native_module("backbone.layers.2.mixer.q_proj") == "model.layers.2.mixer.q_proj"


def test_experts_and_kv_scales():
    assert names.fused_expert("backbone.layers.1.mixer.experts.down_proj.weight") == \
        ("backbone.layers.1.mixer.experts", "down_proj")
    assert names.fused_expert("backbone.layers.1.mixer.experts.0.down_proj.weight") is None
    assert names.expert_of("backbone.layers.7.mixer.experts.12.up_proj") == (7, 12)
    assert names.expert_of("backbone.layers.7.mixer.shared_experts.up_proj") is None
    assert names.experts_module_pattern(4).search("model.layers.4.mixer.experts")
    assert not names.experts_module_pattern(4).search("model.layers.14.mixer.experts")
    assert names.kv_scales("backbone.layers.5.mixer") == {"k": "backbone.layers.5.mixer.k_proj.k_scale",
                                                          "v": "backbone.layers.5.mixer.v_proj.v_scale"}


def test_engine_and_declaration_spellings():
    assert names.engine_spellings("language_model.backbone.layers.0.mixer.conv1d", "language_model.") == [
        "language_model.backbone.layers.0.mixer.conv1d", "backbone.layers.0.mixer.conv1d",
        "language_model.model.layers.0.mixer.conv1d", "model.layers.0.mixer.conv1d"]
    other = lambda n: "vision_tower" if n.startswith("vision_model") else "other"  # noqa: E731
    assert names.hub_spellings("model.layers.0.mixer.conv1d", True, other) == [
        "model.layers.0.mixer.conv1d", "backbone.layers.0.mixer.conv1d",
        "language_model.model.layers.0.mixer.conv1d", "language_model.backbone.layers.0.mixer.conv1d"]
    assert names.hub_spellings("vision_model.blocks.0", True, other) == ["vision_model.blocks.0"]
