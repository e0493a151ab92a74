"""The real Omni towers: transformers' RadioModel and ParakeetEncoder, mapped from the checkpoint's names.

Built at the real widths from config alone on the `meta` device (no weights, no memory), and at tiny widths
with random weights to check omniq's forward against transformers' own loading path."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from omniq.errors import OmniqError
from omniq.model import parakeet, radio, towers
from reference_configs import DATA, omni_real_config

# From shared/reference/omni-layout.md: BF16 release 61.5 GiB, language model alone 58.8 GiB, so towers and
# projectors hold about 2.7 GiB, "about 1.45 B parameters". The rounding of both sizes (0.05 GiB each) gives
# the band below; the count here comes from transformers' modules built at the config's widths.
TOWER_PARAMS_BAND = (1.40e9, 1.50e9)


@pytest.fixture(scope="module")
def real_cfg():
    return omni_real_config(json.loads((DATA / "nemotron-3-nano-30b-a3b.config.json").read_text()))


@pytest.fixture(scope="module")
def real_modules(real_cfg):
    v, s = towers.vision_spec(real_cfg), towers.sound_spec(real_cfg)
    return v, s, radio.build(v, "meta"), parakeet.build(s, "meta")


def test_real_widths_from_config_alone(real_cfg, real_modules):
    v, s, vit, enc = real_modules
    assert isinstance(v, radio.RadioSpec) and isinstance(s, parakeet.ParakeetSpec)
    assert (v.width, v.layers, v.heads, v.mlp_width, v.patch_size) == (1280, 32, 16, 5120, 16)     # ViT-H/16
    assert (s.width, s.layers, s.mel_bins) == (1024, 24, 128)
    assert len(vit.encoder.layer) == 32 and vit.config.hidden_size == 1280
    assert len(enc.layers) == 24 and enc.config.hidden_size == 1024 and enc.config.num_mel_bins == 128
    assert all(p.is_meta for p in list(vit.parameters()) + list(enc.parameters()))
    # 512 px tiles of 16 px patches, pixel shuffle 0.5: 256 tokens per tile; 1 s of 16 kHz audio: 100 frames
    # subsampled 8x -> 13 tokens (vLLM's count)
    assert v.tokens_per_tile == 256 and s.tokens(s.frames(16000)) == 13
    names = towers.tower_tensors(real_cfg)
    n = sum(torch.Size(shape).numel() for shape in names.values())
    assert TOWER_PARAMS_BAND[0] < n < TOWER_PARAMS_BAND[1], n


def test_every_vision_name_maps_and_none_is_left_over(real_modules):
    v, _, vit, _ = real_modules
    module = {k: tuple(t.shape) for k, t in vit.state_dict().items()}
    mapped: dict[str, tuple] = {}
    for name, shape in radio.checkpoint_tensors(v).items():
        if name.startswith(radio.PROJECTOR):
            continue
        targets = radio.hf_names(name)
        assert targets is not None, name
        if not targets:                                     # video embedder: not read for images
            assert "video_embedder" in name
            continue
        for t in targets:
            assert t not in mapped, f"{t} loaded twice"
            mapped[t] = (shape[0] // 3, *shape[1:]) if len(targets) == 3 else shape
    assert {k: module[k] for k in mapped} == mapped                     # every name lands, with its shape
    left = set(module) - set(mapped)
    assert left == {f"encoder.layer.{i}.layer_scale{k}.lambda1" for i in range(32) for k in (1, 2)}  # C-RADIO
    assert "vision_model.radio_model.model.blocks.31.attn.qkv.weight" in radio.checkpoint_tensors(v)
    assert radio.hf_names("language_model.lm_head.weight") is None


def test_every_audio_name_maps_and_none_is_left_over(real_modules):
    """The checkpoint's audio names, written from Parakeet's layout (vLLM loads `sound_encoder.encoder.<name>`
    into transformers' ParakeetEncoder unchanged), against the module transformers builds."""
    _, s, _, enc = real_modules
    per_layer = [f"{ff}.linear{k}.weight" for ff in ("feed_forward1", "feed_forward2") for k in (1, 2)]
    per_layer += [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_k_proj")]
    per_layer += ["self_attn.bias_u", "self_attn.bias_v"]
    per_layer += [f"conv.{c}.{p}" for c in ("pointwise_conv1", "depthwise_conv", "pointwise_conv2")
                  for p in ("weight", "bias")]
    per_layer += [f"conv.norm.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    per_layer += [f"{nm}.{p}" for nm in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2",
                                         "norm_out") for p in ("weight", "bias")]
    expected = {f"subsampling.layers.{i}.{p}" for i in (0, 2, 3, 5, 6) for p in ("weight", "bias")}
    expected |= {"subsampling.linear.weight", "subsampling.linear.bias"}
    expected |= {f"layers.{i}.{n}" for i in range(24) for n in per_layer}
    ckpt = {n for n in parakeet.checkpoint_tensors(s) if n.startswith(parakeet.ENCODER)}
    assert {parakeet.hf_name(n) for n in ckpt} == expected
    assert set(enc.state_dict()) == expected
    shapes = parakeet.checkpoint_tensors(s)
    assert shapes["sound_encoder.encoder.subsampling.linear.weight"] == (1024, 256 * 16)     # 128 mel / 8
    assert shapes["sound_encoder.encoder.layers.0.self_attn.bias_u"] == (8, 128)
    assert shapes["sound_projection.linear2.weight"] == (2688, 4096)
    assert parakeet.hf_name("sound_encoder.encoder.feature_extractor.fb") == ""


def test_check_supported_on_the_real_layout(real_cfg):
    names = list(towers.tower_tensors(real_cfg))
    towers.check_supported(real_cfg, names + ["sound_encoder.encoder.feature_extractor.window"])
    towers.check_supported(real_cfg, [n for n in names if not n.endswith("num_batches_tracked")])
    with pytest.raises(OmniqError, match="layers.3.self_attn.q_proj.bias is not expected"):
        towers.check_supported(real_cfg, names + ["sound_encoder.encoder.layers.3.self_attn.q_proj.bias"])
    with pytest.raises(OmniqError, match="blocks.7.mlp.fc2.weight is missing"):
        towers.check_supported(real_cfg, [n for n in names if not n.endswith("blocks.7.mlp.fc2.weight")])
    bad = copy.deepcopy(real_cfg)
    bad["vision_config"]["args"]["model"] = "vit_gigantic_patch14"
    with pytest.raises(OmniqError, match="vision_config: no usable.*vit_gigantic"):
        towers.vision_spec(bad)


def test_sound_config_loads_as_a_parakeet_config(real_cfg):
    """vLLM turns the sound_config into a config object and from it a Parakeet encoder config
    (`ParakeetConfig.from_hf_config`: its dict plus scale_input / attention_bias False)."""
    from transformers import ParakeetEncoderConfig

    sc = real_cfg["sound_config"]
    c = ParakeetEncoderConfig(**{k: v for k, v in sc.items() if k != "model_type"},
                              scale_input=False, attention_bias=False)
    assert (c.hidden_size, c.num_hidden_layers, c.num_mel_bins) == (1024, 24, 128)
    assert parakeet.encoder_config(towers.sound_spec(real_cfg)).to_dict()["hidden_size"] == c.hidden_size


def _tiny_real(real_cfg):
    cfg = copy.deepcopy(real_cfg)
    cfg["llm_config"] = {"hidden_size": 64}
    cfg["force_image_size"] = 64
    cfg["projector_hidden_size"] = 48
    cfg["vision_config"]["args"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, cpe_max_size=128)
    cfg["sound_config"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               subsampling_conv_channels=8, projection_hidden_size=48, num_mel_bins=32)
    return cfg


def _random(shapes: dict, g) -> dict:
    out = {}
    for n, shape in shapes.items():
        if n.endswith("num_batches_tracked") or n.endswith("summary_idxs"):
            out[n] = torch.arange(int(torch.Size(shape).numel()), dtype=torch.long).reshape(shape)
        elif n.endswith("running_var") or n.endswith("norm_std"):
            out[n] = torch.rand(shape, generator=g) + 0.5
        else:
            out[n] = torch.randn(shape, generator=g) * 0.2
    return out


def test_vision_forward_equals_transformers_own_loading(real_cfg, tmp_path):
    """omniq's name mapping + functional forward against RadioModel.from_pretrained on the same tensors under
    their RADIO names (transformers then applies its own `radio` conversion table)."""
    from safetensors.torch import save_file
    from transformers import RadioModel

    cfg = _tiny_real(real_cfg)
    v = towers.vision_spec(cfg)
    g = torch.Generator().manual_seed(0)
    w = _random(radio.checkpoint_tensors(v), g)
    save_file({n[len("vision_model."):]: t.contiguous() for n, t in w.items() if n.startswith("vision_model.")},
              str(tmp_path / "model.safetensors"))
    radio.radio_config(v).save_pretrained(tmp_path)
    ref_model = RadioModel.from_pretrained(tmp_path).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = ref_model(pixels).features
    mine = radio.vision_features(v, w, pixels)
    assert mine.shape == (2, 16, 32)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    emb = towers.image_embeds(v, w, pixels)
    assert emb.shape == (2, v.tokens_per_tile, 64)


def test_audio_forward_equals_the_loaded_encoder(real_cfg):
    cfg = _tiny_real(real_cfg)
    s = towers.sound_spec(cfg)
    g = torch.Generator().manual_seed(1)
    w = _random(parakeet.checkpoint_tensors(s), g)
    enc = parakeet.build(s, "cpu")
    enc.load_state_dict({parakeet.hf_name(n): t for n, t in w.items() if n.startswith(parakeet.ENCODER)})
    feats = torch.randn(1, 100, 32, generator=g)
    with torch.no_grad():
        ref = enc(feats).last_hidden_state
    torch.testing.assert_close(parakeet.encoder_states(s, w, feats), ref, rtol=1e-5, atol=1e-5)
    emb = towers.audio_embeds(s, w, feats)
    assert emb.shape == (1, s.tokens(100), 64) == (1, 13, 64)
    # clips of different lengths (vLLM: 30 s clips, then the remainder) come as a list and concatenate
    two = towers.audio_embeds(s, w, [feats, feats[:, :40]])
    assert two.shape == (s.tokens(100) + s.tokens(40), 64)
