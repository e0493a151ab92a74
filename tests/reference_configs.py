"""Reference configs shared by test modules and fixtures (a plain module: test files import it directly,
which they cannot do with conftest.py when several conftest files exist)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def omni_config(llm: dict) -> dict:
    """A top-level Nemotron 3 Nano Omni config.json around a language-model config, as
    shared/reference/omni-layout.md describes it (llm_config with eos 11; tower sub-configs as stubs)."""
    llm = {k: v for k, v in llm.items() if k != "_comment"}
    llm["eos_token_id"] = 11
    return {
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"],
        "model_type": "NemotronH_Nano_Omni_Reasoning_V3",
        "llm_config": llm,
        "vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "patch_size": 16},
        "sound_config": {"model_type": "parakeet", "num_hidden_layers": 24, "hidden_size": 1024,
                         "num_mel_bins": 128, "projection_hidden_size": 4096},
        "max_sequence_length": 131072, "force_image_size": 512, "patch_size": 16, "downsample_ratio": 0.5,
        "ps_version": "v2", "vit_hidden_size": 1280, "projector_hidden_size": 20480,
        "img_context_token_id": 18, "sound_context_token_id": 27,
    }


def manifest_fields(recipe: dict | None = None, modules: dict | None = None, files: dict | None = None) -> dict:
    """The keys `omniq quantize` writes into omniq.json and omniq's exact reader checks (omniq.manifest), with
    small values, for fixtures that write an omniq.json by hand (`files` is added when given)."""
    out = {"omniq_manifest": 1, "created": "2026-01-02T03:04:05+00:00",
           "versions": {"omniq": "0.1.0", "modelopt": "0.47.0"},
           "source": {"model": "tiny", "path": "/models/tiny", "files": {}},
           "recipe": recipe or {"name": "fp8", "kv_cache": None, "default": "fp8", "rules": []},
           "calibration": {"source": "bundled:calib", "samples": 8, "seq_len": 64},
           "modules": modules or {}}
    if files is not None:
        out["files"] = files
    return out
