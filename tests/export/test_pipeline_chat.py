"""Chat-format data in the pipeline file: `calibration:` / `evaluation:` take `format: chat` and
`reasoning_share` (quantize's --calib-format / validate's --eval-format, --reasoning-share), passed to the
stages, part of the cache keys, recorded in omniq.json / validation.json and printed on the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from omniq.errors import OmniqError
from omniq.pipeline import spec as pipeline_spec


def _parse(tmp_path: Path, **over) -> pipeline_spec.PipelineSpec:
    data = {"name": "chat", "source": "tiny", "recipes": ["fp8"], **over}
    return pipeline_spec.parse(data, tmp_path / "pipeline.yaml")


def test_chat_fields_are_parsed_resolved_and_keyed(tmp_path):
    s = _parse(tmp_path, calibration={"set": "c.jsonl", "format": "chat", "reasoning_share": 0.25},
               evaluation={"set": "e.jsonl", "format": "chat", "column": "conv", "split": "test"})
    cal, ev = s.calibration, s.evaluation
    assert (cal.format, cal.reasoning_share, cal.column) == ("chat", 0.25, "messages")
    assert (ev.format, ev.reasoning_share, ev.column, ev.split) == ("chat", 0.5, "conv", "test")   # default share
    assert cal.identity()["format"] == "chat" and cal.identity()["reasoning_share"] == 0.25
    # text data keeps the keys it had before chat data existed
    text = _parse(tmp_path).calibration
    assert (text.format, text.reasoning_share) == ("text", None)
    assert text.identity() == {"set": text.set, "samples": 64, "seq_len": 256, "column": "text", "split": "train"}


@pytest.mark.parametrize("over,words", [
    ({"calibration": {"format": "dialog"}}, "calibration.format 'dialog': expected text or chat"),
    ({"calibration": {"reasoning_share": 0.5}}, "calibration.reasoning_share applies to chat data only"),
    ({"evaluation": {"format": "chat", "reasoning_share": 1.5}}, "evaluation.reasoning_share 1.5: must be a share"),
    ({"evaluation": {"column": "messages"}}, "evaluation.column applies to format: chat"),
])
def test_bad_chat_fields_are_one_line_naming_the_key(tmp_path, over, words):
    with pytest.raises(OmniqError) as e:
        _parse(tmp_path, **over)
    assert words in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2


def test_chat_pipeline_on_tiny_records_and_shows_the_format(tmp_path, tiny_chat, chat_jsonl):
    """quantize -> lint -> validate through `omniq pipeline` on a chat-template checkpoint with chat
    calibration (share 0.25) and chat evaluation (share 0.75); then the model card of the artifact with its
    validation report says both."""
    from cli_subprocess import run_cli_in_subprocess
    from omniq.publish import model_card, release

    spec = {"name": "chat", "source": str(tiny_chat), "workdir": str(tmp_path / "work"),
            "recipes": [{"recipe": "fp8", "gates": {"max_kl": 1.0, "min_top1": 0.0, "max_ppl_ratio": 10.0}}],
            "calibration": {"set": str(chat_jsonl["calib"]), "samples": 4, "seq_len": 64, "format": "chat",
                            "reasoning_share": 0.25},
            "evaluation": {"set": str(chat_jsonl["eval"]), "samples": 4, "seq_len": 64, "format": "chat",
                           "reasoning_share": 0.75}}
    file = tmp_path / "pipeline.yaml"
    file.write_text(yaml.safe_dump(spec))
    r = run_cli_in_subprocess(["pipeline", str(file)], one_thread=True)
    assert r["rc"] == 0, (r.get("stdout", "") + r["stderr"])[-3000:]
    (manifest,) = (tmp_path / "work").rglob("artifact/omniq.json")
    cal = json.loads(manifest.read_text())["calibration"]
    on, off = cal["conversations"]["reasoning_on"], cal["conversations"]["reasoning_off"]
    assert cal["format"] == "chat" and cal["reasoning_share"] == 0.25 and off > on
    (report,) = (tmp_path / "work").rglob("validation.json")
    ev = json.loads(report.read_text())["eval"]
    assert ev["format"] == "chat" and ev["reasoning_share"] == 0.75

    art = tmp_path / "release"
    art.mkdir()
    for p in [*manifest.parent.iterdir(), report]:      # the artifact and its report, as publish ships them
        (art / p.name).symlink_to(p)
    card = model_card.render(release.open_release(art))
    assert "- calibration format: chat: conversations (column `messages`) rendered through the checkpoint's chat " \
           f"template, reasoning on for a share of 0.25 ({on} on, {off} off)" in card, card
    assert "reasoning on for a share of 0.75" in card
