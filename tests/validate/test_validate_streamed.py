"""The layer-streamed validate: at most one layer of each checkpoint in memory, every tensor on the run's
device (run on PyTorch's `meta` device), the memory preflight and `--device` refusals, `--no-noise-floor`.
(That its reports equal today's whole-model ones field for field: test_validate.py / test_omni_validate.py
against tests/validate/data/golden_reports.json.)"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from omniq import memory_limit
from omniq.cli import main
from omniq.errors import OmniqError
from omniq.validate import artifact as artifact_mod
from omniq.validate import stream
from omniq.validate.artifact import read_artifact
from omniq.validate.run import eval_texts, text_items, token_rows, validate

META = torch.device("meta")


@pytest.fixture(scope="module")
def pair(artifacts):
    return read_artifact("tiny"), read_artifact(artifacts["nvfp4-kv"])


def _rows(ref, samples=4, seq_len=96):
    return token_rows(ref.tokenizer, eval_texts("eval")[1], samples, seq_len)


def test_the_whole_stream_runs_on_the_meta_device(pair):
    """Weights read from the shards are moved to `meta`; a tensor made on the CPU anywhere in the forward,
    the hooks (dequantization, FP8 / NVFP4 activations, FP8 KV cache, fused q/k/v scales), the logits
    chunks or the metrics raises 'not on the expected device'."""
    ref, cand = pair
    out = stream.run(ref, cand, text_items(_rows(ref, 10)), device=META)     # 2 batches, one ragged
    by = out.comparisons["text"]
    assert set(by) == {"noise_floor", "candidate"}
    for c in by.values():
        assert c.tokens == 10 * 96
        assert all(t.device == META for t in c.kl + c.agree + c.positions + c.nll)
    assert set(out.sqnr) == set(cand.quantized) and all(v.device == META for v in out.sqnr.values())
    assert out.changed and all(v.device == META for v in out.changed.values())


def test_at_most_one_layer_of_each_checkpoint_is_held(pair, monkeypatch):
    ref, cand = pair
    alive: list[weakref.ref] = []
    most = {}
    real_init = artifact_mod.UnitWeights.__init__

    def init(self, art, stored, names, keep=0):
        real_init(self, art, stored, names, keep)
        if len(names) > 1 or any(".layers." in n for n in names):     # a step, not LazyWeights' one tensor
            mine = [r for r in alive if r() is not None and r().artifact is art]
            most[id(art)] = max(most.get(id(art), 0), len(mine) + 1)
            alive.append(weakref.ref(self))

    monkeypatch.setattr(artifact_mod.UnitWeights, "__init__", init)
    stream.run(ref, cand, text_items(_rows(ref)))
    assert most == {id(ref): 1, id(cand): 1}


def test_estimate_counts_the_largest_layer_of_both_and_the_hidden_states(pair):
    ref, cand = pair
    est = stream.estimate_bytes(ref, cand, tokens=1000)
    moe = stream.layer_names(ref, ref.arch.layers_of("E")[0])
    assert est["largest_step_bytes"] >= ref.unit_bytes(moe) + cand.unit_bytes(moe)
    assert est["hidden_states_bytes"] == 3 * 1000 * ref.arch.hidden_size * 4
    assert stream.estimate_bytes(ref, cand, 1000, with_noise_floor=False)["hidden_states_bytes"] == 2 * 1000 * 256 * 4


def test_embedding_and_head_are_converted_once_and_shared_when_identical(pair, monkeypatch):
    """The embedding and head steps keep one float32 form per artifact (converted once, not per batch or
    logits chunk), and the candidate's never-quantized embedding / lm_head uses the reference's (same stored
    bytes): at the real width that is one 1.4 GB float32 matrix instead of one per stream and chunk."""
    ref, cand = pair
    names = stream.head_names(ref)
    r = ref.unit(names, "cpu", stream.KEEP_ALL)
    c = cand.unit(names, "cpu", stream.KEEP_ALL)
    head = f"{ref.arch.prefix}lm_head.weight"
    assert head in c.share_identical(r)
    assert c[head] is r[head] and r[head] is r[head]            # one float32 tensor, kept
    conversions = []
    real = artifact_mod.Artifact.dequantize

    def counting(self, name, stored):
        conversions.append(name)
        return real(self, name, stored)

    monkeypatch.setattr(artifact_mod.Artifact, "dequantize", counting)
    stream.run(ref, cand, text_items(_rows(ref, 10)))           # 2 batches, several logits chunks per stream
    for name in (head, f"{ref.arch.prefix}backbone.embeddings.weight"):
        assert conversions.count(name) == 1, (name, conversions.count(name))
    # a different head is not shared: the estimate counts both float32 copies
    est = stream.estimate_bytes(ref, cand, tokens=1000)
    assert est["largest_step_bytes"] >= 2 * 4 * ref.arch.vocab_size * ref.arch.hidden_size


def test_preflight_refuses_before_reading_weights(artifacts, monkeypatch, capsys):
    monkeypatch.setattr(memory_limit, "available_bytes", lambda *a, **kw: 10 * 2**20)
    monkeypatch.setattr(memory_limit, "limit_source", lambda *a, **kw: "cgroup v1 /fake")
    read = []
    monkeypatch.setattr(artifact_mod.ShardReader, "get", lambda self, n, real=artifact_mod.ShardReader.get:
                        read.append(n) or real(self, n))
    code = main(["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "GiB" in err and "cgroup v1 /fake" in err and "--samples" in err
    assert not [n for n in read if n.endswith(".weight")]          # only the scales were read


def test_generate_is_refused_when_both_float32_models_do_not_fit(artifacts, monkeypatch, capsys):
    """--generate decodes with whole-model forwards: its own figure (both models in float32) is checked
    before any weight is read, beside the streamed one."""
    from omniq.validate import run as run_mod

    ref, cand = read_artifact("tiny"), read_artifact(artifacts["fp8"])
    gen = run_mod.generation_bytes(ref, cand)
    assert gen == 8 * sum(int(torch.tensor(ref.logical_shape(n)).prod()) for n in ref.base_names)
    monkeypatch.setattr(memory_limit, "available_bytes", lambda *a, **kw: 8 * 2**30)
    monkeypatch.setattr(memory_limit, "limit_source", lambda *a, **kw: "cgroup v1 /fake")
    monkeypatch.setattr(run_mod, "generation_bytes", lambda r, c: 9 * 2**30)     # a model too big to decode
    code = main(["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32", "--generate", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--generate 2" in err and "9.00 GiB" in err, err


def test_device_cuda_without_cuda_is_refused(artifacts, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for spec, words in (("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"), ("tpu", "expected cpu")):
        code = main(["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "32",
                     "--device", spec])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (spec, err)


def test_no_noise_floor_and_the_device_in_the_report(artifacts, tmp_path):
    rep = tmp_path / "r.json"
    assert main(["validate", "tiny", str(artifacts["fp8"]), "--samples", "2", "--seq-len", "64",
                 "--device", "cpu", "--no-noise-floor", "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())
    assert data["noise_floor"] is None and data["device"] == "cpu"
    assert data["memory"]["total_bytes"] < data["memory"]["available_bytes"] and data["memory"]["limit_source"]
    with_floor = validate("tiny", artifacts["fp8"], samples=2, seq_len=64)
    assert with_floor["kl_mean"] == data["kl_mean"]                  # the third stream changes nothing else
    assert 0 < with_floor["noise_floor"]["kl_mean"] < with_floor["kl_mean"]


def test_large_layers_release_their_pages_and_maps_with_the_same_numbers(pair, monkeypatch):
    """After a layer above KEEP_FLOAT32_BYTES the stream trims the heap and closes the shards' memory maps
    (reopened on the next read); forced on every layer of the bundled model, the numbers are unchanged."""
    ref, cand = pair
    rows = text_items(_rows(ref))
    before = stream.run(ref, cand, rows).summary()
    unmapped = []
    real = artifact_mod.ShardReader.unmap
    monkeypatch.setattr(artifact_mod.ShardReader, "unmap", lambda self: unmapped.append(self) or real(self))
    monkeypatch.setattr(stream, "KEEP_FLOAT32_BYTES", 0)
    after = stream.run(ref, cand, rows).summary()
    assert len(unmapped) == 2 * ref.arch.num_layers
    assert json.dumps(before[0], sort_keys=True, default=str) == json.dumps(after[0], sort_keys=True, default=str)


def test_a_large_layer_read_matrix_by_matrix_gives_the_same_numbers(pair, monkeypatch):
    """Layers above LAZY_LAYER_BYTES (a real-width MoE layer) are not loaded whole: each matrix is read from
    its shard when used; forced on every layer of the bundled model, the report is the same."""
    ref, cand = pair
    rows = text_items(_rows(ref))
    before = stream.run(ref, cand, rows).summary()
    monkeypatch.setattr(stream, "LAZY_LAYER_BYTES", 0)
    reads = []
    real = artifact_mod.Artifact.read_stored
    monkeypatch.setattr(artifact_mod.Artifact, "read_stored", lambda self, n, d: reads.append(n) or real(self, n, d))
    after = stream.run(ref, cand, rows).summary()
    assert reads and all(".layers." in n for n in reads)
    assert json.dumps(before, sort_keys=True, default=str) == json.dumps(after, sort_keys=True, default=str)
    est = stream.estimate_bytes(ref, cand, 1000)
    monkeypatch.setattr(stream, "LAZY_LAYER_BYTES", 1 << 40)
    assert est["largest_step_bytes"] <= stream.estimate_bytes(ref, cand, 1000)["largest_step_bytes"]


def test_a_layer_read_matrix_by_matrix_gives_pages_back_as_it_goes(pair, monkeypatch):
    """A real-width MoE layer is read one matrix at a time; every LAZY_TRIM_EVERY reads the freed heap pages go
    back to the OS (without it one such step peaked at 6.6 GiB against 2.9 GiB: artifact.LAZY_TRIM_EVERY)."""
    ref, _ = pair
    trims = []
    monkeypatch.setattr(artifact_mod, "give_back", lambda *a, **k: trims.append(1))
    names = [n for n in stream.layer_names(ref, 1) if n.endswith(".weight")]
    unit = ref.unit(names, "cpu", lazy=True)
    for n in names:
        assert unit[n].dtype == torch.float32
    assert len(names) >= 2 * artifact_mod.LAZY_TRIM_EVERY
    assert len(trims) == len(names) // artifact_mod.LAZY_TRIM_EVERY
    assert not trims or not ref.unit(names, "cpu")[names[0]].is_meta      # an eager unit never trims
    assert len(trims) == len(names) // artifact_mod.LAZY_TRIM_EVERY
