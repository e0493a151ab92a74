"""Shared fixtures. Heavy artifacts (quantized checkpoints) are built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The bundled trained tiny NemotronH checkpoint."""
    from omniq.model.checkpoint import resolve

    return resolve("tiny")


@pytest.fixture(scope="session")
def real_config() -> dict:
    """The published config.json of the Nemotron 3 Nano 30B-A3B text backbone (no weights)."""
    return json.loads((DATA / "nemotron-3-nano-30b-a3b.config.json").read_text())
