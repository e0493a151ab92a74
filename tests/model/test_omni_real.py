"""The bundled `tiny-omni-real`: the real Omni's layout and config shape, no modeling code, towers run by
transformers' RadioModel / ParakeetEncoder; its media change the predictions; multimodal quantize and
per-modality validate work on it without --trust-remote-code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from omniq.calib import media
from omniq.model import forward, omni, parakeet, radio, towers
from omniq.model.checkpoint import open_checkpoint

# As tests/model/test_omni.py: 0.3 nats of mean caption KL, media vs zero embeddings, is 15x NVFP4's KL on
# this language model and over twice what untrained towers do (`before` in training.json).
MIN_MEDIA_KL = 0.3
EVAL = 16


@pytest.fixture(scope="module")
def ckpt():
    return open_checkpoint("tiny-omni-real")


@pytest.fixture(scope="module")
def weights(ckpt):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt.read().items()}


def test_config_has_nvidias_shape_and_no_code(ckpt):
    cfg = ckpt.config
    assert ckpt.is_omni and "auto_map" not in cfg and not list(ckpt.path.glob("*.py"))
    for key in ("llm_config", "vision_config", "sound_config", "template", "image_tag_type", "force_image_size",
                "patch_size", "downsample_ratio", "ps_version", "vit_hidden_size", "projector_hidden_size",
                "img_context_token_id", "sound_context_token_id", "norm_mean", "norm_std"):
        assert key in cfg, key
    assert radio.is_radio(cfg) and parakeet.is_parakeet(cfg)
    args = cfg["vision_config"]["args"]
    assert args["model"] in radio.TIMM_DIMS                   # what vLLM's RadioConfig looks up
    from transformers import ParakeetEncoderConfig

    sc = cfg["sound_config"]
    pc = ParakeetEncoderConfig(**{k: v for k, v in sc.items() if k != "model_type"}, scale_input=False,
                               attention_bias=False)
    assert pc.hidden_size == sc["hidden_size"] and pc.num_mel_bins == sc["num_mel_bins"]


def test_tensor_names_are_the_real_layout(ckpt):
    towers.check_supported(ckpt.config, ckpt.headers)
    names = set(ckpt.headers)
    assert "vision_model.radio_model.model.blocks.0.attn.qkv.weight" in names
    assert "vision_model.radio_model.model.patch_generator.cls_token.token" in names
    assert "sound_encoder.encoder.layers.0.self_attn.relative_k_proj.weight" in names
    assert "sound_encoder.encoder.layers.0.self_attn.bias_u" in names
    assert not any(n.endswith("self_attn.q_proj.bias") for n in names)       # attention_bias False, as vLLM
    assert {n for n in names if omni.component_of(n) != "language_model"} == set(towers.tower_tensors(ckpt.config))
    tower_bytes = sum(t.nbytes for n, t in ckpt.headers.items() if not n.startswith(omni.LLM_PREFIX))
    assert tower_bytes < 3e6 and ckpt.total_bytes < 32e6


def test_the_language_model_is_the_bundled_tiny(ckpt):
    """The language-model shard is tiny-omni's byte for byte (one git blob: the bundle adds only its towers)."""
    import hashlib

    tiny = open_checkpoint("tiny")
    lm = {n[len(omni.LLM_PREFIX):]: h for n, h in ckpt.headers.items() if n.startswith(omni.LLM_PREFIX)}
    assert set(lm) == set(tiny.headers)
    shard = "model-00001-of-00002.safetensors"
    a, b = (hashlib.sha256((open_checkpoint(n).path / shard).read_bytes()).hexdigest()
            for n in ("tiny-omni", "tiny-omni-real"))
    assert a == b


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_media_change_the_predictions(ckpt, weights, modality):
    tokens = omni.context_tokens(ckpt.config, ckpt.tokenizer)
    kls = []
    for sample in media.bundled(modality, "eval", EVAL):
        x = media.model_inputs(sample, ckpt.config, ckpt.tokenizer, tokens)
        with torch.no_grad():
            if modality == "image":
                emb = towers.image_embeds(towers.vision_spec(ckpt.config), weights, x.pixels)
                kw = [{"image_embeds": emb}, {"image_embeds": torch.zeros_like(emb)}]
            else:
                emb = towers.audio_embeds(towers.sound_spec(ckpt.config), weights, x.features)
                kw = [{"audio_embeds": emb}, {"audio_embeds": torch.zeros_like(emb)}]
            real, zero = (forward.logits(ckpt.arch, weights, inputs_embeds=omni.splice(
                ckpt.arch, weights, x.input_ids, tokens=tokens, **k))[0, x.target_start - 1:-1] for k in kw)
        lp, lq = F.log_softmax(real, -1), F.log_softmax(zero, -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
    assert sum(kls) / len(kls) > MIN_MEDIA_KL


def test_training_record(ckpt):
    t = json.loads((ckpt.path / "training.json").read_text())
    assert t["layout"] == "real" and t["script"] == "scripts/make_tiny_omni.py"
    for m in ("image", "audio"):
        assert t["after"][m]["kl_vs_zero_embeds"] > MIN_MEDIA_KL
        assert t["after"][m]["caption_loss"] < t["before"][m]["caption_loss"]


@pytest.fixture(scope="module")
def quantized(omni_real_quantized):
    r = omni_real_quantized
    assert r["rc"] == 0, r["stderr"][-2000:]
    return r["path"], r


def test_multimodal_quantize_without_remote_code(quantized):
    out, r = quantized
    line = next(ln for ln in r["stdout"].splitlines() if ln.startswith("calibration tokens:"))
    assert all(f"{m} " in line for m in ("text", "image", "audio"))
    cal = json.loads((out / "omniq.json").read_text())["calibration"]
    assert cal["mix"] == {"text": 0.5, "image": 0.25, "audio": 0.25}
    assert all(cal["modality_tokens"]["total"][m] > 0 for m in ("text", "image", "audio"))
    assert "trust-remote-code" not in r["stderr"]


def test_per_modality_validate(quantized):
    from omniq.validate.run import validate

    out, _ = quantized
    rep = validate("tiny-omni-real", out, samples=4, seq_len=128, media_samples=8, max_ppl_ratio=1.3)
    mods = rep["modalities"]
    assert list(mods) == ["text", "image", "audio"]
    for m in ("image", "audio"):
        assert mods[m]["tokens"] > 0 and 0 <= mods[m]["kl_mean"] < 0.2 and mods[m]["top1_agreement"] > 0.5
