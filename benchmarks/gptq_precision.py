"""Which parts of GPTQ's and gptaq's linear algebra need float64: each choice's change of the result beside the
change the float32 statistics themselves bring.

    python benchmarks/gptq_precision.py [--tokens 100] [--inputs 2688] [--outputs 1856] [--json PATH]

One routed expert at the real width, synthetic: X [tokens, inputs] normal with per-channel scales u^2 (u
uniform), so a few channels carry most of the energy and the Hessian is rank-deficient below `inputs`
tokens, as a routed expert's ~100 tokens make it; Xq its NVFP4 input quantization (input_scale from the
amax); W [outputs, inputs] normal x 0.02. The noise floor: the same statistics summed token by token (float32
rounding in another order; every run's statistics have this much uncertainty). For each variant, the largest
change of the result relative to its largest entry, and the share of GPTQ's dequantized weights that change
(NVFP4, mse scales, the same global scale), against the reference:

    factor U       reference: float64 Cholesky of H, its inverse, float64 Cholesky of that (omniq before
                   this change); `gptq._inverse_cholesky` (float64 Cholesky of J H J, float32 triangular
                   inverse); the same with a float32 Cholesky; the reference from the re-summed H (noise)
    target W*      reference: float64 LU solve (before); `gptq.asymmetric_target` (float64 Cholesky solve);
                   float32 right-hand side W (C + mu); float32 solve; the reference from re-summed statistics

CPU seconds of each (one thread) are printed beside. Writes benchmarks/results/gptq_precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "gptq_precision.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--inputs", type=int, default=2688)
    ap.add_argument("--outputs", type=int, default=1856)
    ap.add_argument("--json", default=str(RESULTS))
    a = ap.parse_args(argv)

    import torch

    from omniq.quant import formats, gptq as m

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, inn, out = a.tokens, a.inputs, a.outputs
    X = torch.randn(n, inn, generator=g) * torch.rand(inn, generator=g) ** 2
    Xq = formats.FORMATS["nvfp4"].fake_quant_input(X, formats.nvfp4_global_scale(X.abs().amax()))
    W = torch.randn(out, inn, generator=g) * 0.02
    ws2 = formats.nvfp4_global_scale(W.abs().amax())

    def resummed(a_, b_):
        return sum(a_[k:k + 1].T @ b_[k:k + 1] for k in range(n)) / n

    H, H2 = X.T @ X / n, resummed(X, X)
    Hq, Hq2, C, C2 = Xq.T @ Xq / n, resummed(Xq, Xq), X.T @ Xq / n, resummed(X, Xq)

    def timed(fn, *args):
        c = time.process_time()
        r = fn(*args)
        return r, time.process_time() - c

    def rel(x, ref):
        return float((x - ref).abs().max() / ref.abs().max())

    def damped(h, damping):
        hd, mean, _ = m._with_dead_channels(h)
        hd.diagonal().add_(damping * mean[..., 0])
        return hd

    def factor_reference(h):
        lower = torch.linalg.cholesky(damped(h, m.DAMPING))
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()

    def factor_float32(h):
        lower = torch.linalg.cholesky(damped(h, m.DAMPING).flip(-2, -1).float())
        return m._lower_inverse(lower).flip(-2, -1)

    def weights(U, target=W):
        real = m._inverse_cholesky
        m._inverse_cholesky = lambda h, d: U.unsqueeze(0)
        try:
            return m.gptq(target.unsqueeze(0), H.unsqueeze(0), "nvfp4", weight_scale_2=ws2.reshape(1)).dequantized()
        finally:
            m._inverse_cholesky = real

    ref, t_ref = timed(factor_reference, H)
    d_ref = weights(ref)
    rows = {"factor": {}, "target": {}}
    for name, fn, h in (("float64 Cholesky, float32 triangular inverse (omniq)", lambda x: m._inverse_cholesky(x, m.DAMPING), H),
                        ("float32 Cholesky and inverse", factor_float32, H),
                        ("reference from the re-summed statistics (noise)", factor_reference, H2)):
        U, t = timed(fn, h)
        rows["factor"][name] = {"rel_change": rel(U, ref), "weights_changed": float((weights(U) != d_ref).float().mean()),
                                "cpu_s": t}
    rows["factor"]["reference (float64 Cholesky, inverse, Cholesky)"] = {"cpu_s": t_ref}

    def target_variant(hq, cross, rhs32=False, solve32=False, lu=False, damping=m.TARGET_DAMPING):
        h, mean, _ = m._with_dead_channels(hq)
        c = cross.double().clone()
        torch.diagonal(c)[torch.diagonal(hq) == 0] = 1.0
        h.diagonal().add_(damping * mean[..., 0])
        c.diagonal().add_(damping * mean[..., 0])
        rhs = (W.float() @ c.float()).double().T if rhs32 else (W.double() @ c).T
        if lu:
            return torch.linalg.solve(h, rhs).T.float()
        if solve32:
            return torch.cholesky_solve(rhs.float(), torch.linalg.cholesky(h).float()).T
        return torch.cholesky_solve(rhs, torch.linalg.cholesky(h)).T.float()

    tref, t_tref = timed(target_variant, Hq, C, False, False, True)
    U = m._inverse_cholesky(H, m.DAMPING)
    dt_ref = weights(U, tref)
    for name, fn in (("float64 Cholesky solve (omniq)", lambda: m.asymmetric_target(W, Hq, C)),
                     ("float32 right-hand side", lambda: target_variant(Hq, C, rhs32=True)),
                     ("float32 solve", lambda: target_variant(Hq, C, solve32=True)),
                     ("reference from the re-summed statistics (noise)", lambda: target_variant(Hq2, C2, lu=True))):
        T, t = timed(fn)
        rows["target"][name] = {"rel_change": rel(T, tref), "weights_changed": float((weights(U, T) != dt_ref).float().mean()),
                                "cpu_s": t}
    rows["target"]["reference (float64 LU solve)"] = {"cpu_s": t_tref}
    for part, variants in rows.items():
        print(f"{part}:")
        for name, r in variants.items():
            extra = (f"; change {r['rel_change']:.1e} of the largest entry, {r['weights_changed']:.1e} of the weights"
                     if "rel_change" in r else "")
            print(f"  {name:55s} {r['cpu_s']:6.2f} CPU s{extra}")
    doc = {"tokens": n, "inputs": inn, "outputs": out, "threads": 1, **rows}
    Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
