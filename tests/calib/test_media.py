"""Multimodal samples: the bundled generated sets, user folders and datasets, model inputs, --calib-mix."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from omniq.calib import media
from omniq.errors import OmniqError
from omniq.model import towers


@pytest.fixture(scope="module")
def omni_ckpt():
    from omniq.model.checkpoint import open_checkpoint

    return open_checkpoint("tiny-omni")


# ----- bundled sets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_generation_is_deterministic(modality):
    a = list(media.bundled(modality, "calib", 6))
    b = list(media.bundled(modality, "calib", 6))
    assert [s.media_sha256() for s in a] == [s.media_sha256() for s in b]
    assert [(s.prompt, s.target, s.labels) for s in a] == [(s.prompt, s.target, s.labels) for s in b]
    # a sample is a function of (split, index) alone
    assert next(media.bundled(modality, "calib", 1, start=4)).media_sha256() == a[4].media_sha256()


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_splits_are_disjoint(modality):
    sets = {split: {s.media_sha256() for s in media.bundled(modality, split, 48)} for split in media.SPLIT_SEEDS}
    assert all(len(v) == 48 for v in sets.values())
    assert not sets["calib"] & sets["eval"]
    assert not sets["train"] & (sets["calib"] | sets["eval"])


def test_images_show_what_the_caption_says():
    for s in media.bundled("image", "eval", 20):
        colour, shape, position = s.labels
        assert s.target == f" a {colour} {shape} {media.POSITIONS[position][1]}."
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        # the pixels nearest the named colour sit in the named half of the image
        dist = np.linalg.norm(s.image - np.asarray(media.COLOURS[colour]), axis=-1)
        ys, xs = np.nonzero(dist < 0.15)
        assert len(ys) > 100, s.labels
        cx, cy = xs.mean() / 128, ys.mean() / 128
        want = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}[position]
        assert want, (s.labels, cx, cy)


def test_sounds_have_the_pitch_the_caption_says():
    checked = 0
    for s in media.bundled("audio", "eval", 40):
        pitch, kind = s.labels
        assert s.target == f" a {pitch} {kind}."
        assert s.wave.shape == (16000,) and np.abs(s.wave).max() <= 1.0
        if kind not in ("steady tone", "beeping tone"):
            continue
        spec = np.abs(np.fft.rfft(s.wave))
        peak = np.argmax(spec) * s.rate / len(s.wave)
        lo, hi = media.PITCHES[pitch]
        assert lo * 0.95 <= peak <= hi * 1.05, (s.labels, peak)
        checked += 1
    assert checked >= 5


def test_unknown_split_or_modality():
    with pytest.raises(ValueError):
        next(media.bundled("image", "test", 1))
    with pytest.raises(ValueError):
        next(media.bundled("video", "calib", 1))


# ----- features and model inputs --------------------------------------------------------------------------
def test_log_mel_shape_and_tokens(omni_ckpt):
    s = towers.sound_spec(omni_ckpt.config)
    clips = media.audio_clips(np.zeros(int(2.5 * s.sampling_rate), np.float32), s.sampling_rate, s)
    assert clips.shape == (3, s.frames(s.clip_samples), s.mel_bins)          # 2.5 s -> 3 clips, last padded
    w = omni_ckpt.read([n for n in omni_ckpt.headers if n.startswith(("sound_encoder.", "sound_projection."))])
    out = towers.audio_embeds(s, w, clips)
    assert out.shape == (3, s.tokens_per_clip, omni_ckpt.arch.hidden_size)


def test_steady_tone_is_not_normalised_away(omni_ckpt):
    """Per-utterance per-bin normalisation would make a steady tone all zeros; ours keeps its spectrum."""
    s = towers.sound_spec(omni_ckpt.config)
    t = np.arange(s.clip_samples) / s.sampling_rate
    low = media.log_mel(0.5 * np.sin(2 * np.pi * 200 * t), s)
    high = media.log_mel(0.5 * np.sin(2 * np.pi * 2000 * t), s)
    assert low.mean(0).argmax() < high.mean(0).argmax()
    assert (low - high).abs().mean() > 0.1


def test_resample_keeps_the_frequency():
    rate = 44100
    y = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate).astype(np.float32)
    z = media.resample(y, rate, 16000)
    assert len(z) == 16000
    assert abs(np.argmax(np.abs(np.fft.rfft(z))) - 1000) <= 1


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_model_inputs_hold_one_context_token_per_embedding(omni_ckpt, modality):
    from omniq.model import omni

    cfg, tok = omni_ckpt.config, omni_ckpt.tokenizer
    tokens = omni.context_tokens(cfg, tok)
    x = media.model_inputs(next(media.bundled(modality, "calib", 1)), cfg, tok, tokens)
    ids = x.input_ids[0].tolist()
    if modality == "image":
        n, ctx, start, end = x.pixels.shape[0] * towers.vision_spec(cfg).tokens_per_tile, tokens.image, \
            tokens.image_start, tokens.image_end
    else:
        n, ctx, start, end = x.features.shape[0] * towers.sound_spec(cfg).tokens_per_clip, tokens.sound, \
            tokens.sound_start, tokens.sound_end
    assert ids.count(ctx) == n
    first = ids.index(ctx)
    assert ids[first - 1] == start and ids[first + n] == end and ids[first:first + n] == [ctx] * n
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[x.target_start:]) == next(media.bundled(modality, "calib", 1)).target


def test_prompt_must_hold_one_placeholder(omni_ckpt):
    s = next(media.bundled("image", "calib", 1))
    bad = media.MediaSample("image", "<image><image> two", "", image=s.image, source="x")
    with pytest.raises(OmniqError, match="exactly once"):
        media.model_inputs(bad, omni_ckpt.config, omni_ckpt.tokenizer)


def test_text_only_checkpoint_cannot_take_media():
    cfg = {"llm_config": {"hidden_size": 8}, "img_context_token_id": 4}
    s = next(media.bundled("audio", "calib", 1))

    class Tok:
        bos_token_id = None

        def convert_tokens_to_ids(self, t):
            return None

    with pytest.raises(OmniqError, match="no audio encoder"):
        media.model_inputs(s, cfg, Tok())


# ----- user folders ---------------------------------------------------------------------------------------
def test_image_folder_with_sidecar_prompts(tmp_path):
    a = (np.arange(16 * 20 * 3) % 256).astype(np.uint8).reshape(16, 20, 3)
    b = np.full((3, 8, 8), 0.25, np.float32)                  # channels first, floats
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"file": "b.npy", "prompt": "What is this? <image>", "target": " grey"}) + "\n\n" +
        json.dumps({"file": "a.npy", "prompt": "Describe it."}) + "\n")
    out = media.folder_samples(tmp_path, "image")
    assert [s.source.rsplit("/", 1)[-1] for s in out] == ["b.npy", "a.npy"]
    assert out[0].prompt == "What is this? <image>" and out[0].target == " grey"
    assert out[1].prompt == "<image>\nDescribe it."                     # placeholder added in front
    assert out[0].image.shape == (8, 8, 3) and np.allclose(out[0].image, 0.25)
    assert np.allclose(out[1].image, a / 255.0)


def test_image_folder_without_sidecar_and_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    out = media.folder_samples(tmp_path, "image")
    assert len(out) == 1 and out[0].prompt == media.IMAGE_PROMPTS[0]
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(OmniqError, match="shape"):
        media.folder_samples(tmp_path, "image")
    with pytest.raises(OmniqError, match="no such folder"):
        media.folder_samples(tmp_path / "nope", "image")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"file": "missing.npy"}) + "\n")
    with pytest.raises(OmniqError, match="missing.npy is not in"):
        media.folder_samples(tmp_path, "image")


def test_png_needs_pillow(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(OmniqError, match="needs Pillow"):
        media.folder_samples(tmp_path, "image")


def test_png_through_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[:, :6, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    (s,) = media.folder_samples(tmp_path, "image")
    assert np.allclose(s.image, rgb / 255.0)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_and_channels(tmp_path, width):
    import wave

    t = np.arange(800) / 8000
    y = 0.5 * np.sin(2 * np.pi * 440 * t)
    scale = float(2 ** (8 * width - 1) - 1)
    ints = np.round(np.stack([y, -y], 1) * scale).astype(np.int64).reshape(-1)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        u = ints & 0xFFFFFF
        raw = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], 1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw)
    y2, rate = media.read_wav(tmp_path / "s.wav")
    assert rate == 8000 and len(y2) == 800
    assert np.abs(y2).max() < 0.02                       # the two channels cancel in the mono mix
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw[: len(raw) // 2])                # first half of the interleaved frames, as mono
    y3, _ = media.read_wav(tmp_path / "s.wav")
    ref = np.stack([y, -y], 1).reshape(-1)[:800]
    assert np.abs(y3 - ref).max() < max(2.5 / 2 ** (8 * width - 1), 1e-6)      # float32 limits 32-bit


def test_audio_folder_and_bad_wav(tmp_path):
    y = next(media.bundled("audio", "calib", 1)).wave
    media.write_wav(tmp_path / "one.wav", y, 16000)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"file": "one.wav", "prompt": "Hear <sound> now"}) + "\n")
    (s,) = media.folder_samples(tmp_path, "audio")
    assert s.rate == 16000 and s.prompt == "Hear <sound> now"
    assert np.abs(s.wave - y).max() < 1e-4
    (tmp_path / "one.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(OmniqError, match="not a readable PCM .wav"):
        media.folder_samples(tmp_path, "audio")


# ----- datasets -------------------------------------------------------------------------------------------
def test_dataset_columns_through_datasets():
    from datasets import Dataset

    img = (np.random.default_rng(0).random((6, 5, 3)) * 255).astype(np.uint8)
    wav = np.sin(np.arange(4000) / 3).astype(np.float32)
    ds = Dataset.from_dict({"image": [img, img[::-1]], "audio": [wav, wav * 0.5],
                            "question": ["What? <image>", None], "answer": [" this", " that"]})
    imgs = list(media.dataset_samples(ds, "image", "image", prompt_column="question", target_column="answer"))
    assert np.allclose(imgs[0].image, img / 255.0) and imgs[0].prompt == "What? <image>"
    assert imgs[1].prompt == media.IMAGE_PROMPTS[0] and imgs[1].target == " that"
    auds = list(media.dataset_samples(ds, "audio", "audio", rate=8000, limit=1))
    assert len(auds) == 1 and auds[0].rate == 8000 and np.allclose(auds[0].wave, wav)
    with pytest.raises(OmniqError, match="sampling rate"):
        list(media.dataset_samples(ds, "audio", "audio"))
    with pytest.raises(OmniqError, match="no image column 'img'"):
        list(media.dataset_samples(ds, "image", "img"))


def test_dataset_audio_dicts_and_wav_bytes(tmp_path):
    y = next(media.bundled("audio", "calib", 1)).wave
    media.write_wav(tmp_path / "a.wav", y, 16000)
    rows = [{"audio": {"array": np.stack([y, y]), "sampling_rate": 16000}},
            {"audio": {"bytes": (tmp_path / "a.wav").read_bytes(), "path": None}},
            {"audio": {"path": str(tmp_path / "a.wav")}}]
    out = list(media.dataset_samples(rows, "audio", "audio"))
    assert all(s.rate == 16000 and np.abs(s.wave - y).max() < 1e-4 for s in out)


# ----- --calib-mix ----------------------------------------------------------------------------------------
def test_parse_calib_mix():
    assert media.parse_calib_mix("text:0.5,image:0.25,audio:0.25") == {"text": 0.5, "image": 0.25, "audio": 0.25}
    assert media.parse_calib_mix(" Text:2 , image:2 ") == {"text": 0.5, "image": 0.5}
    assert media.parse_calib_mix("text:1,audio:0") == {"text": 1.0}
    for bad, msg in [("video:1", "MODALITY:SHARE"), ("text", "MODALITY:SHARE"), ("text:x", "not a number"),
                     ("text:-1", "not negative"), ("text:1,text:2", "twice"), ("text:0", "zero"),
                     ("text:nan", "finite")]:
        with pytest.raises(OmniqError, match=msg):
            media.parse_calib_mix(bad)


def test_mix_budget_adds_up():
    mix = media.parse_calib_mix("text:1,image:1,audio:1")
    b = media.mix_budget(mix, 1000)
    assert sum(b.values()) == 1000 and max(b.values()) - min(b.values()) <= 1
    assert media.mix_budget({"text": 0.5, "image": 0.25, "audio": 0.25}, 16384) == \
        {"text": 8192, "image": 4096, "audio": 4096}


def test_check_mix_against_the_checkpoint(omni_ckpt):
    media.check_mix({"text": 0.5, "image": 0.5}, omni_ckpt.config, True)
    with pytest.raises(OmniqError, match="text-only"):
        media.check_mix({"text": 0.5, "image": 0.5}, {}, False)
    with pytest.raises(OmniqError, match="no audio encoder"):
        media.check_mix({"audio": 1.0}, dict(omni_ckpt.config, sound_config=None), True)


def test_take_fills_the_budget_or_fails(omni_ckpt):
    from omniq.model import omni

    tokens = omni.context_tokens(omni_ckpt.config, omni_ckpt.tokenizer)
    inputs = [media.model_inputs(s, omni_ckpt.config, omni_ckpt.tokenizer, tokens)
              for s in media.bundled("image", "calib", 5)]
    got = media.take(iter(inputs), 60, "bundled-image")
    assert sum(x.num_tokens for x in got) >= 60 and sum(x.num_tokens for x in got[:-1]) < 60
    with pytest.raises(OmniqError, match="5 samples give"):
        media.take(iter(inputs), 10_000, "bundled-image")
