"""`omniq validate --generate N`: greedy continuations by both models through the validate forward; identical
prefixes, EOS rates and the gated mean-length ratio."""

from __future__ import annotations

import json

import torch

from omniq.cli import main
from omniq.validate import generate
from omniq.validate.artifact import read_artifact
from omniq.validate.run import eval_texts


def test_generate_through_the_cli_records_the_generation_section(artifacts, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main(["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32", "--generate", "3",
               "--max-new-tokens", "20", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0 and "generation:" in out          # the table has the generation rows (wrapped to the width)
    g = json.loads(report.read_text())["generation"]
    assert g["prompts"] == 3 and g["max_new_tokens"] == 20 and g["same_first_64"] is None
    assert 0 <= g["same_first_16"] <= 1 and 0 < g["mean_length_reference"] <= 20
    assert g["length_ratio"] == g["mean_length_candidate"] / g["mean_length_reference"] and g["passed"]


def test_the_reference_against_itself_is_identical_and_a_model_that_stops_at_once_fails(artifacts):
    ref = read_artifact("tiny")
    _, docs = eval_texts("eval")
    same = generate.compare(ref, ref, docs, 2, max_new_tokens=16)
    assert same["same_first_16"] == 1.0 and same["length_ratio"] == 1.0 and same["passed"]
    # a candidate whose lm_head prefers EOS above everything: one token per prompt, the length gate fails
    cand = read_artifact(artifacts["fp8"])
    bias = torch.zeros(ref.arch.vocab_size)
    bias[ref.tokenizer.eos_token_id] = 1e4
    weights = dict(cand.weights)
    weights["lm_head.bias"] = bias
    r = generate.compare(ref, cand, docs, 2, max_new_tokens=16, candidate_weights=weights)
    assert r["eos_rate_candidate"] == 1.0 and r["mean_length_candidate"] == 1.0
    assert not r["passed"] and r["failures"][0].startswith("generation: length_ratio")


def test_omni_generation_is_reported_and_gated_per_modality(omni_real_quantized, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")          # the terminal table unwrapped
    a = omni_real_quantized
    assert a["rc"] == 0, a["stderr"][-2000:]
    report = tmp_path / "r.json"
    gates = tmp_path / "g.yaml"
    # omni-nvfp4 (NVFP4 routed experts only) is gated as `mixed`
    gates.write_text("mixed:\n  max_ppl_ratio: 2.0\n  image: {min_length_ratio: 0.5, max_length_ratio: 2.0}\n")
    rc = main(["validate", "tiny-omni-real", str(a["path"]), "--samples", "2", "--seq-len", "32", "--media-samples", "2",
          "--generate", "2", "--max-new-tokens", "12", "--gates", str(gates), "--report", str(report)])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert "generation (image+text prompts): mean length ratio" in out and "audio+text prompts" in out and "audio+text prompts" in out
    g = json.loads(report.read_text())["generation"]
    assert set(g["modalities"]) == {"image", "audio"}
    for m, s in g["modalities"].items():
        assert s["prompts"] == 2 and len(s["lengths_reference"]) == 2 and 0 < s["mean_length_reference"] <= 12
        assert s["length_ratio"] == s["mean_length_candidate"] / s["mean_length_reference"]
    # the image prompts take the file's own band, the audio prompts the format's default
    assert g["modalities"]["image"]["gates"] == {"min_length_ratio": 0.5, "max_length_ratio": 2.0}
    assert g["modalities"]["audio"]["gates"] == {"min_length_ratio": 0.85, "max_length_ratio": 1.15}


def test_a_candidate_that_stops_at_once_fails_each_media_modality(omni_real_quantized):
    from omniq.validate import multimodal

    ref = read_artifact("tiny-omni-real")
    _, docs = eval_texts("eval")
    media = {m: multimodal.sample_inputs(ref, m, 2) for m in ("image", "audio")}
    same = generate.compare(ref, ref, docs, 2, max_new_tokens=10, media=media)
    assert all(s["same_first_16"] is None and s["length_ratio"] == 1.0 for s in same["modalities"].values())
    assert same["passed"]
    weights = dict(ref.weights)
    bias = torch.zeros(ref.arch.vocab_size)
    bias[ref.tokenizer.eos_token_id] = 1e4
    weights[f"{ref.arch.prefix}lm_head.bias"] = bias
    r = generate.compare(ref, ref, docs, 2, max_new_tokens=10, media=media, candidate_weights=weights)
    assert [f.split(":")[0] for f in r["failures"]] == ["generation", "generation (image)", "generation (audio)"]
    assert r["modalities"]["audio"]["eos_rate_candidate"] == 1.0 and not r["passed"]


def test_a_length_change_within_the_prompts_noise_does_not_fail():
    # one prompt much longer, one much shorter: ratio outside the band, the paired difference not significant
    s = generate.statistics([[1] * 10, [1] * 30], [[1] * 30, [1] * 2], [False] * 2, [False] * 2, 32,
                            (0.85, 1.15), "generation")
    assert s["length_ratio"] == 0.8 and s["length_difference"]["mean"] == -4.0
    assert not s["length_difference"]["significant"] and s["passed"]
    # the same mean change on every prompt is significant
    s = generate.statistics([[1] * 10, [1] * 30], [[1] * 6, [1] * 26], [False] * 2, [False] * 2, 32,
                            (0.85, 1.15), "generation")
    assert s["length_ratio"] == 0.8 and s["length_difference"]["significant"] and not s["passed"]


def test_generation_weights_go_to_the_run_device(artifacts):
    """--generate decodes on validate's --device: every weight dequantized and moved there, one at a time (on
    `meta` here: a weight left on the CPU fails; the decoding loop itself reads ids back each step, which
    `meta` cannot)."""
    import torch

    meta = torch.device("meta")
    w = generate.weights_on(read_artifact(artifacts["nvfp4"]), meta)
    assert w and all(t.device == meta and t.dtype == torch.float32 for t in w.values())
