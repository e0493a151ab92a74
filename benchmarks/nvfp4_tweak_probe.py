"""Go/no-go probe: compensate an NVFP4 artifact's error in its BF16 parameters ("norm tweaking"), then validate.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_tweak_probe.py ARTIFACT --out COPY
        [--params norm,mixer-norm] [--steps 200] [--lr 1e-3] [--calib-samples 16 --calib-seq-len 256
        --calib-seed 0] [--validate eval,eval2 --samples 8 --seq-len 256] [--json PATH] [--force]

ARTIFACT is a quantized `tiny` (e.g. `omniq quantize tiny --recipe nvfp4 --calib-seed 0`). Layer by layer,
the chosen BF16 parameters of each decoder layer are fitted (`omniq.quant.compensation.fit_layer`: Adam on
the layer's output MSE, the quantized layer run as the engine runs it, fed the quantized model's hidden
states, against the reference layer on the reference hidden states) on the calibration rows of `--calib-seed`
(the bundled calibration text: never an evaluation set); COPY is the artifact with the fitted tensors written
in BF16 in place of the originals (omniq.json's file hashes updated; everything else byte for byte). Then
`omniq validate tiny COPY --eval S` and the same for ARTIFACT, each in its own process, print KL mean of both
and their ratio. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _say(msg: str, **_) -> None:
    print(msg, flush=True)


def tweak(artifact: str, kinds, steps: int, lr: float, samples: int, seq_len: int, seed: int, log=None):
    import torch

    log = log or _say
    from omniq.calib import data as calib_data
    from omniq.model import forward
    from omniq.quant import compensation as comp
    from omniq.validate.artifact import EngineLinear, read_artifact

    ref, art = read_artifact("tiny"), read_artifact(artifact)
    arch = ref.arch
    rows = calib_data.load(calib_data.default_for(ref.path), ref.tokenizer, samples=samples, seq_len=seq_len,
                           seed=seed).rows
    emb = ref.weights[arch.embedding_weight]
    xs_ref = [forward.embed(arch, {arch.embedding_weight: emb}, rows[b:b + comp.BATCH_ROWS])
              for b in range(0, rows.shape[0], comp.BATCH_ROWS)]
    xs_q = [x.clone() for x in xs_ref]
    quantizers = {}
    eng_all = EngineLinear(art.layers, {})
    for n, layer in art.layers.items():
        if layer.input_scale is not None:
            quantizers[n] = lambda x, n=n: eng_all.prepare(n, x)
    result = comp.CompensationResult()
    t0 = time.perf_counter()
    for i in range(arch.num_layers):
        names = art.names_by_layer[i]
        ref_u = {n: ref.unit([n])[n] for n in names}
        cand_u = {n: art.unit([n])[n] for n in names}
        with torch.no_grad():
            targets = [forward.decoder_layer(arch, ref_u, i, x) for x in xs_ref]
        fit_names = comp.tweakable(arch, i, kinds)
        t1 = time.perf_counter()
        fitted, rec = comp.fit_layer(arch, i, cand_u, xs_q, targets, quantizers, fit_names, steps, lr)
        result.fits.append(rec)
        result.tensors.update(fitted)
        log(f"layer {i} ({arch.kinds[i]}): loss {rec.loss_before:.4e} -> {rec.loss_after:.4e} "
            f"({rec.loss_after / max(rec.loss_before, 1e-30):.3f}x){'' if rec.kept else ' not kept'}, "
            f"{time.perf_counter() - t1:.1f} s", flush=True)
        view = dict(cand_u, **{n: v.float() for n, v in fitted.items()})
        with torch.no_grad():
            xs_q = [forward.decoder_layer(arch, view, i, x, linear=EngineLinear(art.layers, view)) for x in xs_q]
        xs_ref = targets
    result.seconds = time.perf_counter() - t0
    return result


def e2e_inputs(artifact: str, samples: int, seq_len: int, seed: int):
    """What an end-to-end fit against tiny needs: (tiny's reader, ARTIFACT's reader, tiny's float32 weights,
    the calibration rows of `seed` in batches, the reference's log-softmax per batch, ARTIFACT's input
    quantizers as the engine runs them)."""
    import torch

    from omniq.calib import data as calib_data
    from omniq.model import forward
    from omniq.quant import compensation as comp
    from omniq.validate.artifact import EngineLinear, read_artifact

    ref, art = read_artifact("tiny"), read_artifact(artifact)
    rows = calib_data.load(calib_data.default_for(ref.path), ref.tokenizer, samples=samples, seq_len=seq_len,
                           seed=seed).rows
    batches = [rows[b:b + comp.BATCH_ROWS] for b in range(0, rows.shape[0], comp.BATCH_ROWS)]
    rw = {n: ref.weights[n] for n in ref.base_names}
    with torch.no_grad():
        ref_logp = [torch.log_softmax(forward.logits(ref.arch, rw, x), -1) for x in batches]
    eng_all = EngineLinear(art.layers, {})
    quantizers = {n: (lambda x, n=n: eng_all.prepare(n, x)) for n, layer in art.layers.items()
                  if layer.input_scale is not None}
    return ref, art, rw, batches, ref_logp, quantizers


def distill(artifact: str, kinds, steps: int, lr: float, samples: int, seq_len: int, seed: int, final_norm: bool,
            log=None):
    """`--mode e2e`: every layer's `kinds` (and with `final_norm` the final RMSNorm) fitted jointly on the
    KL at the logits (`compensation.fit_model`)."""
    log = log or _say
    from omniq.quant import compensation as comp

    ref, art, rw, batches, ref_logp, quantizers = e2e_inputs(artifact, samples, seq_len, seed)
    arch = ref.arch
    cw = {n: art.weights[n] for n in art.base_names}
    names = [n for i in range(arch.num_layers) for n in comp.tweakable(arch, i, kinds)]
    if final_norm:
        names.append(arch.norm_f)
    t0 = time.perf_counter()
    fitted, rec = comp.fit_model(arch, cw, batches, ref_logp, quantizers, names, steps, lr, log=log)
    log(f"e2e: calibration KL {rec.loss_before:.4e} -> {rec.loss_after:.4e} "
        f"({rec.loss_after / rec.loss_before:.3f}x){'' if rec.kept else ' not kept'}", flush=True)
    result = comp.CompensationResult(tensors=fitted, fits=[rec], seconds=time.perf_counter() - t0)
    return result


def write_copy(artifact: Path, out: Path, tensors: dict, force: bool) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from omniq.checksums import sha256_file

    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists; pass --force")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(artifact, tmp)
    left = dict(tensors)
    for shard in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())
            if not left.keys() & set(keys):
                continue
            meta = f.metadata()
            loaded = {k: f.get_tensor(k) for k in keys}
        for k in left.keys() & set(keys):
            if loaded[k].dtype != left[k].dtype or loaded[k].shape != left[k].shape:
                raise SystemExit(f"{k}: stored {loaded[k].dtype} {tuple(loaded[k].shape)}, fitted "
                                 f"{left[k].dtype} {tuple(left[k].shape)}")
            loaded[k] = left.pop(k).contiguous()
        save_file(loaded, str(shard), metadata=meta)
    if left:
        raise SystemExit(f"{len(left)} fitted tensors not in the artifact, e.g. {next(iter(left))}")
    m = tmp / "omniq.json"
    if m.is_file():
        manifest = json.loads(m.read_text())
        files = manifest.get("files") or {}
        for name in list(files):
            p = tmp / name
            if p.is_file() and p.suffix == ".safetensors":
                files[name] = sha256_file(p) if isinstance(files[name], str) else dict(files[name], sha256=sha256_file(p))
        m.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.rename(out)


def validate(path: Path, s: str, samples: int, seq_len: int, report: Path) -> dict:
    cmd = [sys.executable, "-m", "omniq.cli", "validate", "tiny", str(path), "--eval", s, "--samples", str(samples),
           "--seq-len", str(seq_len), "--report", str(report), "--max-kl", "10", "--min-top1", "0",
           "--max-ppl-ratio", "100", "--no-noise-floor", "--force"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"validate {path} failed (rc {p.returncode}): {p.stderr.strip()[-1500:]}")
    v = json.loads(report.read_text())
    return {k: v[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")}


def add_fit_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The options both probes share: Adam's steps and lr, the calibration rows, the evaluation, the output."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--validate", default="eval,eval2")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--force", action="store_true")


def validate_both(a: argparse.Namespace, before: str, after: str) -> dict:
    """`omniq validate` of a.artifact and of a.out on each set of a.validate: {set: {before: report, after:
    report, ratio: after's KL mean / before's}}, each line printed."""
    out = {}
    for s in (x for x in a.validate.split(",") if x):
        base = validate(a.artifact, s, a.samples, a.seq_len, a.out.parent / f"{a.artifact.name}.{s}.json")
        new = validate(a.out, s, a.samples, a.seq_len, a.out.parent / f"{a.out.name}.{s}.json")
        out[s] = {before: base, after: new, "ratio": new["kl_mean"] / base["kl_mean"]}
        print(f"{s}: KL {before} {base['kl_mean']:.3e} -> {after} {new['kl_mean']:.3e} "
              f"({new['kl_mean'] / base['kl_mean']:.3f}x); top-1 {base['top1_agreement']:.4f} -> "
              f"{new['top1_agreement']:.4f}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", default="norm,mixer-norm")
    ap.add_argument("--mode", choices=("layer", "e2e"), default="layer")
    ap.add_argument("--final-norm", action="store_true", help="e2e: fit the final RMSNorm too")
    add_fit_args(ap, steps=200)
    a = ap.parse_args(argv)
    kinds = tuple(k for k in a.params.split(",") if k)
    if a.mode == "e2e":
        res = distill(str(a.artifact), kinds, a.steps, a.lr, a.calib_samples, a.calib_seq_len, a.calib_seed,
                      a.final_norm)
    else:
        res = tweak(str(a.artifact), kinds, a.steps, a.lr, a.calib_samples, a.calib_seq_len, a.calib_seed)
    write_copy(a.artifact, a.out, res.tensors, a.force)
    out = {"artifact": str(a.artifact), "copy": str(a.out), "mode": a.mode, "params": list(kinds),
           "final_norm": a.final_norm, "steps": a.steps, "lr": a.lr,
           "calib": {"samples": a.calib_samples, "seq_len": a.calib_seq_len, "seed": a.calib_seed},
           "seconds": round(res.seconds, 1), "tensors_changed": len(res.tensors),
           "layers": [{"layer": f.layer, "loss_before": f.loss_before, "loss_after": f.loss_after, "kept": f.kept}
                      for f in res.fits], "kl": {}}
    print(f"fitted {len(res.tensors)} tensors in {res.seconds:.0f} s; wrote {a.out}", flush=True)
    out["kl"] = validate_both(a, "artifact", "tweaked")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
