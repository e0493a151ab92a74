"""GPU check for CUDA machines: omniq's CPU arithmetic against ModelOpt's CUDA kernels, and quantize timings.

    python benchmarks/gpu_check.py [--big-hidden 2048] [--samples 64 --seq-len 256] [--skip-big]

Without CUDA it prints "skipped: no CUDA" and exits 0. With CUDA it
1. quantizes the bundled model and a random NemotronH of about 1 B parameters with `omniq quantize
   --device cuda` for the fp8 and nvfp4 recipes (calibration and ModelOpt's export on the GPU) and prints
   the timings;
2. compares omniq's CPU NVFP4 path (`omniq.quant.formats`) with ModelOpt's CUDA path on the same tensors:
   weight packing (`NVFP4QTensor.quantize` on CUDA: packed bytes, block scales, global scale; bit-exact
   match expected) and dynamic activation fake-quantization (`TensorQuantizer` with the NVFP4 config on
   CUDA, which needs ModelOpt's CUDA kernels); prints the max errors;
3. runs the FP8 artifact's linear layers through `torch._scaled_mm` (the FP8 tensor-core GEMM an engine
   uses, sm89+) and compares with the dequantized float reference (static per-tensor input FP8);
and exits 1 if any comparison is outside its tolerance. It is self-contained: it needs only omniq, torch
with CUDA and nvidia-modelopt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def big_config(hidden: int) -> dict:
    """A random NemotronH of about 1 B parameters at hidden 2048 (Nano-like proportions, fewer layers)."""
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "hybrid_override_pattern": "MEMEM*EMEMEM*E", "num_hidden_layers": 14, "hidden_size": hidden,
        "vocab_size": 4096, "tie_word_embeddings": False, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 128, "attention_bias": False, "mamba_num_heads": hidden // 32, "mamba_head_dim": 64,
        "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4, "expand": 2, "chunk_size": 128,
        "use_conv_bias": True, "mamba_proj_bias": False, "mamba_hidden_act": "silu", "time_step_min": 0.001,
        "time_step_max": 0.1, "time_step_floor": 0.0001, "n_routed_experts": 32, "num_experts_per_tok": 4,
        "moe_intermediate_size": hidden // 2, "n_shared_experts": 1, "moe_shared_expert_intermediate_size": hidden,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "intermediate_size": hidden // 2, "mlp_hidden_act": "relu2", "mlp_bias": False,
        "max_position_embeddings": 4096, "layer_norm_epsilon": 1e-05, "use_bias": False, "use_mamba_kernels": False,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def make_random_model(dest: Path, config: dict) -> Path:
    """Random weights saved like NVIDIA's checkpoints (backbone.*, one tensor per expert, router fp32)."""
    import torch
    from safetensors.torch import save_file
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from omniq.model.arch import from_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = NemotronHForCausalLM(NemotronHConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    model = model.to(torch.bfloat16)
    sd = model.state_dict()
    tensors = {}
    for t in from_config(config).tensors:
        native = "model." + t.name[len("backbone."):] if t.name.startswith("backbone.") else t.name
        parts = native.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            k = parts.index("experts")
            value = sd[".".join(parts[:k + 1] + [parts[k + 2]])][int(parts[k + 1])]
        else:
            value = sd[native]
        tensors[t.name] = (value.float() if t.dtype == "F32" else value.to(torch.bfloat16)).contiguous().cpu()
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tiny = ROOT / "omniq" / "bundled" / "tiny"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(tiny / f, dest / f)
    del model
    torch.cuda.empty_cache()
    return dest


def quantize_timings(models: dict[str, Path], work: Path, samples: int, seq_len: int) -> list[dict]:
    from omniq.model.checkpoint import open_checkpoint
    from omniq.commands.quantize import quantize

    rows = []
    for name, path in models.items():
        params = open_checkpoint(str(path)).arch.num_params
        for recipe in ("fp8", "nvfp4"):
            import torch

            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            r = quantize(str(path), recipe, work / f"{name}-{recipe}", calib="tiny-calib", calib_samples=samples,
                         calib_seq_len=seq_len, device="cuda")
            wall = time.perf_counter() - t
            row = {"model": name, "params_M": round(params / 1e6, 1), "recipe": recipe, "wall_s": round(wall, 1),
                   "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "output_MiB": round(r.output_bytes / 2**20, 1),
                   **{k: round(v, 1) for k, v in r.seconds.items()}}
            print(f"quantize {name:6} {row['params_M']:7.1f} M {recipe:6} {wall:7.1f} s  peak GPU "
                  f"{row['peak_gpu_GiB']:.2f} GiB  output {row['output_MiB']:.1f} MiB  stages "
                  f"{ {k: row[k] for k in ('load', 'calibrate', 'export')} }", flush=True)
            rows.append(row)
    return rows


def nvfp4_weight_check(tensors: list) -> dict:
    """omniq's CPU packing vs ModelOpt's NVFP4QTensor.quantize on CUDA, same weights."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from omniq.quant import formats

    worst = {"bytes_differing": 0, "scales_differing": 0, "global_scale_max_rel": 0.0, "dequant_max_abs": 0.0,
             "elements": 0, "cpu_s": 0.0, "cuda_s": 0.0}
    for w in tensors:
        t = time.perf_counter()
        ours = formats.nvfp4_quantize(w.cpu())
        worst["cpu_s"] += time.perf_counter() - t
        torch.cuda.synchronize()
        t = time.perf_counter()
        q, ws, ws2 = NVFP4QTensor.quantize(w.cuda(), 16)
        torch.cuda.synchronize()
        worst["cuda_s"] += time.perf_counter() - t
        packed = q._quantized_data.cpu()
        worst["bytes_differing"] += int((packed != ours.weight).sum())
        worst["scales_differing"] += int((ws.cpu().view(torch.uint8) != ours.weight_scale.view(torch.uint8)).sum())
        worst["global_scale_max_rel"] = max(worst["global_scale_max_rel"],
                                            float((ws2.cpu() - ours.weight_scale_2).abs() / ours.weight_scale_2))
        theirs = formats.nvfp4_dequantize(packed, ws.cpu(), ws2.cpu())
        worst["dequant_max_abs"] = max(worst["dequant_max_abs"], float((theirs - ours.dequantize()).abs().max()))
        worst["elements"] += w.numel()
    return worst


def nvfp4_activation_check(xs: list) -> dict:
    """omniq's CPU dynamic NVFP4 activation fake-quant vs ModelOpt's CUDA kernel (same global amax)."""
    import torch
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from omniq.quant import formats

    cfg = QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    worst = {"max_abs": 0.0, "max_rel_to_amax": 0.0, "elements_differing": 0, "elements": 0}
    for x in xs:
        tq = TensorQuantizer(cfg).cuda()
        amax = x.abs().amax().float()
        tq.amax = amax.cuda()
        theirs = tq(x.cuda()).float().cpu()
        ours = formats.nvfp4_fake_quant(x.cpu(), formats.nvfp4_global_scale(amax))
        diff = (theirs - ours).abs()
        worst["max_abs"] = max(worst["max_abs"], float(diff.max()))
        worst["max_rel_to_amax"] = max(worst["max_rel_to_amax"], float(diff.max() / amax))
        worst["elements_differing"] += int((diff > 0).sum())
        worst["elements"] += x.numel()
    return worst


def fp8_scaled_mm_check(artifact: Path, tokens: int = 256) -> dict:
    """FP8 artifact linears through torch._scaled_mm vs the dequantized float reference."""
    import torch
    from safetensors import safe_open

    from omniq.quant import formats

    tensors = {}
    for f in artifact.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    worst = {"layers": 0, "max_rel": 0.0, "gemm_s": 0.0}
    gen = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if w.dtype != torch.float8_e4m3fn or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        ws, xs = tensors[f"{module}.weight_scale"].float(), tensors[f"{module}.input_scale"].float()
        out_f, in_f = w.shape
        if in_f % 16 or out_f % 16:
            continue
        x = torch.randn(tokens, in_f, generator=gen) * float(xs) * 100   # within the calibrated range
        x_q = formats.cast_e4m3(x / xs)                                   # static per-tensor input FP8
        ref = torch.nn.functional.linear(x_q.float() * xs, formats.fp8_dequantize(w, ws))
        torch.cuda.synchronize()
        t = time.perf_counter()
        y = torch._scaled_mm(x_q.cuda(), w.cuda().t(), scale_a=xs.cuda(), scale_b=ws.cuda(),
                             out_dtype=torch.float32)
        torch.cuda.synchronize()
        worst["gemm_s"] += time.perf_counter() - t
        rel = float((y.cpu() - ref).norm() / ref.norm())
        worst["max_rel"] = max(worst["max_rel"], rel)
        worst["layers"] += 1
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-hidden", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    print(f"device: {torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="omniq-gpu-"))
    failures = []
    report: dict = {}
    try:
        models = {"tiny": ROOT / "omniq" / "bundled" / "tiny"}
        if not args.skip_big:
            t = time.perf_counter()
            models["big"] = make_random_model(work / "big-bf16", big_config(args.big_hidden))
            print(f"made the random model in {time.perf_counter() - t:.1f} s", flush=True)
        report["quantize"] = quantize_timings(models, work, args.samples, args.seq_len)

        from omniq.model.checkpoint import open_checkpoint

        src = open_checkpoint(str(models.get("big", models["tiny"])))
        names = [lin.name + ".weight" for lin in src.arch.linears if lin.role != "lm_head"][:64]
        weights = list(src.read(names).values())
        gen = torch.Generator().manual_seed(1)
        weights += [torch.randn(512, 1024, generator=gen, dtype=torch.float32).to(torch.bfloat16) * 0.02,
                    (torch.randn(256, 256, generator=gen) * torch.logspace(-3, 2, 256)).to(torch.bfloat16)]
        w = nvfp4_weight_check(weights)
        report["nvfp4_weights"] = w
        print(f"NVFP4 weights, omniq CPU vs ModelOpt CUDA on {w['elements']:,} elements: packed bytes differing "
              f"{w['bytes_differing']}, block scales differing {w['scales_differing']}, global scale max rel "
              f"{w['global_scale_max_rel']:.2e}, dequantized max abs {w['dequant_max_abs']:.3e} "
              f"(CPU {w['cpu_s']:.2f} s, CUDA {w['cuda_s']:.3f} s)", flush=True)
        if w["bytes_differing"] or w["scales_differing"] or w["global_scale_max_rel"] > 1e-6:
            failures.append("NVFP4 weight packing differs between omniq's CPU path and ModelOpt's CUDA path")

        xs = [torch.randn(64, 2048, generator=gen).to(torch.bfloat16),
              (torch.randn(32, 4096, generator=gen) * torch.logspace(-2, 1, 4096)).to(torch.bfloat16)]
        a = nvfp4_activation_check(xs)
        report["nvfp4_activations"] = a
        print(f"NVFP4 activations, omniq CPU vs ModelOpt CUDA fake-quant on {a['elements']:,} elements: max abs "
              f"{a['max_abs']:.3e} ({a['max_rel_to_amax']:.2e} of amax), {a['elements_differing']} differ",
              flush=True)
        if a["max_rel_to_amax"] > 1e-2:
            failures.append("NVFP4 activation fake-quant differs between omniq's CPU path and ModelOpt's CUDA kernel")

        for name in models:
            f = fp8_scaled_mm_check(work / f"{name}-fp8")
            report[f"fp8_scaled_mm_{name}"] = f
            print(f"FP8 {name}: {f['layers']} linears through torch._scaled_mm vs dequantized reference: max "
                  f"relative error {f['max_rel']:.2e} ({f['gemm_s'] * 1e3:.1f} ms of GEMMs)", flush=True)
            if f["layers"] == 0 or f["max_rel"] > 1e-2:
                failures.append(f"FP8 {name}: torch._scaled_mm disagrees with the dequantized reference")
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
