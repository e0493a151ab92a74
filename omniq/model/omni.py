"""The Nemotron 3 Nano Omni layout: a NemotronH language model fed by a vision tower and an audio encoder.

Top-level config with `llm_config`, `vision_config`, `sound_config`; tensors under the prefixes below
(reference: shared/reference/omni-layout.md). Only the language model is ever quantized; every tower and
projector tensor passes through untouched.
"""

from __future__ import annotations

OMNI_ARCHS = {"NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Nano_VL_V2"}
LLM_PREFIX = "language_model."
# component -> tensor-name prefix
TOWER_PREFIXES = {
    "vision_tower": "vision_model.",
    "vision_projector": "mlp1.",
    "audio_encoder": "sound_encoder.",
    "audio_projector": "sound_projection.",
}


def is_omni(cfg: dict) -> bool:
    archs = set(cfg.get("architectures") or [])
    return bool(archs & OMNI_ARCHS) or cfg.get("model_type") in OMNI_ARCHS or "llm_config" in cfg


def llm_config(cfg: dict) -> dict:
    llm = cfg.get("llm_config")
    if not isinstance(llm, dict):
        from omniq.errors import OmniqError

        raise OmniqError("Omni config.json has no llm_config object; the checkpoint is incomplete")
    return llm


def component_of(name: str) -> str:
    """Which part of an Omni checkpoint a tensor belongs to: language_model or a tower/projector."""
    if name.startswith(LLM_PREFIX):
        return "language_model"
    for comp, prefix in TOWER_PREFIXES.items():
        if name.startswith(prefix):
            return comp
    return "other"
