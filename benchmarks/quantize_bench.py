"""Wall time and peak memory of `omniq quantize` (calibration + export) next to a plain ModelOpt script.

    python benchmarks/quantize_bench.py [--models tiny,random] [--recipes fp8,nvfp4] [--samples 64 --seq-len 256]
                                        [--repeat 3]

Models: the bundled `tiny` (12.9 M parameters) and a random NemotronH of about 317 M parameters (hidden 1024,
pattern MEMEM*EMEM*E, 32 routed experts of width 768, top-4), created on the fly into a temporary directory
and saved in NVIDIA's hub layout (backbone.*, one tensor per expert, router fp32, NVIDIA-style config) with
the bundled tokenizer.

Each run is its own process, timed from outside (wall time, including Python start-up and imports), and its
peak resident memory is read from `os.wait4`'s rusage of that very child. Linux carries the parent's
high-water RSS into a forked child's `ru_maxrss`, so this parent never imports torch: the random model and
the calibration rows are made in helper processes too. Both sides calibrate on the same
token rows (the bundled calibration text, packed) with max calibration and export with
`export_hf_checkpoint`. The plain script is what a ModelOpt user writes: `from_pretrained` in bf16,
`mtq.quantize` with `FP8_DEFAULT_CFG` / `NVFP4_DEFAULT_CFG`, a loop of `model(input_ids, use_cache=False)`,
`export_hf_checkpoint`; it runs transformers' stock CPU Mamba path (wrong past chunk_size) and writes
ModelOpt's unfixed export. omniq additionally patches the Mamba mixers, checks every exported tensor against
the plan and its source, and hashes the source and output files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANDOM_CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
    "hybrid_override_pattern": "MEMEM*EMEM*E", "num_hidden_layers": 12, "hidden_size": 1024,
    "vocab_size": 4096, "tie_word_embeddings": False, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 128, "attention_bias": False, "mamba_num_heads": 32, "mamba_head_dim": 64, "ssm_state_size": 64,
    "n_groups": 8, "conv_kernel": 4, "expand": 2, "chunk_size": 128, "use_conv_bias": True,
    "mamba_proj_bias": False, "mamba_hidden_act": "silu", "time_step_min": 0.001, "time_step_max": 0.1,
    "time_step_floor": 0.0001, "n_routed_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 768,
    "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 1536, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "intermediate_size": 768, "mlp_hidden_act": "relu2",
    "mlp_bias": False, "max_position_embeddings": 4096, "layer_norm_epsilon": 1e-05, "use_bias": False,
    "use_mamba_kernels": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "torch_dtype": "bfloat16",
}

PLAIN_MODELOPT = r"""
import copy, sys, torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import NemotronHForCausalLM
src, out, recipe, rows_file = sys.argv[1:5]
rows = torch.load(rows_file)
model = NemotronHForCausalLM.from_pretrained(src, dtype=torch.bfloat16, use_mamba_kernels=False).eval()
cfg = copy.deepcopy({"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[recipe])
def loop(m):
    with torch.no_grad():
        for i in range(0, rows.shape[0], 4):
            m(input_ids=rows[i:i + 4], use_cache=False)
mtq.quantize(model, cfg, loop)
export_hf_checkpoint(model, export_dir=out)
"""


def make_random_model(dest: Path, seed: int = 0) -> Path:
    """A random NemotronH saved like NVIDIA's checkpoints, with the bundled tokenizer."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from omniq.model.arch import from_config

    torch.manual_seed(seed)
    cfg = NemotronHConfig(**{k: v for k, v in RANDOM_CONFIG.items() if k != "architectures"})
    model = NemotronHForCausalLM(cfg).to(torch.bfloat16)
    arch = from_config(RANDOM_CONFIG)
    sd = model.state_dict()
    tensors = {}
    for t in arch.tensors:
        native = "model." + t.name[len("backbone."):] if t.name.startswith("backbone.") else t.name
        parts = native.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():      # one tensor per expert
            k = parts.index("experts")
            fused = sd[".".join(parts[:k + 1] + [parts[k + 2]])]
            value = fused[int(parts[k + 1])]
        else:
            value = sd[native]
        value = value.float() if t.dtype == "F32" else value.to(torch.bfloat16)
        tensors[t.name] = value.contiguous().clone()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(RANDOM_CONFIG, indent=2))
    tiny = ROOT / "omniq" / "bundled" / "tiny"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(tiny / f, dest / f)
    return dest


def calibration_rows(model_dir: Path, samples: int, seq_len: int, dest: Path) -> Path:
    """The token rows omniq calibrates on, saved for the plain script (same data on both sides)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from omniq.calib import data
    from omniq.model.checkpoint import open_checkpoint

    rows = data.load(data.DEFAULT, open_checkpoint(str(model_dir)).tokenizer, samples=samples, seq_len=seq_len).rows
    torch.save(rows, dest)
    return dest


def run(cmd: list[str], log: Path) -> dict:
    """Run a child process; wall time from outside, peak RSS of that child from wait4."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20 if path.is_dir() else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,random")
    ap.add_argument("--recipes", default="fp8,nvfp4")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the summary takes the fastest)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--make-random", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--make-rows", nargs=4, metavar=("MODEL", "SAMPLES", "SEQ_LEN", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_random:                      # helper processes (keep the measuring parent free of torch)
        make_random_model(Path(args.make_random))
        return 0
    if args.make_rows:
        model, samples, seq_len, dest = args.make_rows
        calibration_rows(Path(model), int(samples), int(seq_len), Path(dest))
        return 0
    assert "torch" not in sys.modules

    work = Path(tempfile.mkdtemp(prefix="omniq-bench-"))
    results = []
    try:
        models = {}
        for name in args.models.split(","):
            if name == "tiny":
                models[name] = ROOT / "omniq" / "bundled" / "tiny"
            elif name == "random":
                t = time.perf_counter()
                models[name] = work / "random-bf16"
                subprocess.run([sys.executable, __file__, "--make-random", str(models[name])], check=True, cwd=ROOT)
                print(f"made the random model in {time.perf_counter() - t:.1f} s: "
                      f"{dir_mib(models[name]):.0f} MiB", flush=True)
            else:
                raise SystemExit(f"unknown model {name!r}")
        for mname, mdir in models.items():
            from omniq.model.checkpoint import open_checkpoint   # config and headers only, no torch

            params = open_checkpoint(str(mdir)).arch.num_params
            rows = work / f"{mname}-rows.pt"
            subprocess.run([sys.executable, __file__, "--make-rows", str(mdir), str(args.samples), str(args.seq_len),
                            str(rows)], check=True, cwd=ROOT)
            for recipe in args.recipes.split(","):
                for rep in range(args.repeat):          # tools interleaved, so machine noise hits both
                    for tool in ("omniq", "modelopt"):
                        out = work / f"{mname}-{recipe}-{tool}"
                        if tool == "omniq":
                            cmd = [sys.executable, "-m", "omniq.cli", "quantize", str(mdir), "--recipe", recipe,
                                   "--out", str(out), "--calib-samples", str(args.samples),
                                   "--calib-seq-len", str(args.seq_len)]
                        else:
                            cmd = [sys.executable, "-c", PLAIN_MODELOPT, str(mdir), str(out), recipe, str(rows)]
                        log = work / f"{mname}-{recipe}-{tool}-{rep}.log"
                        r = run(cmd, log)
                        r.update(model=mname, params=params, recipe=recipe, tool=tool, repeat=rep,
                                 out_mib=dir_mib(out), load_average=os.getloadavg()[0])
                        results.append(r)
                        status = "ok" if r["rc"] == 0 else f"FAILED rc {r['rc']} (log {log})"
                        print(f"{mname:7} {params / 1e6:6.1f} M  {recipe:6} {tool:9} wall {r['wall_s']:7.1f} s  "
                              f"cpu {r['cpu_s']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                              f"output {r['out_mib']:7.1f} MiB  load {r['load_average']:.1f}  {status}", flush=True)
                        shutil.rmtree(out, ignore_errors=True)
        print("\nbest of", args.repeat, "(wall time is the least noisy figure on a shared machine: take the minimum)")
        for key in sorted({(r["model"], r["recipe"], r["tool"]) for r in results}):
            runs = [r for r in results if (r["model"], r["recipe"], r["tool"]) == key and r["rc"] == 0]
            if runs:
                best = min(runs, key=lambda r: r["wall_s"])
                print(f"{key[0]:7} {key[1]:6} {key[2]:9} wall {best['wall_s']:7.1f} s  peak RSS "
                      f"{max(r['peak_rss_mib'] for r in runs):7.0f} MiB  output {best['out_mib']:7.1f} MiB")
        print(json.dumps({"samples": args.samples, "seq_len": args.seq_len, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg(), "results": results}, indent=1))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
