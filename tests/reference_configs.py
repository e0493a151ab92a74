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
