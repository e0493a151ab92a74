"""Write a NemotronH checkpoint with the real Nemotron 3 Nano 30B-A3B widths and any layer pattern.

    python scripts/make_realwidth.py OUT_DIR --pattern 'MEM*E' [--seed 0] [--shard-gb 2]

Widths, vocabulary, experts and every other field come from the published config
(`/work/shared/reference/nemotron-3-nano-30b-a3b.config.json`, also in tests/data/); only
`hybrid_override_pattern` / `num_hidden_layers` change. Weights are random, written in NVIDIA's hub layout
(`backbone.*`, one tensor per routed expert), BF16 except the router (`gate.weight`,
`gate.e_score_correction_bias`: F32, as NVIDIA stores them), shard by shard: at most one shard buffer
(`--shard-gb`) is held, never the model. The tensor list is `omniq.model.arch`'s (the one place with the
architecture's tensor names).

Scale: every linear weight is N(0, 1/fan_in) (init std 1/sqrt(in_features)), so a linear keeps activations
around unit RMS and the 52-layer residual stream stays finite; norms are 1, `A_log` log(1..16) as Mamba's
init, `D` 1, `dt_bias` the inverse softplus of dt in [time_step_min, time_step_max], conv1d N(0, 1/kernel),
router N(0, 1/hidden) and its correction bias 0, embeddings and lm_head N(0, 1).

Tokenizer: the bundled tiny model's (4,096 tokens). Its ids are valid ids of the 131,072-entry embedding
(the config keeps the real vocab_size, matching the embeddings), so calibration text tokenizes and runs.
Never write these into the repository (a 5-layer checkpoint is 6.3 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL_CONFIG = REPO / "tests" / "data" / "nemotron-3-nano-30b-a3b.config.json"


def config_for(pattern: str, base: Path = REAL_CONFIG) -> dict:
    cfg = json.loads(Path(base).read_text())
    cfg.pop("_comment", None)
    cfg.pop("auto_map", None)                  # no checkpoint code: transformers' own NemotronH reads it
    cfg["hybrid_override_pattern"] = pattern
    cfg["num_hidden_layers"] = len(pattern)
    cfg["use_mamba_kernels"] = False
    return cfg


def random_tensor(t, cfg: dict, gen):
    """One tensor of `omniq.model.arch.Arch.tensors`, random with the scale described in the module docs."""
    import torch

    name, shape = t.name, tuple(t.shape)
    dtype = torch.float32 if t.dtype == "F32" else torch.bfloat16
    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        x = torch.ones(shape)
    elif name.endswith(".A_log"):
        x = torch.log(torch.linspace(1, 16, shape[0]))
    elif name.endswith(".D"):
        x = torch.ones(shape)
    elif name.endswith(".dt_bias"):
        lo, hi = math.log(cfg["time_step_min"]), math.log(cfg["time_step_max"])
        dt = torch.exp(torch.rand(shape, generator=gen) * (hi - lo) + lo)
        x = dt + torch.log(-torch.expm1(-dt))     # inverse softplus
    elif name.endswith("e_score_correction_bias"):
        x = torch.zeros(shape)
    elif name.endswith("conv1d.weight"):
        x = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    elif name.endswith("conv1d.bias") or name.endswith(".bias"):
        x = torch.zeros(shape)
    elif leaf in ("embeddings",) or name.endswith("lm_head.weight"):
        x = torch.randn(shape, generator=gen)
    else:                                          # linear weights (out, in), router (E, hidden)
        x = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return x.to(dtype)


def write(out: Path, pattern: str, *, seed: int = 0, shard_gb: float = 2.0, force: bool = False,
          base: Path = REAL_CONFIG) -> dict:
    import torch
    from safetensors.torch import save_file

    from omniq.model.arch import from_config

    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    cfg = config_for(pattern, base)
    arch = from_config(cfg)
    tensors = list(arch.tensors)
    nbytes = {t.name: math.prod(t.shape) * (4 if t.dtype == "F32" else 2) for t in tensors}
    limit = int(shard_gb * 2**30)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:                              # group in model order, each shard at most `limit` bytes
        if shards[-1] and size + nbytes[t.name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes[t.name]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n = len(shards)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file({t.name: random_tensor(t, cfg, gen) for t in group}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({t.name: fname for t in group})
        print(f"  {fname}: {len(group)} tensors, {sum(nbytes[t.name] for t in group) / 2**30:.2f} GiB", flush=True)
    if n > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tiny = REPO / "omniq" / "bundled" / "tiny"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / f).is_file():
            shutil.copyfile(tiny / f, tmp / f)
    tmp.rename(out)
    return {"path": str(out), "pattern": pattern, "params": arch.num_params, "bytes": sum(nbytes.values()),
            "shards": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pattern", default="MEM*E", help="hybrid_override_pattern (M Mamba, E MoE, * attention, - MLP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--config", type=Path, default=REAL_CONFIG,
                    help="config.json whose widths to use (default: the published 30B-A3B text backbone)")
    a = ap.parse_args(argv)
    if not a.pattern or set(a.pattern) - set("ME*-"):
        ap.error("--pattern: letters M, E, * and - only")
    info = write(a.out, a.pattern, seed=a.seed, shard_gb=a.shard_gb, force=a.force, base=a.config)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
