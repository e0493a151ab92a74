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
