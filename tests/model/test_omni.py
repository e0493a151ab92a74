"""The bundled tiny Omni checkpoint: its layout, its shipped modeling code, and that its media matter."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from omniq.calib import media
from omniq.errors import OmniqError
from omniq.model import forward, omni, towers
from omniq.model.checkpoint import open_checkpoint, resolve

# Threshold for "the media change the language model's predictions measurably", in nats of mean KL over the
# caption tokens, media embeddings vs zero embeddings. Two scales fix it. Quantization (shared/reference/
# transformers-nemotronh-notes.md, same tiny language model): fp32 vs bf16 weights 2.1e-4, FP8 2.6e-3, NVFP4
# 2.0e-2; an effect near these would drown in the error that per-modality validation has to measure.
# Untrained towers: arbitrary embeddings already move the predictions (0.13 image, 0.05 audio, `before` in
# training.json); the trained towers must do clearly more than that. 0.3 is 15x NVFP4's KL and over twice the
# untrained towers' effect; the trained ones measure about 0.7 (image) and 1.9 (audio) on 48 eval samples.
MIN_MEDIA_KL = 0.3


@pytest.fixture(scope="module")
def ckpt():
    return open_checkpoint("tiny-omni")


@pytest.fixture(scope="module")
def weights(ckpt):
    return {k: v for k, v in ckpt.read().items()}


@pytest.fixture(scope="module")
def tokens(ckpt):
    return omni.context_tokens(ckpt.config, ckpt.tokenizer)


# ----- layout ---------------------------------------------------------------------------------------------
def test_config_mirrors_the_real_omni_top_level(ckpt):
    cfg = ckpt.config
    assert ckpt.is_omni
    assert cfg["architectures"] == ["NemotronH_Nano_Omni_Reasoning_V3"]
    assert cfg["model_type"] == "NemotronH_Nano_Omni_Reasoning_V3"
    for key in ("llm_config", "vision_config", "sound_config", "force_image_size", "patch_size",
                "downsample_ratio", "ps_version", "vit_hidden_size", "projector_hidden_size",
                "img_context_token_id", "sound_context_token_id", "max_sequence_length"):
        assert key in cfg, key
    assert cfg["downsample_ratio"] == 0.5 and cfg["ps_version"] == "v2" and cfg["patch_size"] == 16
    assert cfg["sound_config"]["model_type"] == "parakeet"
    tiny = json.loads((resolve("tiny") / "config.json").read_text())
    assert cfg["llm_config"] == tiny
    tok = ckpt.tokenizer
    assert tok.convert_ids_to_tokens(cfg["img_context_token_id"]) == "<image>"
    assert tok.convert_ids_to_tokens(cfg["sound_context_token_id"]) == "<sound>"


def test_auto_map_points_at_code_shipped_in_the_directory(ckpt):
    files = omni.remote_code_files(ckpt.path, ckpt.config)
    assert set(files) == {"configuration_tiny_omni.py", "modeling_tiny_omni.py"}
    for f in files:
        src = (ckpt.path / f).read_text()
        assert "import omniq" not in src and "from omniq" not in src    # self-contained


def test_tensor_prefixes_and_tower_shapes(ckpt):
    comps = {}
    for name in ckpt.headers:
        comps.setdefault(omni.component_of(name), []).append(name)
    assert set(comps) == {"language_model", "vision_tower", "vision_projector", "audio_encoder", "audio_projector"}
    assert all(n.startswith("vision_model.radio_model.") for n in comps["vision_tower"])
    assert all(n.startswith("sound_encoder.encoder.") for n in comps["audio_encoder"])
    expected = towers.tower_tensors(ckpt.config)
    got = {n: ckpt.headers[n].shape for n in ckpt.headers if not n.startswith(omni.LLM_PREFIX)}
    assert got == expected
    assert all(ckpt.headers[n].dtype == "BF16" for n in expected)
    assert {t.name for t in ckpt.arch.tensors} == set(comps["language_model"])
    # index file maps every tensor
    index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt.headers)


def test_language_model_is_the_bundled_tiny_byte_for_byte(ckpt, weights):
    from safetensors import safe_open

    with safe_open(str(resolve("tiny") / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert len(names) == sum(1 for n in weights if n.startswith(omni.LLM_PREFIX))
        for n in names:
            a, b = f.get_tensor(n), weights[omni.LLM_PREFIX + n]
            assert a.dtype == b.dtype, n
            assert hashlib.sha256(a.view(torch.uint8).numpy().tobytes()).digest() == \
                hashlib.sha256(b.view(torch.uint8).numpy().tobytes()).digest(), n
    assert weights["language_model.backbone.layers.1.mixer.gate.weight"].dtype == torch.float32


def test_sizes_stay_small(ckpt):
    tower_bytes = sum(t.nbytes for n, t in ckpt.headers.items() if not n.startswith(omni.LLM_PREFIX))
    assert tower_bytes < 3e6
    assert ckpt.total_bytes < 32e6


def test_tower_functions_refuse_a_layout_they_do_not_cover(ckpt):
    towers.check_supported(ckpt.config, ckpt.headers)
    names = list(ckpt.headers) + ["sound_encoder.encoder.layers.0.self_attn.relative_k_proj.weight"]
    with pytest.raises(OmniqError, match="relative_k_proj.weight is not expected.*--calib-mix text:1"):
        towers.check_supported(ckpt.config, names)
    with pytest.raises(OmniqError, match="blocks.0.norm1.weight is missing"):
        towers.check_supported(ckpt.config, [n for n in ckpt.headers if not n.endswith("blocks.0.norm1.weight")])
    real_like = dict(ckpt.config, sound_config={"model_type": "parakeet", "hidden_size": 1024})
    with pytest.raises(OmniqError, match="sound_config: no usable"):
        towers.sound_spec(real_like)


# ----- remote code ----------------------------------------------------------------------------------------
def test_remote_code_is_refused_without_trust(ckpt):
    with pytest.raises(OmniqError) as e:
        omni.load_remote_model(ckpt.path, ckpt.config, trust_remote_code=False)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert "\n" not in msg
    assert "modeling_tiny_omni.py" in msg and "auto_map" in msg and "--trust-remote-code" in msg


def test_trust_with_a_missing_code_file_is_an_error(ckpt, tmp_path):
    cfg = dict(ckpt.config, auto_map={"AutoModel": "modeling_gone.Model"})
    with pytest.raises(OmniqError, match="modeling_gone.py"):
        omni.require_trust(tmp_path, cfg, True)
    with pytest.raises(OmniqError, match="no auto_map"):
        omni.require_trust(tmp_path, {}, True)


@pytest.fixture(scope="module")
def remote(ckpt):
    return omni.load_remote_model(ckpt.path, ckpt.config, trust_remote_code=True, dtype=torch.float32)


def test_remote_code_loads_with_trust(remote, weights):
    assert type(remote).__name__ == "NemotronH_Nano_Omni_Reasoning_V3"
    sd = remote.state_dict()
    name = "vision_model.radio_model.model.blocks.0.attn.qkv.weight"
    assert torch.equal(sd[name], weights[name].float())
    assert torch.equal(sd["language_model.model.layers.1.mixer.experts.up_proj"][3],
                       weights["language_model.backbone.layers.1.mixer.experts.3.up_proj.weight"].float())


def _sample_inputs(ckpt, tokens, modality):
    sample = next(media.bundled(modality, "eval", 1))
    return media.model_inputs(sample, ckpt.config, ckpt.tokenizer, tokens)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_omniq_towers_and_forward_equal_the_shipped_code(ckpt, weights, tokens, remote, modality):
    """Same logits on an image+text and an audio+text sample. transformers' CPU Mamba-2 path clamps dt at
    time_step_min where the CUDA kernels (and omniq) use time_step_limit (0, inf); omniq's forward is run with
    the same clamp here so that the comparison isolates the towers, the projectors and the splicing."""
    x = _sample_inputs(ckpt, tokens, modality)
    assert x.num_tokens < ckpt.arch.chunk_size            # the shipped code is only right below chunk_size
    clamped = dataclasses.replace(ckpt.arch, time_step_limit=(ckpt.llm_config["time_step_min"], float("inf")))
    with torch.no_grad():
        embeds = omni.multimodal_embeds(ckpt.config, ckpt.arch, weights, x.input_ids, pixels=x.pixels,
                                        features=x.features, tokens=tokens)
        ours = forward.logits(clamped, weights, inputs_embeds=embeds)
        unclamped = forward.logits(ckpt.arch, weights, inputs_embeds=embeds)
        theirs = remote(input_ids=x.input_ids, pixel_values=x.pixels, input_features=x.features).logits
        if modality == "image":
            e1, e2 = towers.image_embeds(towers.vision_spec(ckpt.config), weights, x.pixels), remote.extract_feature(x.pixels)
        else:
            e1, e2 = towers.audio_embeds(towers.sound_spec(ckpt.config), weights, x.features), \
                remote.extract_sound_feature(x.features)
    assert torch.allclose(e1, e2, rtol=1e-5, atol=1e-5)
    kl = F.kl_div(F.log_softmax(theirs, -1), F.log_softmax(ours, -1), log_target=True, reduction="none").sum(-1)
    assert kl.max().item() < 1e-5
    assert (ours - theirs).abs().max().item() < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    # the clamp alone: a small difference of transformers' CPU path, not of the multimodal parts
    kl_clamp = F.kl_div(F.log_softmax(theirs, -1), F.log_softmax(unclamped, -1), log_target=True, reduction="none")
    assert kl_clamp.sum(-1).max().item() < 1e-3


# ----- splicing -------------------------------------------------------------------------------------------
def test_splice_replaces_exactly_the_context_tokens(ckpt, weights, tokens):
    arch = ckpt.arch
    ids = torch.tensor([[1, 50, tokens.image, tokens.image, 60, tokens.sound, 70],
                        [1, tokens.image, tokens.image, 80, tokens.sound, 90, 91]])
    img = torch.randn(2, 2, arch.hidden_size, requires_grad=True)
    snd = torch.randn(2, arch.hidden_size)
    x = omni.splice(arch, weights, ids, img, snd, tokens=tokens)
    plain = F.embedding(ids, weights["language_model.backbone.embeddings.weight"]).float()
    kinds = omni.token_modalities(ids, tokens)
    assert torch.equal(x[kinds == 0], plain[kinds == 0])
    assert torch.equal(x[kinds == 1], img.reshape(-1, arch.hidden_size))    # reading order over the batch
    assert torch.equal(x[kinds == 2], snd)
    x.sum().backward()
    assert img.grad is not None and torch.all(img.grad == 1)
    with pytest.raises(OmniqError, match="4 context tokens but the image gives 2"):
        omni.splice(arch, weights, ids, img[:1], snd, tokens=tokens)


def test_context_tokens_from_config_and_tokenizer(ckpt, tokens):
    assert (tokens.image, tokens.sound) == (4, 5)
    tok = ckpt.tokenizer
    assert tok.convert_ids_to_tokens([tokens.image_start, tokens.image_end, tokens.sound_start, tokens.sound_end]) == \
        ["<img>", "</img>", "<audio>", "</audio>"]
    with pytest.raises(OmniqError, match="img_context_token_id"):
        omni.context_tokens({"llm_config": {}})


# ----- the media change the language model's predictions --------------------------------------------------
N_EFFECT = 12


def _caption_logits(ckpt, weights, tokens, samples, embeds_of):
    """One right-padded batch: per sample, the logits predicting its caption tokens, and those tokens.
    `embeds_of(inputs)` gives the embeddings spliced at the context tokens of all rows (reading order)."""
    inputs = [media.model_inputs(s, ckpt.config, ckpt.tokenizer, tokens) for s in samples]
    L = max(x.num_tokens for x in inputs)
    ids = torch.zeros(len(inputs), L, dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, :x.num_tokens] = x.input_ids[0]
    emb = embeds_of(inputs)
    kw = {"image_embeds": emb} if samples[0].modality == "image" else {"audio_embeds": emb}
    with torch.no_grad():
        lg = forward.logits(ckpt.arch, weights, inputs_embeds=omni.splice(ckpt.arch, weights, ids, tokens=tokens, **kw))
    return [(lg[i, x.target_start - 1:x.num_tokens - 1], ids[i, x.target_start:x.num_tokens])
            for i, x in enumerate(inputs)]


@pytest.fixture(scope="module", params=["image", "audio"])
def effects(request, ckpt, weights, tokens):
    """Caption logits of N_EFFECT eval samples with their own media, with zero embeddings, and with the media
    of the next sample."""
    modality = request.param
    samples = list(media.bundled(modality, "eval", N_EFFECT))

    def own(inputs):
        with torch.no_grad():
            if modality == "image":
                return towers.image_embeds(towers.vision_spec(ckpt.config), weights,
                                           torch.cat([x.pixels for x in inputs]))
            return towers.audio_embeds(towers.sound_spec(ckpt.config), weights, torch.cat([x.features for x in inputs]))

    real = _caption_logits(ckpt, weights, tokens, samples, own)
    zero = _caption_logits(ckpt, weights, tokens, samples, lambda inputs: torch.zeros_like(own(inputs)))
    shifted = _caption_logits(ckpt, weights, tokens, samples, lambda inputs: own(inputs[1:] + inputs[:1]))
    return {"modality": modality, "real": real, "zero": zero, "shifted": shifted}


def _kl(p, q):
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_media_change_the_predictions_measurably(effects):
    kl = sum(_kl(r[0], z[0]) for r, z in zip(effects["real"], effects["zero"])) / N_EFFECT
    assert kl > MIN_MEDIA_KL, (effects["modality"], kl)


def test_predictions_follow_the_content_of_the_media(effects):
    """Not just any embedding: the caption of a sample is likelier with its own media than with another's."""
    own = [F.cross_entropy(lg, t).item() for lg, t in effects["real"]]
    other = [F.cross_entropy(lg, t).item() for lg, t in effects["shifted"]]
    assert sum(own) / N_EFFECT < sum(other) / N_EFFECT - 0.3, (effects["modality"], own, other)
    assert sum(a < b for a, b in zip(own, other)) >= 9, (effects["modality"], own, other)


def test_padding_does_not_change_a_row(ckpt, weights, tokens, effects):
    """The batched fixture pads on the right; a causal model must give the same caption logits alone."""
    sample = next(media.bundled(effects["modality"], "eval", 1))
    x = media.model_inputs(sample, ckpt.config, ckpt.tokenizer, tokens)
    with torch.no_grad():
        lg = forward.logits(ckpt.arch, weights, inputs_embeds=omni.multimodal_embeds(
            ckpt.config, ckpt.arch, weights, x.input_ids, pixels=x.pixels, features=x.features, tokens=tokens))[0]
    assert torch.allclose(lg[x.target_start - 1:-1], effects["real"][0][0], atol=1e-4, rtol=1e-4)


def test_training_record_has_the_figures(ckpt):
    rec = json.loads((ckpt.path / "training.json").read_text())
    for m in ("image", "audio"):
        assert rec["after"][m]["caption_loss"] < rec["before"][m]["caption_loss"]
        assert rec["after"][m]["kl_vs_zero_embeds"] > max(MIN_MEDIA_KL, 2 * rec["before"][m]["kl_vs_zero_embeds"])
        for attr in rec["attribute_accuracy"][m].values():      # the captions follow the content
            assert attr["accuracy"] > attr["chance"]
