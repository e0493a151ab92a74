"""The bundled lm-eval task `omniq-docstring-cloze`: choose the true continuation of a docstring among four.

Built from the bundled `eval` split (docstrings of the running Python's standard library, held out from the
bundled model's training; `omniq.calib.docstrings`), so it needs no hub data. Every docstring of at least
`CONTEXT_WORDS + CONTINUATION_WORDS` words gives one example: its first `CONTEXT_WORDS` words (whitespace
collapsed) are the context, its next `CONTINUATION_WORDS` words the true continuation; three other
docstrings' words at the same positions are the distractors, drawn and shuffled by a fixed seed. So a
model that has learnt nothing scores 25 %.

lm-eval reads the examples through `dataset()` (the task YAML's `custom_dataset`): the rows are written to
a local jsonl (`jsonl_path()`: under $OMNIQ_CACHE, default ~/.cache/omniq/tasks, named by the Python
version the docstrings come from) and loaded back with `datasets`' json loader, so the file a user can read
is the one evaluated. The docstrings are not committed (third-party text); the jsonl is derived on demand.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

TASK = "omniq-docstring-cloze"
CONTEXT_WORDS = 12
CONTINUATION_WORDS = 6
CHOICES = 4
SEED = 14


def rows(split: str = "eval") -> list[dict]:
    """The examples, in the split's order: {"id", "context", "choices" (4 strings), "label" (index)}."""
    from omniq.calib import docstrings

    need = CONTEXT_WORDS + CONTINUATION_WORDS
    words = [d.split() for d in docstrings.texts(split)]
    words = [w for w in words if len(w) >= need]
    spans = [" ".join(w[CONTEXT_WORDS:need]) for w in words]
    rng = random.Random(SEED)
    out = []
    for i, w in enumerate(words):
        true = spans[i]
        others = [j for j in range(len(words)) if spans[j] != true]
        distractors: list[str] = []
        for j in rng.sample(others, len(others)):
            if spans[j] not in distractors:
                distractors.append(spans[j])
            if len(distractors) == CHOICES - 1:
                break
        choices = [true, *distractors]
        rng.shuffle(choices)
        out.append({"id": i, "context": " ".join(w[:CONTEXT_WORDS]), "choices": choices,
                    "label": choices.index(true)})
    return out


def cache_dir() -> Path:
    root = os.environ.get("OMNIQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omniq")
    return Path(root) / "tasks"


def jsonl_path() -> Path:
    from omniq.calib import docstrings

    return cache_dir() / f"{TASK}-{docstrings.identity()}.jsonl"


def write_jsonl(path: Path | None = None) -> Path:
    """Write the examples (atomically) unless the file is there; returns its path."""
    path = Path(path) if path is not None else jsonl_path()
    if path.is_file():
        return path
    from omniq.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows()))
    return path


def dataset(**kwargs):
    """lm-eval's `custom_dataset` hook: {"test": the examples} read from the local jsonl."""
    import datasets

    path = write_jsonl()
    return datasets.load_dataset("json", data_files={"test": str(path)},
                                 cache_dir=str(path.parent / "datasets-cache"))
