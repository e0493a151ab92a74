"""Go/no-go probe: quantization-aware distillation (QAD) of an NVFP4 artifact's weights, then validate.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_qad_probe.py ARTIFACT --out COPY
        [--steps 150] [--lr 1e-3] [--norms] [--from-artifact] [--calib-samples 16 --calib-seq-len 256 --calib-seed 0]
        [--validate eval,eval2 --samples 8 --seq-len 256] [--json PATH] [--force]

ARTIFACT is a max-calibrated `tiny` (`omniq quantize tiny --recipe nvfp4 --calib-seed S --calib-samples 16`).
The float32 weights of every quantized linear start from the BF16 reference's and are fitted end to end
(`omniq.quant.compensation.distill_weights`: Adam, `--lr` relative to each tensor's mean magnitude, cosine
decay, the step with the lowest calibration KL kept) on the mean KL to the reference's logits over the
calibration rows of `--calib-seed` (the bundled calibration text, never an evaluation set); each step every
weight is what max calibration exports from it (amax/6 FP8 block scales under ARTIFACT's weight_scale_2,
straight-through gradient) and every input is quantized with ARTIFACT's input_scale as the engine does.
`--norms` fits the BF16 RMSNorm weights (every layer's, Mamba's gated one, the final one) too.

COPY is ARTIFACT with each linear's weight / weight_scale re-quantized from the fitted weight by max
calibration's arithmetic (`omniq.quant.formats.nvfp4_quantize` with the same weight_scale_2; input_scale
unchanged, so the engine runs exactly what was fitted), omniq.json's file hashes updated. Before fitting the
probe checks that max's arithmetic on the reference weights reproduces ARTIFACT's bytes. `--from-artifact` starts
instead from ARTIFACT's own dequantized weights (e.g. a gptaq artifact's) with its block scales kept fixed
(each step the weights rounded under them; the copy packed under them). Then `omniq validate tiny COPY --eval
S` and the same for ARTIFACT, each in its own process (`nvfp4_tweak_probe.validate_both`), print KL mean of
both and their ratio. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nvfp4_tweak_probe import add_fit_args, e2e_inputs, validate_both, write_copy  # noqa: E402


def _say(msg: str, **_) -> None:
    print(msg, flush=True)


def distill(artifact: str, steps: int, lr: float, samples: int, seq_len: int, seed: int, norms: bool,
            from_artifact: bool = False, log=None):
    """Returns (the fitted tensors to write into the copy, the record)."""
    import torch

    log = log or _say
    from omniq.quant import compensation as comp
    from omniq.quant import formats, weight_search

    ref, art, rw, batches, ref_logp, quantizers = e2e_inputs(artifact, samples, seq_len, seed)
    arch = ref.arch
    quantized, start = {}, dict(rw)
    for m, layer in art.quantized.items():
        if layer.weight_format != "nvfp4":
            raise SystemExit(f"{m}: {layer.weight_format}; the probe writes NVFP4 weights only")
        quantized[m] = ("nvfp4", art.small[f"{m}.weight_scale_2"])
        if from_artifact:
            stored = art.read_stored(f"{m}.weight", "cpu")
            quantized[m] += (stored[f"{m}.weight_scale"].view(torch.float8_e4m3fn),)
            start[f"{m}.weight"] = art.weights[f"{m}.weight"]
    # the starting point's quantization must give the artifact (else the fit starts from another model): max's
    # arithmetic on the reference weights its bytes, or (--from-artifact) its own values under its block scales
    # the same values (not bytes: gptq may store -0 codes where the re-packing writes +0)
    differ = 0
    for m, spec in quantized.items():
        w = start[f"{m}.weight"]
        if len(spec) == 2:
            q = formats.nvfp4_quantize(w, spec[1])
            stored = art.read_stored(f"{m}.weight", "cpu")
            differ += int(not (torch.equal(q.weight, stored[f"{m}.weight"]) and torch.equal(
                q.weight_scale.view(torch.uint8), stored[f"{m}.weight_scale"].view(torch.uint8))))
        else:
            differ += int(not torch.equal(weight_search.nvfp4_pack(w, spec[2], spec[1]).dequantize(w.shape[-1]), w))
    log(f"{len(quantized)} NVFP4 linears; the starting point reproduces {len(quantized) - differ} of them "
        f"({'values' if from_artifact else 'bytes'})")
    norm_names = []
    if norms:
        norm_names = [n for i in range(arch.num_layers) for n in comp.tweakable(arch, i, ("norm", "mixer-norm"))]
        norm_names.append(arch.norm_f)
    t0 = time.perf_counter()
    res = comp.distill_weights(arch, start, quantized, batches, ref_logp, quantizers, steps, lr, norm_names, log=log)
    seconds = time.perf_counter() - t0
    f = res.fit
    log(f"qad: calibration KL {f.loss_before:.4e} -> {f.loss_after:.4e} ({f.loss_after / f.loss_before:.3f}x), "
        f"best step {res.best_step}{'' if f.kept else ', not kept'}; {seconds:.0f} s ({res.seconds_per_step:.2f} s/step)")
    tensors = dict(res.norms)
    for m, spec in quantized.items():
        if f.kept:
            w = res.latent[f"{m}.weight"]
            q = formats.nvfp4_quantize(w, spec[1]) if len(spec) == 2 else weight_search.nvfp4_pack(w, spec[2], spec[1])
            tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"] = q.weight, q.weight_scale
    rec = {"linears": len(quantized), "start_reproduced": len(quantized) - differ, "norm_tensors": len(norm_names),
           "calib_kl_before": f.loss_before, "calib_kl_after": f.loss_after, "kept": f.kept,
           "best_step": res.best_step, "seconds": round(seconds, 1),
           "seconds_per_step": round(res.seconds_per_step, 2)}
    return tensors, rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--norms", action="store_true", help="fit the BF16 RMSNorm weights too")
    ap.add_argument("--from-artifact", action="store_true",
                    help="start from ARTIFACT's dequantized weights (e.g. gptaq's) and keep its block scales")
    add_fit_args(ap, steps=150)
    a = ap.parse_args(argv)
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force")
    if a.json and a.json.exists() and not a.force:
        raise SystemExit(f"{a.json} exists; pass --force")
    tensors, rec = distill(str(a.artifact), a.steps, a.lr, a.calib_samples, a.calib_seq_len, a.calib_seed, a.norms,
                           a.from_artifact)
    write_copy(a.artifact, a.out, tensors, a.force)
    out = {"artifact": str(a.artifact), "copy": str(a.out), "steps": a.steps, "lr": a.lr, "norms": a.norms,
           "from_artifact": a.from_artifact,
           "calib": {"samples": a.calib_samples, "seq_len": a.calib_seq_len, "seed": a.calib_seed},
           "tensors_changed": len(tensors), **rec, "kl": {}}
    print(f"wrote {a.out} ({len(tensors)} tensors changed)", flush=True)
    out["kl"] = validate_both(a, "artifact" if a.from_artifact else "max", "qad")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".partial")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.rename(a.json)
    return out


if __name__ == "__main__":
    main()
