"""A small random NemotronH whose matrices are all non-square, and quantized artifacts of it, for the gate
tests: hidden 96, attention 4 x 16 = 64, routed experts 48 wide, shared expert 64, Mamba 4 x 16 = 64, so a
transposed weight cannot hide behind a matching shape. 8 routed experts top-2, pattern `MEM*E`, the bundled
tokenizer (4,096 tokens).

Random weights at a scale that gives peaked next-token distributions (embeddings N(0, 1), linears
N(0, 1/fan_in), lm_head 3/sqrt(hidden)), not a model of any text: what its gates mean is only what its own
noise floor says, which is the point of deriving them per run.

Artifacts are written with omniq's quantization arithmetic (`omniq.quant.formats`, which matches ModelOpt's
export bit for bit), the layer plan's declarations in both shapes and omniq's manifest; activation and
K / V scales come from the amax seen on bundled calibration text through the float32 forward (what max
calibration does). No ModelOpt run is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from checkpoint_dir import quantize_linears, write_checkpoint
from omniq.calib import docstrings
from omniq.export.hf_checkpoint import write_manifest
from omniq.model import forward
from omniq.model.arch import from_config
from omniq.model.checkpoint import open_checkpoint
from omniq.quant.plan import make_plan
from omniq.quant.recipe import load

SHAPE = dict(hybrid_override_pattern="MEM*E", num_hidden_layers=5, hidden_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
             n_groups=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
             moe_shared_expert_intermediate_size=64, intermediate_size=48, chunk_size=32)


def make_model(tiny: Path, dest: Path, seed: int = 0) -> Path:
    cfg = dict(json.loads((tiny / "config.json").read_text()), **SHAPE)
    arch = from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in arch.tensors:
        n, shape = t.name, t.shape
        if n.endswith("embeddings.weight"):
            w = torch.randn(shape, generator=g)
        elif n == "lm_head.weight":
            w = torch.randn(shape, generator=g) * 3 / math.sqrt(shape[1])
        elif n.endswith("A_log"):
            w = torch.log(torch.rand(shape, generator=g) * 15 + 1)
        elif n.endswith(".D") or (len(shape) == 1 and "norm" in n):
            w = torch.ones(shape)
        elif n.endswith("dt_bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            w = dt + torch.log(-torch.expm1(-dt))
        elif n.endswith("conv1d.weight"):
            w = torch.randn(shape, generator=g) * 0.5
        elif n.endswith(".bias"):
            w = torch.zeros(shape)
        elif len(shape) == 2:
            w = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            w = torch.randn(shape, generator=g) * 0.02
        tensors[n] = w.to(torch.float32 if t.dtype == "F32" else torch.bfloat16)
    return write_checkpoint(dest, tensors, tiny, cfg)


def _amax(src: Path, rows: int = 4, seq: int = 128) -> tuple[dict[str, float], dict[tuple[int, str], float]]:
    """Largest |input| of every linear and |K| / |V| of every attention layer on bundled calibration text."""
    ckpt = open_checkpoint(str(src))
    weights = {k: v.float() for k, v in ckpt.read().items()}
    tok = ckpt.tokenizer
    ids: list[int] = []
    for doc in docstrings.texts("calib"):
        ids += [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= rows * seq:
            break
    x = torch.tensor(ids[: rows * seq]).view(rows, seq)
    lin_amax: dict[str, float] = {}
    kv_amax: dict[tuple[int, str], float] = {}

    def linear(name, h):
        lin_amax[name] = max(lin_amax.get(name, 0.0), h.abs().max().item())
        return torch.nn.functional.linear(h, weights[f"{name}.weight"], weights.get(f"{name}.bias"))

    def kv(layer, which, t):
        kv_amax[layer, which] = max(kv_amax.get((layer, which), 0.0), t.abs().max().item())
        return t

    with torch.inference_mode():
        forward.logits(ckpt.arch, weights, x, linear=linear, kv=kv)
    return lin_amax, kv_amax


def quantize(src: Path, dest: Path, recipe: str, kv_cache: str | None = None) -> Path:
    """An artifact of `src` in the layout of `omniq quantize`'s output (see the module doc)."""
    from reference_configs import manifest_fields
    from test_lint import write_declaration

    ckpt = open_checkpoint(str(src))
    plan = make_plan(ckpt.arch, load(recipe).with_kv_cache(kv_cache))
    lin_amax, kv_amax = _amax(src)

    def kv(name: str) -> float:
        return kv_amax[int(name.split(".layers.")[1].split(".")[0]), "k" if name.endswith("k_scale") else "v"]

    write_checkpoint(dest, quantize_linears(ckpt.read(), plan, lin_amax.__getitem__, kv), src)
    write_declaration(dest, plan.hf_quant_config({"name": "modelopt", "version": "0.47.0"}), ckpt.config)
    from omniq.export.hf_checkpoint import source_hashes

    fields = manifest_fields(modules=dict(plan.formats))
    fields["source"] = {"model": str(src), "path": str(src), "files": source_hashes(ckpt)}
    write_manifest(dest, fields)
    return dest
