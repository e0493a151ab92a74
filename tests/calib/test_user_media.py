"""--calib-media / --eval-media: a user's folders and datasets of images and audio (files generated here)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from omniq.calib import media, user_media
from omniq.errors import OmniqError
from omniq.model import towers
from omniq.model.checkpoint import open_checkpoint

Image = pytest.importorskip("PIL.Image")
soundfile = pytest.importorskip("soundfile")


def _png(path, sample):
    Image.fromarray((sample.image * 255).round().astype(np.uint8)).save(path)


def _media_folder(root, images: int = 3, sounds: int = 3, split: str = "calib"):
    """Bundled-generator images as PNG / JPEG and sounds as WAV (44.1 kHz) / FLAC (22.05 kHz), captions
    in NAME.txt, written as a user would have them."""
    root.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(media.bundled("image", split, images)):
        name = f"img{i:02d}." + ("jpg" if i % 3 == 2 else "png")
        if name.endswith("png"):
            _png(root / name, s)
        else:
            Image.fromarray((s.image * 255).round().astype(np.uint8)).save(root / name, quality=95)
        (root / name).with_suffix(".txt").write_text(s.target.strip())
    for i, s in enumerate(media.bundled("audio", split, sounds)):
        rate = 44_100 if i % 2 == 0 else 22_050
        y = media.resample(s.wave, s.rate, rate)
        name = f"snd{i:02d}." + ("wav" if i % 2 == 0 else "flac")
        if name.endswith("wav"):
            media.write_wav(root / name, y, rate)
        else:
            soundfile.write(str(root / name), y, rate, format="FLAC")
        (root / name).with_suffix(".txt").write_text(s.target.strip())
    return root


def _bad_files(root):
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    media.write_wav(root / "slow.wav", np.zeros(4000, np.float32), 4000)          # 4 kHz: unsupported
    (root / "empty.flac").write_bytes(b"")


def test_folder_of_files_with_captions(tmp_path):
    root = _media_folder(tmp_path / "m")
    src = user_media.load(str(root))
    assert src.kind == "folder" and not src.skipped
    assert [s.source.rsplit("/", 1)[-1] for s in src.samples["image"]] == ["img00.png", "img01.png", "img02.jpg"]
    assert [s.source.rsplit("/", 1)[-1] for s in src.samples["audio"]] == ["snd00.wav", "snd01.flac", "snd02.wav"]
    first = next(media.bundled("image", "calib", 1))
    assert src.samples["image"][0].target == first.target          # caption from img00.txt
    assert np.abs(src.samples["image"][0].image - first.image).max() <= 0.5 / 255 + 1e-6
    assert src.samples["audio"][1].rate == 22_050 and src.samples["audio"][0].rate == 44_100
    ident = src.identity("image")
    assert ident["samples"] == 3 and len(ident["sha256"]) == 64


def test_audio_is_resampled_to_the_towers_rate(tmp_path):
    root = _media_folder(tmp_path / "m", images=0, sounds=2)
    src = user_media.load(str(root))
    cfg = open_checkpoint("tiny-omni-real").config
    s = towers.sound_spec(cfg)
    for sample in src.samples["audio"]:                             # 1 s at 44.1 / 22.05 kHz
        feats = media.audio_clips(sample.wave, sample.rate, s)
        assert feats.shape == (1, s.frames(s.sampling_rate), s.mel_bins)
    ref = next(media.bundled("audio", "calib", 1))
    a = media.audio_clips(ref.wave, ref.rate, s)
    b = media.audio_clips(src.samples["audio"][0].wave, src.samples["audio"][0].rate, s)
    assert float((a - b).abs().mean()) < 0.1 * float(a.abs().mean())   # the same sound, through 44.1 kHz WAV


def test_bad_files_one_line_each_skipped_or_refused(tmp_path):
    root = _media_folder(tmp_path / "m", images=1, sounds=1)
    _bad_files(root)
    src = user_media.load(str(root))
    assert len(src.samples["image"]) == len(src.samples["audio"]) == 1
    assert len(src.skipped) == 3 and all("\n" not in line for line in src.skipped)
    joined = " | ".join(src.skipped)
    assert "broken.png: not a readable image" in joined
    assert "slow.wav: sampling rate 4000 Hz is outside" in joined
    assert "empty.flac" in joined
    assert src.identity("audio")["skipped"] == src.skipped
    with pytest.raises(OmniqError, match=r"broken.png: not a readable image.*--bad-media skip"):
        user_media.load(str(root), bad="fail")
    with pytest.raises(OmniqError, match="--bad-media 'maybe'"):
        user_media.load(str(root), bad="maybe")


def test_a_folder_with_no_usable_file_is_an_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    _bad_files(root)
    with pytest.raises(OmniqError, match=r"no usable image or audio sample \(3 skipped; first problem: .*broken"):
        user_media.load(str(root))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(OmniqError, match=r"no usable image or audio sample \(0 skipped"):
        user_media.load(str(tmp_path / "nothing"))


def test_evaluation_needs_captions(tmp_path):
    root = _media_folder(tmp_path / "m", images=2, sounds=0)
    (root / "img01.txt").unlink()
    src = user_media.load(str(root), need_target=True, what="--eval-media")
    assert len(src.samples["image"]) == 1 and "img01.png: no caption to score" in src.skipped[0]


def test_saved_dataset_with_image_audio_and_caption_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = list(media.bundled("image", "calib", 2))
    snds = list(media.bundled("audio", "calib", 2))
    ds = datasets.Dataset.from_dict({
        "image": [Image.fromarray((s.image * 255).astype(np.uint8)) for s in imgs],
        "audio": [{"array": s.wave, "sampling_rate": s.rate} for s in snds],
        "caption": ["a picture", "another picture"],
        "prompt": ["Look: <image>", None],
    }).cast_column("image", datasets.Image())     # audio stays {"array", "sampling_rate"}: datasets' Audio
    #                                                 feature needs torchcodec to encode, not installed here
    ds.save_to_disk(str(tmp_path / "ds"))
    src = user_media.load(str(tmp_path / "ds"))
    assert src.kind == "dataset" and len(src.samples["image"]) == 2 and len(src.samples["audio"]) == 2
    assert src.samples["image"][0].prompt == "Look: <image>" and src.samples["image"][0].target == " a picture"
    assert src.samples["image"][1].prompt == media.IMAGE_PROMPTS[0]
    assert src.samples["audio"][0].rate == 16_000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "omniq.cli", *args], capture_output=True, text=True, timeout=1800)


def test_cli_refuses_a_folder_with_no_usable_file(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    _bad_files(root)
    p = _cli("quantize", "tiny-omni-real", "--recipe", "omni-nvfp4", "--out", str(tmp_path / "out"),
             "--calib-media", str(root))
    assert p.returncode == 2 and "no usable image or audio sample" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    _media_folder(tmp_path / "ok", 1, 1)
    _bad_files(tmp_path / "ok")
    p = _cli("quantize", "tiny-omni-real", "--recipe", "omni-nvfp4", "--out", str(tmp_path / "out2"),
             "--calib-media", str(tmp_path / "ok"), "--bad-media", "fail")
    assert p.returncode == 2 and "--bad-media skip would skip it" in p.stderr and not (tmp_path / "out2").exists()


def test_quantize_and_validate_with_user_media(tmp_path):
    """The user's media end to end: calibration from a folder (bad files skipped, each said once), then
    per-modality evaluation on another captioned folder."""
    calib = _media_folder(tmp_path / "calib", images=16, sounds=16, split="calib")
    _bad_files(calib)
    evald = _media_folder(tmp_path / "eval", images=4, sounds=4, split="eval")
    out = tmp_path / "art"
    p = _cli("quantize", "tiny-omni-real", "--recipe", "omni-nvfp4", "--out", str(out), "--calib-samples", "8",
             "--calib-seq-len", "128", "--calib-media", str(calib))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("warning: --calib-media skipped") == 3
    cal = json.loads((out / "omniq.json").read_text())["calibration"]
    for m in ("image", "audio"):
        assert cal[m]["source"] == str(calib) and cal[m]["kind"] == "folder" and len(cal[m]["skipped"]) == 3
        assert cal["modality_tokens"]["total"][m] > 0
    report = tmp_path / "r.json"
    p = _cli("validate", "tiny-omni-real", str(out), "--samples", "4", "--seq-len", "64", "--media-samples", "4",
             "--eval-media", str(evald), "--report", str(report), "--max-kl", "1", "--min-top1", "0.3",
             "--max-ppl-ratio", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    mods = json.loads(report.read_text())["modalities"]
    for m in ("image", "audio"):
        assert mods[m]["eval"]["set"] == str(evald) and mods[m]["eval"]["samples"] == 4
        assert mods[m]["tokens"] > 0
