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


def omni_real_config(llm: dict) -> dict:
    """The Omni config.json in the shape NVIDIA's real checkpoint has and vLLM's `NemotronH_Nano_VL_V2` reads
    (shared/reference/omni-layout.md for the widths; vLLM's nano_nemotron_vl.py for the keys it reads:
    `template`, `image_tag_type`, `vision_config.args`, `norm_mean` / `norm_std`, a `sound_config` that loads
    as a Parakeet config). C-RADIOv4-H's class / register tokens: transformers' RadioConfig defaults (3 + 7),
    written as vLLM's args express them (one class token per teacher, registers up to a multiple of 10; the
    teacher names and `template` value are placeholders, vLLM only counts the names and stores the template).
    Parakeet heads (8), subsampling channels (256) and `projection_bias` are not in the reference: transformers'
    ParakeetEncoderConfig defaults (parakeet-ctc-1.1b) and an assumption; none changes a tensor name."""
    cfg = omni_config(llm)
    cfg.update({
        "template": "nemotron-h-omni", "image_tag_type": "internvl",
        "norm_mean": [0.48145466, 0.4578275, 0.40821073], "norm_std": [0.26862954, 0.26130258, 0.27577711],
        "vision_config": {"model_type": "radio", "patch_size": 16, "preferred_resolution": [512, 512],
                          "video_temporal_patch_size": 2, "separate_video_embedder": True,
                          "args": {"model": "vit_huge_patch16_224", "cpe_max_size": 2048, "register_multiple": 10,
                                   "cls_token_per_teacher": True,
                                   "teachers": [{"name": f"teacher-{i}"} for i in range(3)]}},
        "sound_config": {"model_type": "parakeet", "num_mel_bins": 128, "hidden_size": 1024,
                         "num_hidden_layers": 24, "num_attention_heads": 8, "intermediate_size": 4096,
                         "subsampling_conv_channels": 256, "subsampling_factor": 8, "conv_kernel_size": 9,
                         "projection_hidden_size": 4096, "projection_bias": True, "sampling_rate": 16000},
    })
    return cfg


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


# a user recipe file (tests/conftest.py's quantized fixtures, tests/export/test_quantize_streamed.py)
MIXED_RECIPE = """name: mixed-e2e
description: routed experts NVFP4, attention q/k/v BF16, everything else FP8 (a user recipe file)
kv_cache: fp8
default: fp8
rules:
  - select: [routed_experts]
    format: nvfp4
  - select: [attn_qkv]
    format: bf16
"""


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX BF16 tiles. oneDNN's BF16 (and PyTorch's CPU) kernels round otherwise there: the
    goldens recorded on this kind's earlier CPUs (AVX-512 without AMX, sessions 1-5) are not bit-reproducible on
    one (seen in session 6: the same fp8 artifact bytes, KL 2.642e-3 against the golden's 2.632e-3)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False
