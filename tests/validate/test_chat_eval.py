"""`omniq validate --eval-format chat`: conversations rendered through the reference's chat template, the report
split by reasoning on / off (same metric keys, own noise floor and gates per split), bad input one line."""

from __future__ import annotations

import json

import pytest
import yaml

from chat_fixtures import TEMPLATE, with_template, write_jsonl
from omniq.cli import main
from omniq.validate.run import METRIC_KEYS, NOISE_FLOOR_KEYS


def test_chat_evaluation_is_split_by_reasoning(artifacts, tiny_chat, chat_jsonl, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = main(["validate", str(tiny_chat), str(artifacts["fp8"]), "--eval", str(chat_jsonl["eval"]),
               "--eval-format", "chat", "--reasoning-share", "0.25", "--samples", "4", "--seq-len", "64",
               "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reasoning on:" in out and "reasoning off:" in out
    r = json.loads(report.read_text())
    ev = r["eval"]
    assert ev["format"] == "chat" and ev["reasoning_share"] == 0.25 and ev["column"] == "messages"
    assert ev["rows_per_split"] == {"reasoning_on": 1, "reasoning_off": 3} and ev["rows"] == 4
    assert ev["conversations"] == {"reasoning_on": 7, "reasoning_off": 23}     # 30 conversations, a quarter on
    reasoning = r["reasoning"]
    assert reasoning["share"] == 0.25
    for split, rows in (("on", 1), ("off", 3)):
        s = reasoning[split]
        assert set(METRIC_KEYS) <= set(s) and s["tokens"] == rows * 64 and s["passed"]
        assert set(s["noise_floor"]) == set(NOISE_FLOOR_KEYS) and s["noise_floor"]["tokens"] == rows * 64
        assert s["gates"]["multiplier"] == 60.0 and [g["metric"] for g in s["gate_table"]] == [
            "kl_mean", "top1_agreement", "ppl_ratio"]
        assert r["gate_table"][f"reasoning_{split}"] == s["gate_table"]
    # the top level is every row of both splits
    assert r["tokens"] == reasoning["on"]["tokens"] + reasoning["off"]["tokens"]
    lo, hi = sorted((reasoning["on"]["kl_mean"], reasoning["off"]["kl_mean"]))
    assert lo <= r["kl_mean"] <= hi


def test_each_split_is_gated(artifacts, tiny_chat, chat_jsonl, tmp_path, capsys):
    gates = tmp_path / "g.yaml"
    gates.write_text(yaml.safe_dump({"fp8": {"text": {"max_kl": 1e-6}}}))
    report = tmp_path / "r.json"
    rc = main(["validate", str(tiny_chat), str(artifacts["fp8"]), "--eval", str(chat_jsonl["eval"]),
               "--eval-format", "chat", "--samples", "2", "--seq-len", "64", "--gates", str(gates),
               "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 1
    r = json.loads(report.read_text())
    assert not r["reasoning"]["on"]["passed"] and not r["reasoning"]["off"]["passed"]
    assert any(f.startswith("reasoning on: kl_mean") for f in r["failures"]), r["failures"]
    assert any(f.startswith("reasoning off: kl_mean") for f in r["failures"]) and "reasoning off: kl_mean" in err


def _bad_template(tiny_dir, tmp_path):
    return with_template(tiny_dir, tmp_path / "raising", TEMPLATE.replace("'system', 'user', 'assistant'", "'user'"))


BAD = {
    "no chat template": (lambda d, t, tmp: "tiny", ["--eval", "CONVS"], "the checkpoint has no chat template"),
    "no messages column": (lambda d, t, tmp: t, ["--eval", "TEXTCOL"], "--eval "),
    "the template rejects the messages": (lambda d, t, tmp: _bad_template(d, tmp), ["--eval", "CONVS"],
                                          "the chat template rejects row 0"),
    "no --eval": (lambda d, t, tmp: t, [], "--eval-format chat needs --eval"),
    "one row cannot be split": (lambda d, t, tmp: t, ["--eval", "CONVS", "--samples", "1"], "pass --samples 2"),
    "share without chat": (lambda d, t, tmp: t, ["--eval-format", "text", "--reasoning-share", "0.3"],
                           "applies to chat data only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_chat_evaluation_is_one_line_exit_2_and_writes_no_report(case, artifacts, tiny_dir, tiny_chat,
                                                                       chat_jsonl, tmp_path, capsys):
    make_ref, extra, message = BAD[case]
    ref = make_ref(tiny_dir, tiny_chat, tmp_path)
    files = {"CONVS": str(chat_jsonl["eval"]), "TEXTCOL": str(write_jsonl(tmp_path / "t.jsonl", ["x"], "text"))}
    args = ["validate", str(ref), str(artifacts["fp8"]), "--eval-format", "chat", "--samples", "2",
            "--seq-len", "32", "--report", str(tmp_path / "r.json"), *[files.get(a, a) for a in extra]]
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("omniq: error: "), err
    assert message in lines[0], lines[0]
    if case == "no messages column":
        assert "no column 'messages' (columns: text)" in lines[0] and "calibration" not in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_chat_generation_prompts_are_split_by_reasoning(artifacts, tiny_chat, chat_jsonl, tmp_path):
    from omniq.calib import chat
    from chat_fixtures import conversations

    report = tmp_path / "r.json"
    rc = main(["validate", str(tiny_chat), str(artifacts["fp8"]), "--eval", str(chat_jsonl["eval"]),
               "--eval-format", "chat", "--samples", "2", "--seq-len", "32", "--generate", "4",
               "--max-new-tokens", "8", "--report", str(report)])
    g = json.loads(report.read_text())["generation"]
    assert rc in (0, 1) and set(g["reasoning"]) == {"on", "off"}
    assert g["reasoning"]["on"]["prompts"] == 2 and g["reasoning"]["off"]["prompts"] == 2 and g["prompts"] == 4
    assert g["lengths_reference"] == g["reasoning"]["on"]["lengths_reference"] + g["reasoning"]["off"]["lengths_reference"]
    # the prompt is the conversation without its last assistant turn, opened for the model's answer
    conv = conversations(1, "eval")[0]
    assert chat.prompt_of(conv) == conv[:1]


def test_chat_generation_needs_enough_conversations_per_split(artifacts, tiny_chat, chat_jsonl, tmp_path, capsys):
    rc = main(["validate", str(tiny_chat), str(artifacts["fp8"]), "--eval", str(chat_jsonl["eval"]),
               "--eval-format", "chat", "--reasoning-share", "0.1", "--samples", "2", "--seq-len", "32",
               "--generate", "40", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "has only 3 conversations with reasoning on" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
