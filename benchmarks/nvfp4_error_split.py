"""How much of an NVFP4 artifact's KL its weights cause, and how much its activation quantization adds.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_error_split.py ARTIFACT [ARTIFACT ...]
        [--eval eval] [--samples 8 --seq-len 256] [--json PATH] [--act-groups] [--input-scale-factors 0.5,1,2]

For each artifact (a quantized `tiny`), mean KL(reference || candidate) at the logits on the evaluation rows
with (a) the artifact's dequantized weights and unquantized activations (`weights only`) and (b) the engine's
arithmetic, inputs quantized as the artifact says (`omniq.validate.artifact.EngineLinear`, what `omniq
validate` measures). Weight calibration (mse, gptq, ...) can only lower (a); what (b) keeps above (a) comes from
the W4A4 activation quantization, which no weight algorithm removes. The reference is the BF16 model in the
same float32 forward.

`--act-groups`: for the first artifact, the KL of the BF16 weights with only one group's inputs quantized as
the artifact says (its input_scale; Mamba in_proj, Mamba out_proj, attention q/k/v, o_proj, routed experts'
up / down, shared experts): where the activation error comes from. `--input-scale-factors F,...`: the engine
KL of the first artifact with every input_scale multiplied by F (what an activation calibration other than max
could gain: F < 1 clips the largest blocks, F > 1 only moves small blocks' E4M3 scales towards subnormals).
`--smooth-mamba A,...`: what SmoothQuant-style smoothing of the Mamba in_proj / out_proj inputs would gain
(an estimate, not an omniq algorithm): per input channel s = amax_x^A / amax_w^(1-A) (amax over 16 x 256
calibration tokens, seed 0, of the BF16 model), inputs x / s (foldable into the RMSNorm weight before each;
the engine format stays NVFP4 + BF16 norms) quantized dynamically with input_scale = amax(x / s) / (6 x 448),
weights W s quantized by max; every other linear as the first artifact has it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    import torch

    from omniq.model import forward
    from omniq.validate.artifact import EngineLinear, LazyWeights, read_artifact
    from omniq.validate.metrics import Comparison
    from omniq.validate.run import BATCH_ROWS, eval_texts, token_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--eval", default="eval")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--act-groups", action="store_true")
    ap.add_argument("--input-scale-factors", default="")
    ap.add_argument("--smooth-mamba", default="")
    a = ap.parse_args(argv)
    ref = read_artifact("tiny")
    rows = token_rows(ref.tokenizer, eval_texts(a.eval)[1], a.samples, a.seq_len)
    batches = [(rows[b:b + BATCH_ROWS, :-1], rows[b:b + BATCH_ROWS, 1:]) for b in range(0, rows.shape[0], BATCH_ROWS)]
    lazy = LazyWeights(ref)
    rw = {n: lazy[n] for n in lazy}
    with torch.inference_mode():
        base = [forward.logits(ref.arch, rw, x) for x, _ in batches]
    out = {"eval": a.eval, "tokens": int(rows[:, 1:].numel()), "artifacts": {}}

    def kl_of(arch, w, linear) -> float:
        cmp = Comparison()
        with torch.inference_mode():
            for (x, y), logits in zip(batches, base):
                cmp.add(logits, forward.logits(arch, w, x, linear=linear), y)
        return cmp.summary()["kl_mean"]

    factors = [float(f) for f in a.input_scale_factors.split(",") if f]
    print(f"{'artifact':<40} {'KL weights only':>16} {'KL engine':>12} {'weights share':>14}")
    for path in a.artifacts:
        art = read_artifact(path)
        lazy = LazyWeights(art)
        w = {n: lazy[n] for n in lazy}
        kl = {mode: kl_of(art.arch, w, linear) for mode, linear in
              (("weights_only", forward.plain_linear(w)), ("engine", EngineLinear(art.layers, w)))}
        print(f"{Path(path).name:<40} {kl['weights_only']:>16.3e} {kl['engine']:>12.3e} "
              f"{kl['weights_only'] / kl['engine']:>14.2f}", flush=True)
        for f in factors if path == a.artifacts[0] else ():          # the first artifact's
            scaled = {n: replace(g, input_scale=g.input_scale * f) if g.input_scale is not None else g
                      for n, g in art.layers.items()}
            kl[f"engine_input_scale_x{f:g}"] = kl_of(art.arch, w, EngineLinear(scaled, w))
            print(f"  input_scale x {f:g}: KL engine {kl[f'engine_input_scale_x{f:g}']:.3e}", flush=True)
        out["artifacts"][str(path)] = kl
    alphas = [float(x) for x in a.smooth_mamba.split(",") if x]
    if alphas:
        from omniq.calib import data as calib_data
        from omniq.quant import formats

        art = read_artifact(a.artifacts[0])
        lazy = LazyWeights(art)
        w = {n: lazy[n] for n in lazy}
        eng = EngineLinear(art.layers, w)
        mamba = [lin.name for lin in ref.arch.linears if lin.role in ("mamba_in", "mamba_out")]
        calib = calib_data.load(calib_data.default_for(ref.path), ref.tokenizer, samples=16, seq_len=256, seed=0).rows
        amax: dict[str, torch.Tensor] = {}
        plain = forward.plain_linear(rw)

        def record(name, x):
            if name in mamba:
                m = x.reshape(-1, x.shape[-1]).abs().amax(0)
                amax[name] = torch.maximum(amax[name], m) if name in amax else m
            return plain(name, x)
        with torch.inference_mode():
            for b in range(0, calib.shape[0], BATCH_ROWS):
                forward.hidden_states(ref.arch, rw, calib[b:b + BATCH_ROWS], linear=record)
        out["smooth_mamba"] = {"artifact": str(a.artifacts[0]), "kl": {}}
        for alpha in alphas:
            smoothed = {}
            for n in mamba:
                wf = rw[f"{n}.weight"].float()
                sc = (amax[n].clamp(min=1e-5) ** alpha / wf.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
                ws = formats.nvfp4_fake_quant_weight(wf * sc)
                smoothed[n] = (sc, ws)
            in_scale: dict[str, float] = {}

            def linear(name, x, smoothed=smoothed, in_scale=in_scale):
                if name not in smoothed:
                    return eng(name, x)
                sc, ws = smoothed[name]
                xs = x / sc
                s = in_scale.setdefault(name, float(amax[name].div(sc).amax()) / (6 * 448))
                return torch.nn.functional.linear(formats.nvfp4_fake_quant(xs, s), ws)
            k = kl_of(art.arch, w, linear)
            out["smooth_mamba"]["kl"][f"{alpha:g}"] = k
            print(f"smoothed Mamba in/out_proj inputs, alpha {alpha:g}: KL engine {k:.3e}", flush=True)
    if a.act_groups:
        art = read_artifact(a.artifacts[0])
        groups = {"mamba in_proj": lambda n: n.endswith(".in_proj"), "mamba out_proj": lambda n: n.endswith(".out_proj"),
                  "attention q/k/v": lambda n: n.endswith((".q_proj", ".k_proj", ".v_proj")),
                  "attention o_proj": lambda n: n.endswith(".o_proj"),
                  "routed experts up": lambda n: ".experts." in n and n.endswith(".up_proj"),
                  "routed experts down": lambda n: ".experts." in n and n.endswith(".down_proj"),
                  "shared experts": lambda n: ".shared_experts." in n, "all": lambda n: True}
        out["activation_only"] = {"artifact": str(a.artifacts[0]), "kl": {}}
        print(f"BF16 weights, only these inputs quantized as {Path(a.artifacts[0]).name} says:")
        for g, sel in groups.items():
            eng = EngineLinear({n: x for n, x in art.layers.items() if sel(n)}, rw)     # its input quantization
            plain = forward.plain_linear(rw)
            k = kl_of(ref.arch, rw, lambda n, x, eng=eng, plain=plain: plain(n, eng.prepare(n, x)))
            out["activation_only"]["kl"][g] = k
            print(f"  {g:<22} KL {k:.3e}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
