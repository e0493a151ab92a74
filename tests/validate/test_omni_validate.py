"""`omniq validate` on Omni artifacts: text-only, image+text and audio+text evaluation sets, each with its own
metrics and gates; the media sets are the bundled eval split, disjoint from the calibration split."""

import json
import shutil

import pytest

from omniq.calib import media
from omniq.cli import main
from omniq.validate.run import validate

import golden

# The tiny model's audio captions sit near the default NVFP4 perplexity-ratio gate (1.05) at small sample
# counts (1.058 on 8 samples, 1.041 on 64); these structural tests relax that one gate.
SMALL = {"samples": 4, "seq_len": 128, "media_samples": 8, "max_ppl_ratio": 1.2}
KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens")


@pytest.fixture(scope="module")
def mm(omni_quantized):
    a = omni_quantized["mm"]
    assert a["rc"] == 0, a["stderr"][-2000:]
    return a["path"]


@pytest.fixture(scope="module")
def report(mm):
    return validate("tiny-omni", mm, **SMALL)


def test_each_modality_has_its_metrics_and_gates(report):
    assert all(k in report for k in (*KEYS, "passed"))          # the fixed top-level keys: the text set
    mods = report["modalities"]
    assert list(mods) == ["text", "image", "audio"]
    for name, m in mods.items():
        assert all(k in m for k in KEYS), name
        assert m["tokens"] > 0 and m["passed"] and m["failures"] == [] and m["gates"]["max_kl"] > 0
        assert 0 <= m["kl_mean"] < 0.1 and m["top1_agreement"] > 0.5 and m["ppl_reference"] > 1
    assert mods["text"]["kl_mean"] == report["kl_mean"]
    assert mods["image"]["eval"]["split"] == mods["audio"]["eval"]["split"] == "eval"
    assert mods["image"]["eval"]["scored"] == "caption tokens"
    assert report["passed"]


def test_streamed_report_equals_the_whole_model_golden(report, mm):
    golden.check("omni-mm", "omni-mm", report, mm)


def test_media_eval_split_is_disjoint_from_calibration():
    for m in ("image", "audio"):
        ev = {s.media_sha256() for s in media.bundled(m, "eval", 32)}
        cal = {s.media_sha256() for s in media.bundled(m, "calib", 64)}
        assert len(ev) == 32 and not ev & cal


def test_a_broken_projector_fails_only_its_modality(mm, tmp_path):
    """The image projector's first weight scaled: image+text fails its gates, text and audio still pass."""
    import torch
    from safetensors.torch import load_file, save_file

    art = tmp_path / "broken"
    shutil.copytree(mm, art)
    index = json.loads((art / "model.safetensors.index.json").read_text())
    name = "mlp1.1.weight"
    f = art / index["weight_map"][name]
    t = load_file(str(f))
    t[name] = (t[name].float() * -3.0).to(t[name].dtype)
    save_file(t, str(f), metadata={"format": "pt"})
    r = validate("tiny-omni", art, **SMALL)
    mods = r["modalities"]
    assert not r["passed"] and not mods["image"]["passed"]
    assert mods["text"]["passed"] and mods["audio"]["passed"]
    assert r["failures"] and all(x.startswith("image: ") for x in r["failures"])
    assert any(name in w for w in r["warnings"])                  # and the changed tower tensor is named


def test_cli_shows_the_media_sets(mm, capsys, tmp_path):
    rep = tmp_path / "r.json"
    # a smoke-sized run (4 captions per medium): its perplexity ratio is noise, so that one gate is widened here
    assert main(["validate", "tiny-omni", str(mm), "--samples", "2", "--seq-len", "64", "--media-samples", "4",
                 "--max-ppl-ratio", "1.2", "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "image+text" in out and "audio+text" in out
    assert set(json.loads(rep.read_text())["modalities"]) == {"text", "image", "audio"}


@pytest.mark.parametrize("name", ["tiny-omni", "tiny-omni-real"])
def test_the_omni_stream_runs_on_the_meta_device(name):
    """Both Omni layouts' towers (vision + projector, audio encoder + projector) embed their samples and the
    embeddings are spliced into the rows on PyTorch's `meta` device, then the layer stream runs every set: a
    tensor made on the CPU by mistake in the towers, the splice or the stream raises 'expected device'.
    (The quantized candidate's hooks on meta: test_validate_streamed.py.)"""
    import torch

    from omniq.validate import multimodal, stream
    from omniq.validate.artifact import read_artifact
    from omniq.validate.run import eval_texts, text_items, token_rows

    meta = torch.device("meta")
    ref = read_artifact(name)
    modalities, _ = multimodal.wanted(ref, 2)
    assert modalities == ["image", "audio"]
    items = text_items(token_rows(ref.tokenizer, eval_texts("eval")[1], 2, 32))
    for m in modalities:
        items += multimodal.items(ref, ref, m, multimodal.sample_inputs(ref, m, 2), meta)
    assert all(e.device == meta for it in items for by in it.media.values() for e in by.values())
    out = stream.run(ref, ref, items, device=meta)
    assert set(out.comparisons) == {"text", "image", "audio"}
    for by in out.comparisons.values():
        assert all(c.tokens > 0 and all(t.device == meta for t in c.kl + c.agree + c.nll) for c in by.values())


def test_a_reference_cache_hit_gives_the_same_omni_report(report, mm, tmp_path):
    """The image and audio sets' reference streams come from the cache too (their media embeddings are in
    the key), with every modality's numbers and floors unchanged."""
    volatile = ("seconds", "tokens_per_second", "memory", "reference_cache")
    miss = validate("tiny-omni", mm, **SMALL, reference_cache=tmp_path)
    hit = validate("tiny-omni", mm, **SMALL, reference_cache=tmp_path)
    assert (miss["reference_cache"]["hit"], hit["reference_cache"]["hit"]) == (False, True)
    for r in (miss, hit):
        assert json.dumps({k: v for k, v in r.items() if k not in volatile}, sort_keys=True) == \
            json.dumps({k: v for k, v in report.items() if k not in volatile}, sort_keys=True)
