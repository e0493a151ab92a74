"""Calibration data: where the text comes from, and how it becomes token batches.

`--calib` takes one of
    tiny-calib                   the bundled set: the `calib` split of the standard library's docstrings
                                 (`omniq.calib.docstrings`), disjoint from the bundled model's training text
    PATH.txt                     plain text; a sample is a paragraph (blank-line separated); a file without
                                 blank lines gives one sample per non-empty line
    PATH.jsonl / .json / .parquet  one sample per row, text in `--calib-column` (default "text")
    NAME[:CONFIG]                a hub dataset read with `datasets.load_dataset(NAME, CONFIG,
                                 split=--calib-split, streaming=True)`, text in `--calib-column`
    nvidia-default               NVIDIA's own choice for this family: the mix ModelOpt's `hf_ptq` calibrates
                                 on by default (`cnn_nemotron_v2_mix`: `abisee/cnn_dailymail` 3.0.0 `article`
                                 plus `nvidia/Nemotron-Post-Training-Dataset-v2` splits stem / chat / math / code,
                                 `messages` rendered through the checkpoint's chat template when it has one),
                                 read through ModelOpt's `get_dataset_samples` (hub access; ModelOpt knows the
                                 datasets' columns and splits, so omniq does not repeat them), half the
                                 samples from each

`--calib-format chat` reads conversations instead of text from a file's or dataset's `messages` column
(`--calib-column`) and renders each through the checkpoint's chat template, with reasoning on for
`--reasoning-share` of them (`omniq.calib.chat`); the format, the share and the conversations per split are
recorded with the identity.

No `--calib`: `tiny-calib` for the bundled models, `nvidia-default` for any other (`default_for`); offline
(`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) that fails in one line asking for `--calib`.

Texts are tokenized with the checkpoint's own tokenizer (no special tokens added, the EOS token after each
text), concatenated in order and cut into `samples` rows of exactly `seq_len` tokens. Packing means no row is
padded: the calibration forward never needs an attention mask, and every token is real text. Too little text
for `samples x seq_len` tokens is an error rather than a silently smaller calibration.

The identity (source, kind, split, column, counts, file hash) and the sha256 of every row's token ids go into
the artifact's `omniq.json`, so a calibration can be recognised and repeated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from omniq.checksums import sha256_file
from omniq.errors import OmniqError
from omniq.quiet import quiet

BUNDLED = {"tiny-calib": "calib"}
DEFAULT = "tiny-calib"
NVIDIA_DEFAULT = "nvidia-default"
NVIDIA_MIX = ("cnn_dailymail", "nemotron-post-training-dataset-v2")   # ModelOpt's "cnn_nemotron_v2_mix"
_TRUE = ("1", "true", "yes", "on")
FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CalibSet:
    """Calibration rows and what identifies them."""

    rows: "torch.Tensor"          # int64 (samples, seq_len)  # noqa: F821 - torch imported lazily
    identity: dict
    sample_sha256: tuple[str, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        return int(self.rows.numel())

    def batches(self, batch_size: int) -> list:
        return [self.rows[i:i + batch_size] for i in range(0, self.rows.shape[0], batch_size)]


def _paragraphs(text: str) -> list[str]:
    lines = text.splitlines()
    if not any(not line.strip() for line in lines):
        return [line.strip() for line in lines if line.strip()]
    out, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current).strip())
            current = []
    if current:
        out.append("\n".join(current).strip())
    return out


def _column_texts(rows: Iterable[dict], column: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise OmniqError(f"calibration data {where}: row {i} is not an object with a {column!r} field")
        if column not in row:
            cols = ", ".join(sorted(map(str, row))) or "none"
            raise OmniqError(f"calibration data {where}: no column {column!r} (columns: {cols}); "
                             "choose one with --calib-column")
        value = row[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise OmniqError(f"calibration data {where}: column {column!r} holds {type(value).__name__}, "
                             "not text; choose a text column with --calib-column")
        if value.strip():
            yield value


def _column_messages(rows: Iterable[dict], column: str, where: str) -> Iterator[list]:
    """Conversations (`chat.check_messages`) of a `messages`-like column (`--calib-format chat`)."""
    from omniq.calib import chat

    for i, row in enumerate(rows):
        if not isinstance(row, dict) or column not in row:
            cols = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else "none"
            raise OmniqError(f"calibration data {where}: no column {column!r} (columns: {cols or 'none'}); chat "
                             "data needs a column of messages (choose it with --calib-column / --eval-column)")
        yield chat.check_messages(row[column], f"calibration data {where}", i, column)


def _read_file(path: Path, column: str, pick=_column_texts) -> Iterator:
    kind = FILE_KINDS[path.suffix.lower()]
    if kind == "text" and pick is not _column_texts:
        raise OmniqError(f"calibration data {path}: chat data needs a column of messages: pass a .jsonl / .json / "
                         ".parquet file or a hub dataset, not plain text")
    if kind == "text":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OmniqError(f"calibration data {path}: cannot read it as UTF-8 text ({e})") from None
        yield from _paragraphs(text)
        return
    if kind == "json" and path.suffix.lower() == ".json":
        # A JSON array of objects (or of strings) is read directly; datasets' "json" builder wants JSON lines
        # or a dict of columns.
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise OmniqError(f"calibration data {path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get(column), list):
            data = [{column: v} for v in data[column]]
        if isinstance(data, list) and all(isinstance(v, str) for v in data) and pick is _column_texts:
            data = [{column: v} for v in data]
        if not isinstance(data, list):
            raise OmniqError(f"calibration data {path}: expected a JSON array of objects with a {column!r} "
                             "field, or JSON lines (.jsonl)")
        yield from pick(data, column, str(path))
        return
    try:
        from datasets import load_dataset

        with _quiet_datasets():
            ds = load_dataset(kind, data_files=str(path), split="train", streaming=True)
            yield from pick(iter(ds), column, str(path))
    except OmniqError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed files fail inside datasets with many error types
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"calibration data {path}: cannot read it as {path.suffix} ({type(e).__name__}: "
                         f"{first})") from None


def _read_hub(name: str, split: str, column: str, pick=_column_texts) -> Iterator:
    dataset, _, config = name.partition(":")
    try:
        from datasets import load_dataset

        with _quiet_datasets():
            ds = load_dataset(dataset, config or None, split=split, streaming=True)
            yield from pick(iter(ds), column, name)
    except OmniqError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, unknown dataset or split
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"calibration data {name!r}: cannot load it from the hub ({type(e).__name__}: "
                         f"{first}); check the name, --calib-split and your network, or pass a local file") \
            from None


def _quiet_datasets():
    """datasets logs its own ERROR lines for files it cannot read; omniq reports them in one line instead."""
    return quiet("datasets")


def source_texts(calib: str, *, column: str = "text", split: str = "train", chat: bool = False
                 ) -> tuple[Iterator, dict]:
    """The texts of a calibration source (lazily) and its identity; `chat`: its conversations (lists of
    messages from `column`) instead."""
    pick = _column_messages if chat else _column_texts
    if calib in BUNDLED and chat:
        raise OmniqError(f"--calib {calib}: the bundled docstrings are plain text, not conversations; chat data "
                         "needs a .jsonl / .json / .parquet file or a hub dataset with a messages column")
    if calib in BUNDLED:
        from omniq.calib import docstrings

        part = BUNDLED[calib]
        return docstrings.iter_texts(part), {"source": calib, "kind": "bundled", "split": part,
                                             "text": docstrings.identity()}
    path = Path(calib).expanduser()
    if path.is_dir():
        raise OmniqError(f"--calib {calib}: is a directory; pass a .txt, .jsonl, .json or .parquet file, "
                         f"a hub dataset name or {DEFAULT}")
    if path.suffix.lower() in FILE_KINDS:
        if not path.is_file():
            raise OmniqError(f"--calib {calib}: no such file")
        ident = {"source": str(path.resolve()), "kind": FILE_KINDS[path.suffix.lower()],
                 "file_sha256": sha256_file(path)}
        if ident["kind"] != "text":
            ident["column"] = column
        return _read_file(path, column, pick), ident
    if path.exists():
        raise OmniqError(f"--calib {calib}: unsupported file type {path.suffix or '(none)'}; "
                         f"use {', '.join(FILE_KINDS)}")
    if calib.startswith((".", "/", "~")) or not calib.strip():
        raise OmniqError(f"--calib {calib}: no such file")
    return _read_hub(calib, split, column, pick), {"source": calib, "kind": "hub", "split": split, "column": column}


def default_for(ckpt_path) -> str:
    """The calibration source when no --calib is given: the bundled text for the bundled models, NVIDIA's
    default mix for any other."""
    from omniq.model.checkpoint import BUNDLED_DIR

    try:
        Path(ckpt_path).resolve().relative_to(BUNDLED_DIR.resolve())
        return DEFAULT
    except ValueError:
        return NVIDIA_DEFAULT


def _offline() -> bool:
    import os

    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_unreachable() -> bool:
    """True when the hub's host does not resolve or accept a connection within 3 s: without this check the
    hub client retries with backoff (minutes) and logs each failure before the one-line error."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return False
    except OSError:
        return True


def nvidia_texts(tokenizer, samples: int) -> tuple[list[str], dict]:
    """`nvidia-default`: `samples` texts from each member of ModelOpt's default mix, interleaved."""
    ask = (f"pass --calib (a .txt / .jsonl / .parquet file, a hub dataset NAME, or {DEFAULT} for the bundled "
           "docstrings)")
    if _offline() or _hub_unreachable():
        raise OmniqError(f"calibration data {NVIDIA_DEFAULT} (cnn_dailymail + nvidia/Nemotron-Post-Training-"
                         f"Dataset-v2, ModelOpt's default) needs the Hugging Face hub, and this run is offline; {ask}")
    try:
        from modelopt.torch.utils.dataset_utils import get_dataset_samples

        chat = getattr(tokenizer, "chat_template", None) is not None
        with _quiet_datasets():
            parts = [get_dataset_samples(name, samples, apply_chat_template=chat, tokenizer=tokenizer)
                     for name in NVIDIA_MIX]
    except Exception as e:  # noqa: BLE001 - network, auth, gated dataset
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"calibration data {NVIDIA_DEFAULT}: cannot load it from the hub ({type(e).__name__}: "
                         f"{first}); {ask}") from None
    texts = [t for pair in zip(*parts) for t in pair]
    return texts, {"source": NVIDIA_DEFAULT, "kind": "hub-mix", "datasets": list(NVIDIA_MIX),
                   "reader": "modelopt.torch.utils.dataset_utils.get_dataset_samples", "chat_template": chat}


def _row_sha256(row) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(row, dtype="<i8").tobytes()).hexdigest()


def pack(texts: Iterable[str], tokenizer, samples: int, seq_len: int, where: str) -> tuple[list[int], int]:
    """Tokenize texts in order until `samples * seq_len` tokens; return the tokens and the texts used."""
    need = samples * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    used = 0
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        used += 1
        if len(ids) >= need:
            break
    if used == 0:
        raise OmniqError(f"calibration data {where}: no text found (empty file, empty column or no rows)")
    if len(ids) < need:
        raise OmniqError(f"calibration data {where}: {used} texts give {len(ids)} tokens but "
                         f"--calib-samples {samples} x --calib-seq-len {seq_len} needs {need}; "
                         "lower them or give more text")
    return ids[:need], used


def seeded(texts: Iterable[str], seed: int) -> Iterator[str]:
    """Texts kept with probability 1/2 each, decided by sha256(seed, index): a different, reproducible sample
    of the same source per `--calib-seed`, still read lazily (about twice the texts are read)."""
    for i, text in enumerate(texts):
        if hashlib.sha256(f"{seed}:{i}".encode()).digest()[0] < 128:
            yield text


def load(calib: str, tokenizer, *, samples: int, seq_len: int, column: str = "text",
         split: str = "train", seed: int | None = None, fmt: str = "text",
         reasoning_share: float | None = None) -> CalibSet:
    """Calibration rows (samples, seq_len) from a source, tokenized with the checkpoint's tokenizer;
    `seed` (None: the source's first texts in order) picks another sample of its texts (`seeded`).
    `fmt` "chat": the source's conversations rendered through the checkpoint's chat template, `reasoning_share`
    of them with reasoning on (`omniq.calib.chat`), recorded in the identity."""
    import torch

    from omniq.calib import chat

    if samples < 1:
        raise OmniqError(f"--calib-samples {samples}: must be at least 1")
    if seq_len < 2:
        raise OmniqError(f"--calib-seq-len {seq_len}: must be at least 2")
    chat.check_format(fmt, "--calib-format")
    share = chat.check_share(reasoning_share, fmt)
    rendered = None
    if fmt == "chat" and calib == NVIDIA_DEFAULT:
        raise OmniqError(f"--calib {NVIDIA_DEFAULT} renders its chat data through ModelOpt's reader already; "
                         "--calib-format chat takes a .jsonl / .json / .parquet file or a hub dataset")
    if calib == NVIDIA_DEFAULT:
        texts, identity = nvidia_texts(tokenizer, samples)
    else:
        if fmt == "chat":
            rendered = chat.start(tokenizer, share, f"--calib {calib}", column)
        texts, identity = source_texts(calib, column=column, split=split, chat=fmt == "chat")
    if seed is not None:
        texts, identity = seeded(texts, seed), dict(identity, seed=seed)
    if rendered is not None:
        texts = chat.texts(texts, tokenizer, rendered, f"calibration data {identity['source']}")
    ids, used = pack(texts, tokenizer, samples, seq_len, identity["source"])
    identity = dict(identity, **(rendered.identity() if rendered is not None else {"format": "text"}))
    rows = torch.tensor(ids, dtype=torch.int64).view(samples, seq_len)
    identity = dict(identity, samples=samples, seq_len=seq_len, texts_used=used, tokens=samples * seq_len,
                    packing="texts joined with EOS, cut into rows of seq_len tokens")
    return CalibSet(rows=rows, identity=identity, sample_sha256=tuple(_row_sha256(r.tolist()) for r in rows))
