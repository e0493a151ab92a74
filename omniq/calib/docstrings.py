"""The bundled English text: docstrings of the running Python's standard library.

Every machine with Python has it, so nothing third-party is committed: the text is extracted on demand by
parsing the standard library's sources with `ast` (nothing is imported or executed), deduplicated, and split
by a hash of each docstring into disjoint parts: `train` (used once, to train the bundled model), `calib`
(the default calibration set) and two evaluation sets `eval` and `eval2` (for the noise-floor spread).
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "calib", "eval", "eval2")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
MIN_CHARS = 40


def split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % 20
    return {0: "calib", 1: "eval", 2: "eval2"}.get(bucket, "train")


def _sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                yield doc.strip()


@lru_cache(maxsize=1)
def corpus() -> dict[str, tuple[str, ...]]:
    """All docstrings, deduplicated, in a stable order, grouped by split."""
    seen: set[str] = set()
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in _sources():
        for doc in _docstrings(path):
            if doc not in seen:
                seen.add(doc)
                parts[split_of(doc)].append(doc)
    return {k: tuple(v) for k, v in parts.items()}


def texts(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return corpus()[split]


def iter_texts(split: str):
    """`texts(split)` in the same order, found lazily: a caller that needs only the first few (calibration)
    stops parsing the standard library early. Uses the full corpus when it is already cached."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if corpus.cache_info().currsize:
        yield from corpus()[split]
        return
    seen: set[str] = set()
    for path in _sources():
        for doc in _docstrings(path):
            if doc not in seen and split_of(doc) == split:   # first occurrence, as corpus() dedups
                seen.add(doc)
                yield doc


def identity() -> str:
    """Where the bundled text comes from (it differs a little between Python versions)."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-docstrings"
