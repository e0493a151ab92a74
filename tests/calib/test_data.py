"""Calibration data: every source kind becomes packed token rows with an identity and per-row hashes."""

import hashlib
import json

import numpy as np
import pytest

from omniq.calib import data
from omniq.errors import OmniqError


class CharTokenizer:
    """One token per character (ids 10..), EOS 2: enough to check packing exactly."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [10 + (ord(c) % 200) for c in text]}


TOK = CharTokenizer()


def _ids(*texts):
    out = []
    for t in texts:
        out += TOK(t)["input_ids"] + [2]
    return out


def test_text_file_paragraphs_are_packed_in_order_with_eos(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("alpha beta\ngamma\n\n\ndelta epsilon\n\nzeta eta theta iota\n")
    cs = data.load(str(f), TOK, samples=2, seq_len=10)
    want = _ids("alpha beta\ngamma", "delta epsilon", "zeta eta theta iota")[:20]
    assert cs.rows.tolist() == [want[:10], want[10:]]
    assert cs.identity["kind"] == "text" and cs.identity["samples"] == 2 and cs.identity["seq_len"] == 10
    assert cs.identity["file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert cs.sample_sha256 == tuple(hashlib.sha256(np.asarray(r, dtype="<i8").tobytes()).hexdigest()
                                     for r in (want[:10], want[10:]))


def test_text_file_without_blank_lines_is_one_sample_per_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first line\nsecond line\n   \nthird\n".replace("   \n", ""))
    cs = data.load(str(f), TOK, samples=1, seq_len=12)
    assert cs.rows[0].tolist() == _ids("first line", "second line", "third")[:12]


def test_jsonl_json_and_parquet_read_the_column(tmp_path):
    rows = [{"text": "one two three", "n": 1}, {"text": "four five six", "n": 2}, {"text": "", "n": 3},
            {"text": "seven eight nine ten", "n": 4}]
    want = _ids("one two three", "four five six", "seven eight nine ten")[:30]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.json", "c.parquet"):
        cs = data.load(str(tmp_path / name), TOK, samples=3, seq_len=10)
        assert cs.rows.flatten().tolist() == want, name
        assert cs.identity["column"] == "text"
    other = [{"body": r["text"]} for r in rows]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in other))
    cs = data.load(str(tmp_path / "d.jsonl"), TOK, samples=3, seq_len=10, column="body")
    assert cs.rows.flatten().tolist() == want


def test_bundled_set_is_the_docstring_calib_split():
    from omniq.calib import docstrings

    docstrings.corpus.cache_clear()
    lazy = []
    for doc in docstrings.iter_texts("calib"):      # parses only as far as needed ...
        lazy.append(doc)
        if len(lazy) == 40:
            break
    assert docstrings.corpus.cache_info().currsize == 0
    assert lazy == list(docstrings.texts("calib")[:40])   # ... in the full corpus' order
    cs = data.load("tiny-calib", TOK, samples=4, seq_len=64)
    assert cs.identity["kind"] == "bundled" and cs.identity["split"] == "calib"
    first = docstrings.texts("calib")[0]
    assert cs.rows[0].tolist() == _ids(first)[:64]
    again = data.load("tiny-calib", TOK, samples=4, seq_len=64)
    assert again.sample_sha256 == cs.sample_sha256 and len(set(cs.sample_sha256)) == 4


@pytest.mark.parametrize("content,suffix,message", [
    ("", ".txt", "no text found"),
    ("\n\n   \n", ".txt", "no text found"),
    ('{"other": "x"}\n', ".jsonl", "no column 'text'"),
    ('{"text": 5}\n', ".jsonl", "holds int"),
    ("{not json", ".json", "not valid JSON"),
    ("short", ".txt", "needs 40"),
    ("x", ".csv", "unsupported file type"),
])
def test_bad_calibration_files_are_one_line_errors(tmp_path, content, suffix, message):
    f = tmp_path / f"c{suffix}"
    f.write_text(content)
    with pytest.raises(OmniqError) as e:
        data.load(str(f), TOK, samples=4, seq_len=10)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_missing_file_directory_and_bad_sizes(tmp_path):
    for calib, message in [(str(tmp_path / "nope.txt"), "no such file"), (str(tmp_path), "is a directory"),
                           ("./nope", "no such file")]:
        with pytest.raises(OmniqError, match=message):
            data.load(calib, TOK, samples=1, seq_len=4)
    with pytest.raises(OmniqError, match="--calib-samples"):
        data.load("tiny-calib", TOK, samples=0, seq_len=4)
    with pytest.raises(OmniqError, match="--calib-seq-len"):
        data.load("tiny-calib", TOK, samples=1, seq_len=1)


def test_unreadable_parquet_is_a_one_line_error(tmp_path):
    f = tmp_path / "c.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(OmniqError) as e:
        data.load(str(f), TOK, samples=1, seq_len=4)
    assert "cannot read it as .parquet" in str(e.value) and "\n" not in str(e.value)


def test_default_calibration_is_bundled_for_bundled_models_and_nvidias_mix_otherwise(tiny_dir, tmp_path):
    assert data.default_for(tiny_dir) == data.DEFAULT
    copy = tmp_path / "my-model"
    copy.mkdir()
    assert data.default_for(copy) == data.NVIDIA_DEFAULT


def test_nvidia_default_offline_asks_for_calib_in_one_line(tiny_dir, tmp_path, monkeypatch):
    """A model that is not bundled and no --calib: ModelOpt hf_ptq's default mix, which needs the hub; offline
    that is one line asking for --calib, and nothing is written."""
    import os
    import shutil
    import subprocess
    import sys

    model = tmp_path / "my-model"
    shutil.copytree(tiny_dir, model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "omniq.cli", "quantize", str(model), "--recipe", "fp8", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "nvidia-default" in err and "offline" in err and "--calib" in err, err
    assert not out.exists()
    with pytest.raises(OmniqError, match="pass --calib"):
        data.load(data.NVIDIA_DEFAULT, None, samples=1, seq_len=2)
