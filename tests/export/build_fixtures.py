"""Fixtures for the bundle tests (`omniq build`): small quantized checkpoints written the way ModelOpt's unified
export and `omniq quantize` write them (dtypes, scale companions, hf_quant_config.json, omniq.json), without
running a quantizer. Tensor values are zeros; only names, dtypes and shapes matter to `omniq build`.
Test modules import what they use (`from build_fixtures import quantized, ...`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from reference_configs import manifest_fields

# The bundled tiny NemotronH's config (scripts/train_tiny.py), kept here so these tests do not depend on the
# bundled weights being trained.
TINY_CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "hybrid_override_pattern": "MEM*EMEM*E", "num_hidden_layers": 10, "hidden_size": 256, "vocab_size": 4096,
    "tie_word_embeddings": False, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_num_heads": 8, "mamba_head_dim": 32, "ssm_state_size": 32, "n_groups": 2, "conv_kernel": 4,
    "expand": 1, "chunk_size": 64, "use_conv_bias": True, "mamba_proj_bias": False,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256, "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 512, "routed_scaling_factor": 2.5, "intermediate_size": 256,
    "mlp_hidden_act": "relu2", "max_position_embeddings": 4096, "layer_norm_epsilon": 1e-05,
    "torch_dtype": "bfloat16",
}


def _torch_dtype(name: str):
    import torch

    return {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8}[name]


def quantized_tensors(plan, extra: dict | None = None) -> dict:
    """Every tensor a quantized export of `plan` holds, as zeros of the exported dtype and shape; `extra`
    (name -> tensor) is added as is (e.g. an Omni model's towers)."""
    import torch

    def z(shape, dtype):
        return torch.zeros(shape, dtype=_torch_dtype(dtype))

    out = {}
    linear = {f"{lin.name}.weight": lin for lin in plan.arch.linears}
    for t in plan.arch.tensors:
        lin = linear.get(t.name)
        fmt = plan.formats[lin.name] if lin else None
        if fmt == "fp8":
            out[t.name] = z(t.shape, "F8_E4M3")
            out[f"{lin.name}.weight_scale"] = z((), "F32")
            out[f"{lin.name}.input_scale"] = z((), "F32")
        elif fmt == "nvfp4":
            o, i = t.shape
            out[t.name] = z((o, i // 2), "U8")
            out[f"{lin.name}.weight_scale"] = z((o, i // 16), "F8_E4M3")
            out[f"{lin.name}.weight_scale_2"] = z((), "F32")
            out[f"{lin.name}.input_scale"] = z((), "F32")
        else:
            out[t.name] = z(t.shape, t.dtype)
    for name in plan.kv_scale_tensors:
        out[name] = z((), "F32")
    out.update(extra or {})
    return out


def write_checkpoint(path: Path, config: dict, recipe: str, kv_cache: str | None = None,
                     extra_tensors: dict | None = None, manifest: bool = True) -> Path:
    from safetensors.torch import save_file

    from omniq.model.checkpoint import arch_of
    from omniq.quant.plan import make_plan
    from omniq.quant.recipe import load

    path.mkdir(parents=True, exist_ok=True)
    arch, _ = arch_of(config)
    rec = load(recipe).with_kv_cache(kv_cache)
    plan = make_plan(arch, rec)
    hq = plan.hf_quant_config({"name": "modelopt", "version": "0.47.0"})
    (path / "config.json").write_text(json.dumps(dict(config, quantization_config=hq["quantization"]), indent=1))
    (path / "hf_quant_config.json").write_text(json.dumps(hq, indent=1))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    save_file(quantized_tensors(plan, extra_tensors), str(path / "model.safetensors"))
    if manifest:
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}
        (path / "omniq.json").write_text(json.dumps(manifest_fields(rec.as_dict(), dict(plan.formats), files),
                                                    indent=1))
    return path


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """Factory: (name, config, recipe, kv_cache, extra_tensors) -> a quantized checkpoint directory, written
    once per session."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("quantized")

    def make(name: str, config: dict, recipe: str, kv_cache: str | None = None,
             extra_tensors: dict | None = None) -> Path:
        if name not in made:
            made[name] = write_checkpoint(root / name, config, recipe, kv_cache, extra_tensors)
        return made[name]

    return make


# The bundled tiny Omni's towers (scripts/make_tiny_omni.py) at the same sizes, around TINY_CONFIG.
TINY_VISION = {"model_type": "radio", "image_size": 128, "patch_size": 16, "hidden_size": 96, "num_hidden_layers": 3,
               "num_attention_heads": 4, "intermediate_size": 384, "num_cls_tokens": 1, "layer_norm_eps": 1e-6}
TINY_SOUND = {"model_type": "parakeet", "num_mel_bins": 64, "hidden_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 384, "conv_kernel_size": 9, "subsampling_factor": 8,
              "subsampling_conv_channels": 32, "projection_hidden_size": 256, "projection_bias": True,
              "sampling_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "clip_duration_s": 1.0}


def tiny_omni_config(vision: bool = True, sound: bool = True) -> dict:
    cfg = {"architectures": ["NemotronH_Nano_Omni_Reasoning_V3"], "model_type": "NemotronH_Nano_Omni_Reasoning_V3",
           "llm_config": dict(TINY_CONFIG, eos_token_id=11), "force_image_size": 128, "patch_size": 16,
           "downsample_ratio": 0.5, "ps_version": "v2", "vit_hidden_size": 96, "projector_hidden_size": 256,
           "img_context_token_id": 4, "sound_context_token_id": 5, "torch_dtype": "bfloat16"}
    if vision:
        cfg["vision_config"] = dict(TINY_VISION)
    if sound:
        cfg["sound_config"] = dict(TINY_SOUND)
    return cfg


def tower_weights(cfg: dict, seed: int = 0) -> dict:
    """Random BF16 tower and projector weights of the layout `omniq.model.towers` reads (norm scales 1,
    batch-norm running variance 1), so the encoders compute something non-trivial."""
    import torch

    from omniq.model import towers

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in towers.tower_tensors(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("norm_std", "running_var") or (len(shape) == 1 and "norm" in name and leaf == "weight"):
            t = torch.ones(shape)
        elif leaf in ("norm_mean", "running_mean"):
            t = torch.full(shape, 0.5) if leaf == "norm_mean" else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.05
        out[name] = t.to(torch.bfloat16)
    return out
