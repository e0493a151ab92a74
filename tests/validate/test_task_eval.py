"""`omniq eval`: task accuracy of both checkpoints through lm-eval-harness (omniq.validate.task_eval, .lm).

The end-to-end tests run the CLI on the bundled model and a ModelOpt export of it with a small --limit; the
scorer is checked against the plain full-model forward, the gate logic on lm-eval-shaped results.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from omniq.cli import main  # noqa: E402
from omniq.errors import OmniqError  # noqa: E402
from omniq.model import forward  # noqa: E402
from omniq.validate import task_eval  # noqa: E402
from omniq.validate.artifact import read_artifact  # noqa: E402
from omniq.validate.lm import ArtifactLM, score  # noqa: E402
from omniq.validate.tasks import cloze  # noqa: E402
from checkpoint_dir import by_layer_shards, watch_reads  # noqa: E402

CLOZE = "omniq-docstring-cloze"


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    """The bundled task's jsonl goes into a per-session folder, not the user's cache."""
    monkeypatch.setenv("OMNIQ_CACHE", str(tmp_path_factory.getbasetemp() / "omniq-cache"))


def _user_task(folder: Path, rows: list[dict], name: str = "my-cloze") -> Path:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                    "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return yaml


def test_bundled_task_is_four_way_cloze_of_the_eval_split():
    rows = cloze.rows()
    assert len(rows) > 150
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        assert len(r["context"].split()) == cloze.CONTEXT_WORDS
    assert {r["label"] for r in rows} == {0, 1, 2, 3}            # the true one is not always first
    assert rows == cloze.rows()                                  # fixed seed


def test_score_matches_the_full_forward_with_padding():
    art = read_artifact("tiny")
    tok = art.tokenizer
    texts = ["Return the number of items in the list.", "Open a file.", "Raise ValueError if the key is missing."]
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    spans = [3, 2, 5]
    got = score(art, seqs, spans)                                # one batch: the shorter rows are right-padded
    w = dict(art.weights)
    for seq, n, (total, greedy) in zip(seqs, spans, got):
        lp = forward.logits(art.arch, w, torch.tensor([seq[:-1]]))[0].double().log_softmax(-1)
        target = torch.tensor(seq[1:])
        want = lp.gather(-1, target[:, None])[-n:].sum()
        assert total == pytest.approx(float(want), abs=1e-3)
        assert greedy == bool((lp.argmax(-1) == target)[-n:].all())
    # small batches and passes give the same numbers
    small = score(art, seqs, spans, batch_tokens=8, pass_bytes=1)
    assert [t for t, _ in small] == pytest.approx([t for t, _ in got], abs=1e-4)
    assert [g for _, g in small] == [g for _, g in got]


def test_rolling_and_generate_until():
    art = read_artifact("tiny")
    lm = ArtifactLM(art)
    text = "Return the number of items in the list."
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    (whole, _), = score(art, [ids], [len(ids) - 1])
    assert rolling == pytest.approx(whole, abs=1e-4)
    lm.max_length = 4                                            # windows: every token still scored once
    (windowed,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-4)

    from omniq.validate.generate import greedy

    lm.max_length = 2048
    (out,) = lm.generate_until([SimpleNamespace(args=("Return the", {"until": [], "max_gen_toks": 6}))])
    gen, _ = greedy(art.arch, dict(art.weights), torch.tensor([[lm.prefix_token_id] + lm.tok_encode("Return the")]),
                    6, lm.eot_token_id)
    assert out == lm.tok_decode([t for t in gen[0] if t != lm.eot_token_id])
    stop = out.split()[1] if len(out.split()) > 1 else None
    if stop:
        (cut,) = lm.generate_until([SimpleNamespace(args=("Return the", {"until": [stop], "max_gen_toks": 6}))])
        assert stop not in cut and out.startswith(cut)


def test_recovery_gate():
    def res(acc, se=0.03):
        return {"results": {"t": {"alias": "t", "acc,none": acc, "acc_stderr,none": se}},
                "n-samples": {"t": {"original": 100, "effective": 50}}}

    tasks, failures = task_eval.compare(res(0.60), res(0.58), ["t"], 0.95)
    t = tasks["t"]
    assert t["recovery"] == pytest.approx(0.58 / 0.60) and t["passed"] and not failures
    assert t["delta"] == pytest.approx(-0.02) and t["delta_stderr"] == pytest.approx((2 * 0.03 ** 2) ** 0.5)
    assert t["samples"] == 50
    tasks, failures = task_eval.compare(res(0.60), res(0.50), ["t"], 0.95)
    assert not tasks["t"]["passed"] and "recovery 0.833 < 0.95" in failures[0]
    tasks, _ = task_eval.compare(res(0.0), res(0.0), ["t"], 0.95)         # no recovery from a zero score
    assert tasks["t"]["recovery"] is None and tasks["t"]["passed"]


def test_eval_through_the_cli(artifacts, tmp_path, capsys):
    """The bundled task and a user task YAML, both models through lm-eval; report bound to the artifact."""
    user = _user_task(tmp_path, [{"context": "Return the number", "choices": ["of items.", "zebra qua"], "label": 0},
                                 {"context": "Open a", "choices": ["file.", "the of the"], "label": 0}])
    out = tmp_path / "eval.json"
    args = ["eval", "tiny", str(artifacts["nvfp4"]), "--tasks", f"{CLOZE},{user}", "--limit", "8",
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    shown = capsys.readouterr().out
    assert "recovery" in shown and "passed" in shown
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["format"] == "nvfp4" and report["limit"] == 8
    assert set(report["tasks"]) == {CLOZE, "my-cloze"}
    t = report["tasks"][CLOZE]
    assert t["samples"] == 8 and t["metric"] == "acc" and 0 <= t["reference"] <= 1 and 0 <= t["candidate"] <= 1
    assert t["reference_stderr"] > 0 and t["delta"] == pytest.approx(t["candidate"] - t["reference"])
    assert report["tasks"]["my-cloze"]["samples"] == 2
    assert report["bound_to"]["candidate"]["path"] == str(artifacts["nvfp4"].resolve())
    assert "omniq.json" in report["bound_to"]["candidate"]          # its sha256 (null: not made by omniq quantize)
    assert "config.json" in report["bound_to"]["reference"]["files"]

    # never overwritten without --force (refused before any model runs: one line naming it, bytes unchanged);
    # with --force, a gate no candidate meets fails with exit 1, the report replaced
    before = out.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists; pass --force" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(args + ["--force", "--min-recovery", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("omniq: error: eval: ") and "recovery" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out.read_text())["passed"] is False


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval.json"
    empty = _user_task(tmp_path, [{"context": "a", "choices": ["b", "c"], "label": 0}], name="empty")
    (tmp_path / "filters.py").write_text("def none(dataset):\n    return dataset.filter(lambda d: False)\n")
    empty.write_text(empty.read_text() + "process_docs: !function filters.none\n")   # every example filtered out
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("dataset_path: json\n")
    cases = [([f"{tmp_path / 'nope.yaml'}"], "no such task file"),
             ([str(wrong)], "no `task:` name"),
             ([str(empty)], "no examples to evaluate"),
             ([CLOZE, CLOZE], "names a task twice"),
             ([CLOZE, "--device", "cuda:7"], "--device cuda:7")]
    for tasks, words in cases:
        extra = tasks[1:] if "--device" in tasks else []
        tasks = tasks[:1] if extra else tasks
        code = main(["eval", "tiny", "tiny", "--tasks", ",".join(tasks), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (tasks, err)
        assert not out.exists()
    monkeypatch.setattr(task_eval.importlib.util, "find_spec", lambda name: None)
    code = main(["eval", "tiny", "tiny", "--tasks", CLOZE, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'omniq[eval]'" in err and not out.exists()


@pytest.mark.slow
def test_unknown_task_name_is_refused(capsys):
    """lm-eval's own registry is indexed for a name that is not bundled (about 20 s)."""
    code = main(["eval", "tiny", "tiny", "--tasks", "omniq-docstring-clozee"])
    err = capsys.readouterr().err
    assert code == 2 and "no task 'omniq-docstring-clozee'" in err and len(err.strip().splitlines()) == 1


def test_parse_tasks():
    specs = task_eval.parse_tasks(f" {CLOZE} , hellaswag")
    assert [s.name for s in specs] == [CLOZE, "hellaswag"]
    assert specs[0].folder == task_eval.BUNDLED_DIR and specs[1].folder is None
    with pytest.raises(OmniqError, match="at least one task"):
        task_eval.parse_tasks(" , ")


def test_pipeline_eval_stage_runs_omniq_eval(artifacts, tiny_dir, tmp_path):
    """The pipeline's real `eval` stage function (omniq.pipeline.stages.task_eval) on the bundled model."""
    from omniq.pipeline import stages
    from omniq.pipeline.spec import TaskEval

    ctx = SimpleNamespace(spec=SimpleNamespace(task_eval=TaskEval((CLOZE,), limit=4, min_recovery=0.5)),
                          source_dir=tiny_dir, artifact=artifacts["fp8"], out=tmp_path)
    result = stages.task_eval(ctx)
    assert result["report"] == "eval.json" and result["passed"] is True
    assert result["tasks"][CLOZE]["samples"] == 4
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["tasks"][CLOZE]["candidate"] == result["tasks"][CLOZE]["candidate"]
    assert report["bound_to"]["reference"]["path"] == str(Path(tiny_dir).resolve())


def test_omni_checkpoint_text_tasks(capsys):
    """An Omni checkpoint (the real layout) is evaluated through its language model (`language_model.*`)."""
    from omniq.validate.task_eval import evaluate

    r = evaluate("tiny-omni-real", "tiny-omni-real", CLOZE, limit=4)
    t = r["tasks"][CLOZE]
    assert r["passed"] and t["samples"] == 4 and t["reference"] == t["candidate"] and t["recovery"] in (1.0, None)


def test_eval_help_stays_light():
    from cli_subprocess import cli_imports

    r = cli_imports([["eval", "--help"]], ("torch", "lm_eval", "datasets"))
    assert r["rcs"] == [0] and r["heavy"] == [] and "--min-recovery" in r["stdout"]


# ----- memory preflight and bad input found mid-run ----------------------------------------------------
def _limit(monkeypatch, gib: float) -> None:
    from omniq import memory_limit

    monkeypatch.setattr(memory_limit, "available_bytes", lambda *a, **kw: int(gib * 2**30))
    monkeypatch.setattr(memory_limit, "limit_source", lambda *a, **kw: "cgroup v1 /fake")


def test_preflight_refuses_before_reading_weights(artifacts, tmp_path, monkeypatch, capsys):
    """The estimate (one layer, a pass's hidden states, a logits chunk) against a forced 10 MiB limit: exit
    2, one line with the figure and where the limit comes from, no weight read, no report."""
    from omniq.validate.lm import estimate_bytes

    est = estimate_bytes(read_artifact(artifacts["nvfp4"]))
    assert est["total_bytes"] == sum(v for k, v in est.items() if k != "total_bytes")
    assert est["largest_step_bytes"] >= 4 * 4096 * 256        # the embedding's float32 copy (kept)
    _limit(monkeypatch, 10 / 1024)
    read = watch_reads(monkeypatch)
    out = tmp_path / "eval.json"
    code = main(["eval", "tiny", str(artifacts["nvfp4"]), "--tasks", CLOZE, "--limit", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "eval needs about" in err and "0.01 GiB is available (cgroup v1 /fake)" in err
    assert not [n for n in read if n.endswith(".weight")] and not out.exists()


def test_a_generating_task_is_refused_when_a_float32_model_does_not_fit(artifacts, tmp_path, monkeypatch, capsys):
    """generate_until is not layer-streamed: a generating task gets its own figure (every weight in float32),
    checked before any weight is read; the same limit lets a scoring task through."""
    from omniq.validate import lm

    gen = tmp_path / "gen.yaml"
    data = tmp_path / "gen.jsonl"
    data.write_text(json.dumps({"context": "Return the", "answer": "number"}) + "\n")
    gen.write_text(f"task: my-gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                   "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{context}}\"\n"
                   "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\".\"]\n  max_gen_toks: 4\n"
                   "metric_list:\n  - metric: exact_match\n")
    real = lm.estimate_bytes
    monkeypatch.setattr(lm, "estimate_bytes", lambda art, generate=False: {
        **real(art, generate=generate), **({"generation_bytes": 9 * 2**30} if generate else {})})
    _limit(monkeypatch, 8)
    read = watch_reads(monkeypatch)
    code = main(["eval", "tiny", str(artifacts["fp8"]), "--tasks", f"{CLOZE},{gen}", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tasks my-gen generates text" in err and "9.00 GiB" in err and "8.00 GiB is available" in err
    assert not [n for n in read if n.endswith(".weight")]
    assert task_eval.count_examples(task_eval.task_manager(task_eval.parse_tasks(str(gen))),
                                    task_eval.parse_tasks(str(gen)), None)[1] == {"my-gen": {"generate_until"}}


def test_a_shard_deleted_mid_run_and_a_full_disk(artifacts, tiny_dir, tmp_path, monkeypatch, capsys):
    """The reference's last shard deleted once the first layer is read: exit 2, one line naming it, no
    report. --out on a full disk: exit 1, one line, nothing left there."""
    from small_disk import left_on, small_tmpfs

    src = tmp_path / "ref"
    src.mkdir()
    late = by_layer_shards(tiny_dir, src)
    out = tmp_path / "eval.json"
    with monkeypatch.context() as m:
        watch_reads(m, delete=late)
        code = main(["eval", str(src), str(artifacts["fp8"]), "--tasks", CLOZE, "--limit", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and late.name in err and "disappeared" in err, err
    assert not out.exists()

    with small_tmpfs(tmp_path, "2m", free=1024) as mnt:
        code = main(["eval", "tiny", str(artifacts["fp8"]), "--tasks", CLOZE, "--limit", "2",
                     "--out", str(mnt / "eval.json")])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and "no space left" in err, err
        assert left_on(mnt) == []


# ----- devices: every tensor of the eval path on the run's device ---------------------------------------
META = torch.device("meta")


def test_the_eval_scorer_and_generation_step_run_on_the_meta_device(artifacts):
    """`omniq eval`'s layer-streamed scorer (two passes, ragged lengths) and generate_until's whole-model step
    on an NVFP4 + FP8-KV artifact, weights moved to `meta`: a tensor made on the CPU anywhere (batching,
    padding, the head's chunks, dequantization, activation / KV quantization) raises 'expected device'."""
    from omniq.validate.lm import score_on_device

    art = read_artifact(artifacts["nvfp4-kv"])
    seqs = [[1, *range(5, 5 + n)] for n in (40, 7, 23)]
    total, missed = score_on_device(art, seqs, [5, 3, 9], device=META, batch_tokens=64, pass_bytes=1)
    assert total.device == missed.device == META and total.shape == missed.shape == (3,)
    assert total.dtype == torch.float64
    lm = ArtifactLM(art, device=META)
    model = lm.whole_model()
    assert all(t.device == META for t in model[0].values())
    out = lm.next_logits(model, torch.tensor([[1, 5, 6, 7]], device=META))
    assert out.device == META and out.shape == (art.arch.vocab_size,)
