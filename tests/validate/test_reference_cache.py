"""`omniq validate --reference-cache DIR`: the reference's two streams stored once per reference, rows and code;
a later candidate of the same reference runs only its own stream and gets the same report bit for bit."""

from __future__ import annotations

import json

from omniq.cli import main
from omniq.model import forward
from omniq.validate import reference_cache
from omniq.validate.artifact import read_artifact
from omniq.validate.run import eval_texts, text_items, token_rows, validate

VOLATILE = ("seconds", "tokens_per_second", "memory", "reference_cache")


def _same(a: dict, b: dict) -> None:
    a = {k: v for k, v in a.items() if k not in VOLATILE}
    b = {k: v for k, v in b.items() if k not in VOLATILE}
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _counting_layers(monkeypatch) -> list:
    calls = []
    real = forward.decoder_layer

    def counted(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(forward, "decoder_layer", counted)
    return calls


def test_a_second_candidate_runs_only_its_own_stream_and_gets_the_same_report(artifacts, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain = validate("tiny", artifacts["fp8"], samples=2, seq_len=64)
    calls = _counting_layers(monkeypatch)
    first = validate("tiny", artifacts["nvfp4-kv"], samples=2, seq_len=64, reference_cache=cache)
    miss_calls = len(calls)
    assert first["reference_cache"]["hit"] is False and len(list(cache.glob("*.safetensors"))) == 1
    calls.clear()
    second = validate("tiny", artifacts["fp8"], samples=2, seq_len=64, reference_cache=cache)
    assert second["reference_cache"]["hit"] is True
    assert second["reference_cache"]["key"] == first["reference_cache"]["key"]
    assert len(calls) * 3 == miss_calls                  # one stream of three through the layers
    _same(second, plain)                                 # the noise floor and every metric, bit for bit
    assert second["noise_floor"] == first["noise_floor"]


def test_the_key_follows_the_rows_the_noise_floor_and_the_reference():
    ref = read_artifact("tiny")
    docs = eval_texts("eval")[1]
    items = text_items(token_rows(ref.tokenizer, docs, 2, 64))
    k = reference_cache.key(ref, items, noise_floor=True, device="cpu")
    assert k == reference_cache.key(ref, text_items(token_rows(ref.tokenizer, docs, 2, 64)), noise_floor=True,
                                    device="cpu")
    others = {reference_cache.key(ref, text_items(token_rows(ref.tokenizer, docs, 3, 64)), noise_floor=True,
                                  device="cpu"),
              reference_cache.key(ref, items, noise_floor=False, device="cpu"),
              reference_cache.key(read_artifact("tiny-omni"), items, noise_floor=True, device="cpu")}
    assert k not in others and len(others) == 3


def test_a_damaged_cache_file_is_recomputed_with_a_warning(artifacts, tmp_path):
    cache = tmp_path / "cache"
    first = validate("tiny", artifacts["fp8"], samples=2, seq_len=64, reference_cache=cache)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    again = validate("tiny", artifacts["fp8"], samples=2, seq_len=64, reference_cache=cache)
    assert again["reference_cache"]["hit"] is False
    assert any("reference cache" in w and "recomputed" in w for w in again["warnings"])
    _same({**again, "warnings": []}, {**first, "warnings": []})
    third = validate("tiny", artifacts["fp8"], samples=2, seq_len=64, reference_cache=cache)
    assert third["reference_cache"]["hit"] is True              # the damaged file was replaced


def test_the_cli_flag_and_a_cache_path_that_is_a_file(artifacts, tmp_path, capsys):
    cache, rep = tmp_path / "cache", tmp_path / "r.json"
    args = ["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32"]
    assert main(args + ["--reference-cache", str(cache), "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["reference_cache"]["dir"] == str(cache)
    assert main(args + ["--reference-cache", str(cache), "--report", str(rep), "--force"]) == 0
    assert json.loads(rep.read_text())["reference_cache"]["hit"] is True
    blocker = tmp_path / "file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(args + ["--reference-cache", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and len(err.strip().splitlines()) == 1
