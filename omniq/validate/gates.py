"""Pass / fail thresholds for `omniq validate`, per candidate format, with the user's overrides.

Every default gate is the measured noise floor times a per-format multiplier.

The noise floor is what a lossless deployment of the BF16 reference already costs: the same BF16 weights
run as a BF16 engine runs them (every linear layer's input, weight and output rounded to bfloat16 with fp32
accumulation, K and V kept in bfloat16), compared with omniq's float32 forward of those weights
(`benchmarks/validate_figures.py`, `artifact.bf16_compute_hooks`). Measured on the bundled model, 64 rows x
256 tokens = 16,384 tokens per set, on the two disjoint held-out sets:

    configuration   |  eval: KL mean  top-1   ppl ratio | eval2: KL mean  top-1   ppl ratio
    noise floor     |      2.43e-4   98.91 %   1.0002   |      1.87e-4   98.89 %   1.0000
    fp8             |      3.71e-3   95.84 %   0.9998   |      3.46e-3   96.02 %   1.0023
    fp8 + FP8 KV    |      3.71e-3   95.86 %   1.0000   |      3.51e-3   95.88 %   1.0020
    nvfp4           |      2.35e-2   88.85 %   1.0130   |      2.36e-2   88.56 %   1.0202
    nvfp4 + FP8 KV  |      2.34e-2   88.57 %   1.0131   |      2.35e-2   88.61 %   1.0195

(ModelOpt 0.47 max calibration on 16 x 256 tokens of the `calib` set, all linear layers but lm_head; KL p95:
noise floor 2.0e-4, fp8 1.4-1.5e-2, nvfp4 8.0e-2.) The FP8 KV cache on its own (same artifact with and
without the K / V fake-quant) costs KL 2.7e-4, noise-floor level, on this model with two attention layers,
so one gate per format serves with and without it. The floor used below is the worse of the two sets:
KL 2.4e-4, top-1 disagreement 1.1 %, perplexity excess 2e-4.

Multipliers: each format's measured value sits at about half its gate on both sets (room for other text, a
smaller evaluation and calibration noise), while deliberately broken artifacts fail: weight scales x4 on
the Mamba in_proj layers gives KL about 3 (fp8 or nvfp4); routed experts 0 and 1 swapped in every MoE
layer gives KL 4.8e-2 / top-1 86 % (fp8) and 6.3e-2 / 84 % / ppl ratio 1.07 (nvfp4) (8 x 128 tokens).
`mixed` (NVFP4 experts with FP8 or BF16 elsewhere, as NVIDIA's NVFP4 releases) takes NVFP4's gates: it is at
most as lossy (NVFP4 routed experts + FP8 elsewhere measured KL 4.5e-3, top-1 95.8 %, ppl ratio 1.002 on
16 x 256 tokens of `eval`: most of NVFP4's loss is in the Mamba and attention projections).
A `bf16` candidate (nothing quantized) may differ from the reference only by rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Gates:
    max_kl: float            # mean KL(ref || cand) per token, nats
    min_top1: float          # top-1 agreement, fraction
    max_ppl_ratio: float     # perplexity(candidate) / perplexity(reference)
    source: str = "default"

    def as_dict(self) -> dict:
        return asdict(self)


# The noise floor measured above (worse of eval / eval2).
NOISE_FLOOR_KL = 2.4e-4
NOISE_FLOOR_TOP1_DISAGREEMENT = 0.011
NOISE_FLOOR_PPL_EXCESS = 2e-4
# format -> (KL multiplier, top-1 disagreement multiplier, perplexity-excess multiplier)
MULTIPLIERS = {
    "bf16": (4, 3, 10),
    "fp8": (40, 6, 50),
    "nvfp4": (200, 15, 250),
    "mixed": (200, 15, 250),
}


def _from_floor(fmt: str) -> Gates:
    k_kl, k_top1, k_ppl = MULTIPLIERS[fmt]
    return Gates(max_kl=round(NOISE_FLOOR_KL * k_kl, 6),
                 min_top1=round(1.0 - NOISE_FLOOR_TOP1_DISAGREEMENT * k_top1, 4),
                 max_ppl_ratio=round(1.0 + NOISE_FLOOR_PPL_EXCESS * k_ppl, 4),
                 source=f"default {fmt}")


DEFAULTS = {fmt: _from_floor(fmt) for fmt in MULTIPLIERS}


def gates_for(fmt: str, *, max_kl: float | None = None, min_top1: float | None = None,
              max_ppl_ratio: float | None = None) -> Gates:
    g = DEFAULTS[fmt]
    overrides = {k: v for k, v in (("max_kl", max_kl), ("min_top1", min_top1), ("max_ppl_ratio", max_ppl_ratio))
                 if v is not None}
    if overrides:
        g = replace(g, **overrides, source=f"{g.source} with overrides {sorted(overrides)}")
    return g


def check(metrics: dict, gates: Gates) -> list[str]:
    """The gates that failed, each as one readable line (empty when all passed)."""
    failures = []
    if not metrics["kl_mean"] <= gates.max_kl:
        failures.append(f"kl_mean {metrics['kl_mean']:.3g} > max_kl {gates.max_kl:.3g}")
    if not metrics["top1_agreement"] >= gates.min_top1:
        failures.append(f"top1_agreement {metrics['top1_agreement']:.4f} < min_top1 {gates.min_top1:.4f}")
    if not metrics["ppl_ratio"] <= gates.max_ppl_ratio:
        failures.append(f"ppl_ratio {metrics['ppl_ratio']:.4f} > max_ppl_ratio {gates.max_ppl_ratio:.4f}")
    return failures
