"""Shared fixtures. Heavy artifacts (quantized checkpoints) are built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_configs import DATA, REPO, omni_config  # noqa: F401  (shared with test modules)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The bundled trained tiny NemotronH checkpoint."""
    from omniq.model.checkpoint import resolve

    return resolve("tiny")


@pytest.fixture(scope="session")
def real_config() -> dict:
    """The published config.json of the Nemotron 3 Nano 30B-A3B text backbone (no weights)."""
    return json.loads((DATA / "nemotron-3-nano-30b-a3b.config.json").read_text())


@pytest.fixture(scope="session")
def omni_config_dir(tmp_path_factory, real_config) -> Path:
    """A config-only Omni directory (no weights) built from the published text-backbone config."""
    d = tmp_path_factory.mktemp("omni-config")
    (d / "config.json").write_text(json.dumps(omni_config(real_config)))
    return d


# ----- omniq quantize artifacts of the bundled model (tests/export/test_quantize_e2e.py, tests/test_cli.py) -----
from reference_configs import MIXED_RECIPE  # noqa: E402
QUANTIZE_CALIB = ["--calib-samples", "16", "--calib-seq-len", "128"]


from cli_subprocess import run_cli_in_subprocess  # noqa: E402,F401  (re-exported for the test modules)


class _Quantized:
    """`omniq quantize tiny` artifacts, each made through the CLI (`omniq.cli.main`) on first use, in its own
    process: ModelOpt patches torch process-wide, so the test process never imports it."""

    RUNS = {"fp8": ["--recipe", "fp8"], "nvfp4": ["--recipe", "nvfp4"],
            "mixed-kv": ["--recipe", "MIXED", "--kv-cache", "fp8"]}

    def __init__(self, root: Path):
        self.root = root
        (root / "mixed.yaml").write_text(MIXED_RECIPE)
        self.made: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self.made:
            self.made[name] = self._make(name)
        return self.made[name]

    def _make(self, name: str) -> dict:
        recipe = str(self.root / "mixed.yaml") if name == "mixed-kv" else name
        args = ["quantize", "tiny", *[recipe if a == "MIXED" else a for a in self.RUNS[name]],
                "--out", str(self.root / name), *QUANTIZE_CALIB]
        return dict(run_cli_in_subprocess(args), path=self.root / name, recipe=recipe,
                    kv="fp8" if name.endswith("-kv") else None)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory) -> _Quantized:
    """`quantized["fp8" | "nvfp4" | "mixed-kv"]` -> {"path", "rc", "stdout", "stderr", "recipe", "kv"}; the
    mixed one is a user recipe file (routed experts NVFP4, attention q/k/v BF16, the rest FP8) with
    --kv-cache fp8, so it covers MIXED_PRECISION, the KV cache and --recipe PATH.yaml."""
    return _Quantized(tmp_path_factory.mktemp("quantized"))


class _OmniQuantized(_Quantized):
    """`omniq quantize tiny-omni --recipe omni-nvfp4` artifacts: "mm" with the default multimodal calibration
    mix, "text" with `--calib-mix text:1` (for the text-only vs multimodal calibration comparison)."""

    MIXES = {"mm": [], "text": ["--calib-mix", "text:1"]}

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[str, dict] = {}

    def _make(self, name: str) -> dict:
        args = ["quantize", "tiny-omni", "--recipe", "omni-nvfp4", "--out", str(self.root / name),
                *QUANTIZE_CALIB, *self.MIXES[name]]
        return dict(run_cli_in_subprocess(args, one_thread=True), path=self.root / name, recipe="omni-nvfp4",
                    kv="fp8")


@pytest.fixture(scope="session")
def omni_quantized(tmp_path_factory) -> _OmniQuantized:
    """`omni_quantized["mm" | "text"]` -> {"path", "rc", "stdout", "stderr", "recipe", "kv"}, made on first use."""
    return _OmniQuantized(tmp_path_factory.mktemp("omni-quantized"))


@pytest.fixture(scope="session")
def omni_real_quantized(tmp_path_factory) -> dict:
    """`omniq quantize tiny-omni-real --recipe omni-nvfp4` with the default multimodal mix (no remote code)."""
    out = tmp_path_factory.mktemp("omni-real") / "nvfp4"
    r = run_cli_in_subprocess(["quantize", "tiny-omni-real", "--recipe", "omni-nvfp4", "--out", str(out),
                               *QUANTIZE_CALIB], one_thread=True)
    return dict(r, path=out)


# ----- chat-format data (tests/chat_fixtures.py) -----
@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, tiny_dir) -> Path:
    """A copy of the bundled tiny checkpoint with a chat template that honours enable_thinking."""
    from chat_fixtures import with_template

    return with_template(tiny_dir, tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> dict[str, Path]:
    """Conversations from the bundled docstrings: {"calib": 12 from the calib split, "eval": 30 from eval}."""
    from chat_fixtures import conversations, write_jsonl

    d = tmp_path_factory.mktemp("chat-data")
    return {"calib": write_jsonl(d / "calib.jsonl", conversations(12, "calib")),
            "eval": write_jsonl(d / "eval.jsonl", conversations(30, "eval"))}
