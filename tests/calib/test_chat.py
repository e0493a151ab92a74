"""`--calib-format chat`: conversations rendered through the checkpoint's chat template, reasoning on for a
chosen share (`enable_thinking`), recorded in omniq.json; bad chat input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chat_fixtures import TEMPLATE, conversations, with_template, write_jsonl
from omniq.calib import chat, data
from omniq.cli import main
from omniq.errors import OmniqError
from omniq.model.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def tok(tiny_chat):
    return open_checkpoint(str(tiny_chat)).tokenizer


@pytest.mark.parametrize("share,on", [(0.0, 0), (0.25, 25), (0.5, 50), (0.3, 30), (1.0, 100)])
def test_the_reasoning_share_is_exact_and_spread_through_the_data(share, on):
    flags = [chat.reasoning_on(i, share) for i in range(100)]
    assert sum(flags) == on
    if share == 0.5:
        assert flags[:4] == [False, True, False, True]


def test_enable_thinking_reaches_the_template(tok):
    conv = conversations(1, "calib")[0]
    on = chat.render(tok, conv, True, "x", 0)
    off = chat.render(tok, conv, False, "x", 0)
    assert "<think>\n" + conv[1]["reasoning_content"] + "\n</think>\n" in on
    assert "<think></think>" + conv[1]["content"] in off and conv[1]["reasoning_content"] not in off
    # a conversation that ends with the user gets the generation prompt, opened as the real template does
    assert chat.render(tok, conv[:1], True, "x", 0).endswith("<|im_start|>assistant\n<think>\n")
    assert chat.render(tok, conv[:1], False, "x", 0).endswith("<|im_start|>assistant\n<think></think>")


def test_chat_calibration_rows_and_identity(tok, chat_jsonl):
    s = data.load(str(chat_jsonl["calib"]), tok, samples=4, seq_len=64, column="messages", fmt="chat",
                  reasoning_share=0.5)
    ident = s.identity
    assert ident["format"] == "chat" and ident["reasoning_share"] == 0.5 and ident["column"] == "messages"
    on, off = ident["conversations"]["reasoning_on"], ident["conversations"]["reasoning_off"]
    assert on + off == ident["texts_used"] and abs(on - off) <= 1
    assert len(ident["chat_template_sha256"]) == 64
    # the rows are the rendered conversations: the first one (reasoning off) starts the first row
    first = chat.render(tok, conversations(1, "calib")[0], False, "x", 0)
    ids = tok(first, add_special_tokens=False)["input_ids"]
    assert s.rows[0].tolist() == ids[:64]
    # another share renders other text
    all_on = data.load(str(chat_jsonl["calib"]), tok, samples=4, seq_len=64, column="messages", fmt="chat",
                       reasoning_share=1.0)
    assert all_on.identity["conversations"]["reasoning_off"] == 0 and all_on.sample_sha256 != s.sample_sha256


def test_text_calibration_records_its_format(tok):
    assert data.load("tiny-calib", tok, samples=1, seq_len=16).identity["format"] == "text"


def _bad_template(tiny_dir, work):
    return with_template(tiny_dir, work / "raising", TEMPLATE.replace("'system', 'user', 'assistant'", "'user'"))


BAD = {
    "no messages column": (lambda d, w: "CHAT", ["--calib", "TEXTCOL", "--calib-format", "chat"],
                           "no column 'messages' (columns: text)"),
    "messages is not a list of messages": (lambda d, w: "CHAT", ["--calib", "FLAT", "--calib-format", "chat"],
                                           "row 0 message 0 is str, not a {role, content} mapping"),
    "a message without content": (lambda d, w: "CHAT", ["--calib", "NOCONTENT", "--calib-format", "chat"],
                                  "row 0 message 1 (assistant) has no string 'content'"),
    "the template rejects the messages": (_bad_template, ["--calib", "CONVS", "--calib-format", "chat"],
                                          "the chat template rejects row 0 (reasoning off; TemplateError: "
                                          "unsupported role assistant)"),
    "a checkpoint with no chat template": (lambda d, w: "tiny", ["--calib", "CONVS", "--calib-format", "chat"],
                                           "the checkpoint has no chat template"),
    "plain text as chat": (lambda d, w: "CHAT", ["--calib", "TXT", "--calib-format", "chat"],
                           "chat data needs a column of messages"),
    "bundled docstrings as chat": (lambda d, w: "CHAT", ["--calib", "tiny-calib", "--calib-format", "chat"],
                                   "plain text, not conversations"),
    "share without chat": (lambda d, w: "tiny", ["--reasoning-share", "0.5"], "applies to chat data only"),
    "impossible share": (lambda d, w: "CHAT", ["--calib", "CONVS", "--calib-format", "chat",
                                               "--reasoning-share", "1.5"], "must be a share between 0 and 1"),
    "unknown format": (lambda d, w: "tiny", ["--calib-format", "sharegpt"], "expected text or chat"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_chat_input_is_one_line_exit_2_and_leaves_no_output(case, tiny_dir, tiny_chat, tmp_path, capsys):
    make_model, extra, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    convs = conversations(2, "calib")
    files = {"CONVS": write_jsonl(work / "c.jsonl", convs),
             "TEXTCOL": write_jsonl(work / "t.jsonl", ["hello"], column="text"),
             "FLAT": work / "flat.jsonl", "NOCONTENT": work / "nocontent.jsonl", "TXT": work / "c.txt"}
    files["FLAT"].write_text(json.dumps({"messages": ["user: hi", "assistant: hello"]}) + "\n")
    files["NOCONTENT"].write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant"}]}) + "\n")
    files["TXT"].write_text("some text\n\nmore text\n")
    model = make_model(tiny_dir, work)
    model = str(tiny_chat) if model == "CHAT" else str(model)
    extra = [str(files[a]) if a in files else a for a in extra]
    rc = main(["quantize", model, "--recipe", "fp8", "--out", str(tmp_path / "out" / "art"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("omniq: error: "), err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_chat_calibration_end_to_end_through_the_cli(tiny_chat, chat_jsonl, tmp_path):
    out = tmp_path / "chat-fp8"
    # its own process: ModelOpt patches torch process-wide (the test process never imports it)
    p = subprocess.run([sys.executable, "-m", "omniq.cli", "quantize", str(tiny_chat), "--recipe", "fp8", "--out",
                        str(out), "--calib", str(chat_jsonl["calib"]), "--calib-format", "chat",
                        "--reasoning-share", "0.75", "--calib-samples", "4", "--calib-seq-len", "128"],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "calibration: chat" in p.stdout and "reasoning on" in p.stdout
    cal = json.loads((out / "omniq.json").read_text())["calibration"]
    assert cal["format"] == "chat" and cal["reasoning_share"] == 0.75 and cal["column"] == "messages"
    assert cal["conversations"]["reasoning_on"] >= 1 and cal["samples"] == 4
    assert (out / "chat_template.jinja").read_text() == TEMPLATE     # the artifact keeps the template it was calibrated with


def test_chat_calibration_of_the_bundled_omni_text_share(tmp_path, chat_jsonl):
    """An Omni checkpoint: the text share of the calibration mix is rendered through its chat template."""
    from omniq.calib import multimodal
    from omniq.model.checkpoint import resolve

    ckpt = open_checkpoint(str(with_template(resolve("tiny-omni-real"), tmp_path / "omni-chat")))
    mm = multimodal.build(ckpt, {"text": 1.0}, calib=str(chat_jsonl["calib"]), calib_column="messages",
                          samples=2, seq_len=64, calib_format="chat", reasoning_share=0.5)
    assert mm.identity["text"]["format"] == "chat" and mm.identity["text"]["reasoning_share"] == 0.5
    with pytest.raises(OmniqError, match="no chat template"):
        multimodal.build(open_checkpoint("tiny-omni-real"), {"text": 1.0}, calib=str(chat_jsonl["calib"]),
                         calib_column="messages", samples=2, seq_len=64, calib_format="chat")
