"""Probe: NVFP4 of the channel-reordered `tiny` (omniq.quant.reorder) against NVFP4 of `tiny` itself.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_reorder_probe.py --work DIR [--seeds 0]
        [--recipes nvfp4,R.yaml] [--points hidden,hidden+inner,hidden+inner+intermediate]
        [--orders sort,random0,search] [--samples 8 --seq-len 256] [--search-tokens 512] [--baseline J]
        [--json PATH]

For each calibration seed S the float32 forward of `tiny` runs over the quantize's own calibration rows
(`tiny-calib`, 16 x 256, seed S) and keeps every NVFP4 input the orders act on: each layer's normed input
(what its residual readers quantize), each Mamba out_proj's input, each routed / shared expert's
down-projection input. From them, three ways to choose the orders (omniq.quant.reorder's `hidden`, `inner`,
`intermediate`):
- `sort`: channels sorted by calibration RMS, so each 16-block holds channels of similar magnitude (the
  hidden order by the mean over layers of log RMS; Mamba's within each head);
- `randomN` (the control): a random order (within each head for Mamba), torch seed N: how far the KL of
  an artifact moves for an order chosen by nothing;
- `search`: pairwise swaps between 16-blocks (within a head for Mamba), each kept when it lowers the NVFP4
  error of the kept inputs (dynamic per-block scales under the max input_scale), the error of a channel
  weighted by its readers' squared column norms; half the calibration rows choose, the other half report.
Printed and saved per order: that error (relative, on the report half) against the checkpoint's own order.
Then for each point (which orders are applied) DIR/tiny-PERM-sS is written (the bundled tiny with the orders
folded in: same names, shapes, dtypes), validated in BF16 against `tiny` (the same function: KL at float32
summation noise), quantized with each recipe (`omniq quantize --calib tiny-calib --calib-seed S`) and
validated against the unpermuted `tiny` on eval and eval2 with the per-layer SQNR gate off (a permuted
weight compared with the unpermuted one says nothing), each in its own process. The unpermuted `tiny` is
quantized and validated the same way beside them (`baseline`; `--baseline J` takes them from an
earlier run's json J where it has them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.transformed_tiny import SETS, kl, omniq, write_transformed  # noqa: E402

FP4_SPAN = 6.0 * 448.0          # E2M1 max x E4M3 max: the max calibration's input_scale divisor


# ----- what the orders act on ------------------------------------------------------------------------------
class Input:
    """One NVFP4 input an order permutes: its calibration rows, max input_scale and channel weights."""

    def __init__(self, x, weight):
        self.x = x                       # (tokens, channels) float32
        self.scale = float(x.abs().amax()) / FP4_SPAN
        self.weight = weight             # (channels,) squared column norms of its readers


def capture(arch, w, rows):
    """Float32 forward of `rows`; returns (layer inputs, Mamba out_proj inputs, down inputs), keyed by the
    order they belong to, each value a list of `Input`s (one per quantized input sharing that order)."""
    import torch

    from omniq.model import forward
    from omniq.quant import reorder
    from omniq.validate.run import BATCH_ROWS

    kept: dict[str, list] = {}
    plain = forward.plain_linear(w)

    def record(name, x):
        kept.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float().clone())
        return plain(name, x)
    with torch.inference_mode():
        for b in range(0, rows.shape[0], BATCH_ROWS):
            forward.hidden_states(arch, w, rows[b:b + BATCH_ROWS], linear=record)
    x = {n: torch.cat(v) for n, v in kept.items()}
    cols = {lin.name: w[f"{lin.name}.weight"].float().pow(2).sum(0) for lin in arch.linears}
    by_layer: dict[int, list] = {}
    for lin in arch.linears:
        if lin.role in reorder.READERS and lin.layer is not None:
            by_layer.setdefault(lin.layer, []).append(lin)
    hidden, inner, inter = [], {}, {}
    for i, lins in sorted(by_layer.items()):
        full = max((x[lin.name] for lin in lins if lin.name in x), key=lambda t: t.shape[0])   # all tokens
        share = {lin.name: x[lin.name].shape[0] / full.shape[0] if lin.name in x else 0.0 for lin in lins}
        hidden.append(Input(full, sum(cols[lin.name] * share[lin.name] for lin in lins)))
    for lin in arch.linears:
        if lin.role == "mamba_out":
            inner[reorder.inner_key(lin.layer)] = [Input(x[lin.name], cols[lin.name])]
        elif lin.role in reorder.UPS.values() and lin.name in x and x[lin.name].shape[0] >= 32:
            up = lin.name.rsplit(".", 1)[0] + ".up_proj"
            inter[reorder.intermediate_key(up)] = [Input(x[lin.name], cols[lin.name])]
    return {reorder.HIDDEN: hidden}, inner, inter


def halves(inputs, which: int):
    out = []
    for inp in inputs:
        n = inp.x.shape[0] // 2
        part = Input(inp.x[:n] if which == 0 else inp.x[n:], inp.weight)
        part.scale = inp.scale
        out.append(part)
    return out


def error(inputs, order) -> float:
    """Sum over inputs of the weighted NVFP4 error of the reordered input, each relative to its energy."""
    from omniq.quant import formats

    total = 0.0
    for inp in inputs:
        x = inp.x[:, order]
        q = formats.nvfp4_fake_quant(x, inp.scale)
        wt = inp.weight[order]
        total += float(((q - x).pow(2) * wt).sum() / (x.pow(2) * wt).sum())
    return total


# ----- choosing the orders ---------------------------------------------------------------------------------
def sort_order(inputs, segment: int):
    """Channels by mean log RMS over the inputs, sorted within each segment of `segment` channels."""
    import torch

    score = torch.stack([inp.x.pow(2).mean(0).clamp(min=1e-30).log() for inp in inputs]).mean(0)
    n = score.numel()
    return torch.cat([score[s:s + segment].argsort() + s for s in range(0, n, segment)])


def search_order(inputs, segment: int, rounds: int = 2, steps: int = 4):
    """From the checkpoint's order, the best swap between each pair of 16-blocks of a segment, kept while it
    lowers the summed weighted error of the blocks (the error is a sum over blocks, so a swap changes two)."""
    import torch

    from omniq.quant import formats

    n = inputs[0].x.shape[1]
    order = torch.arange(n)
    energy = [float((inp.x.pow(2) * inp.weight).sum()) for inp in inputs]

    def err(blocks):                     # blocks (S, 16) channel indices -> (S,) error
        e = 0
        for inp, en in zip(inputs, energy):
            xb = inp.x[:, blocks].permute(1, 0, 2)                          # (S, tokens, 16)
            q = formats.nvfp4_fake_quant(xb, inp.scale)
            e = e + ((q - xb).pow(2) * inp.weight[blocks][:, None, :]).sum((1, 2)) / en
        return e
    k = torch.arange(256)
    i, j = k // 16, k % 16
    for _ in range(rounds):
        moved = 0
        for s in range(0, n, segment):
            nb = segment // 16
            for a in range(nb):
                for b in range(a + 1, nb):
                    for _ in range(steps):
                        sa, sb = slice(s + 16 * a, s + 16 * a + 16), slice(s + 16 * b, s + 16 * b + 16)
                        ia, ib = order[sa], order[sb]
                        base = float(err(torch.stack([ia, ib])).sum())
                        A, B = ia.repeat(256, 1), ib.repeat(256, 1)
                        A[k, i], B[k, j] = ib[j], ia[i]
                        e = torch.cat([err(A[c]) + err(B[c]) for c in (slice(0, 128), slice(128, 256))])
                        best = int(e.argmin())
                        if float(e[best]) >= base * (1 - 1e-5):
                            break
                        order[sa], order[sb] = A[best], B[best]
                        moved += 1
        if not moved:
            break
    return order


def random_order(n: int, segment: int, generator):
    """A random order within each segment: the control (what any order does to the KL by chance)."""
    import torch

    return torch.cat([torch.randperm(segment, generator=generator) + s for s in range(0, n, segment)])


def choose(strategy: str, groups, arch, search_tokens: int):
    """Orders for every key of `groups` ({key: [Input]}) by `strategy` (sort | search | randomN: random with
    seed N), from the first half of the calibration rows (the search from its first `search_tokens` tokens of
    each input)."""
    import torch

    generator = torch.Generator().manual_seed(int(strategy[6:] or 0)) if strategy.startswith("random") else None
    out = {}
    for key, inputs in groups.items():
        n = inputs[0].x.shape[1]
        segment = arch.mamba_head_dim if isinstance(key, tuple) and key[0] == "inner" else n
        part = halves(inputs, 0)
        if strategy == "sort":
            out[key] = sort_order(part, segment)
        elif strategy.startswith("random"):
            out[key] = random_order(n, segment, generator)
        else:
            for inp in part:
                inp.x = inp.x[:search_tokens]
            out[key] = search_order(part, segment)
    return out


# ----- the permuted checkpoint ----------------------------------------------------------------------------
def write_permuted(out: Path, orders) -> None:
    from omniq.model.checkpoint import open_checkpoint
    from omniq.quant import reorder

    arch = open_checkpoint("tiny").arch
    reorder.check(arch, orders)
    lay = reorder.layout(arch)
    write_transformed(out, lambda k, t, read: reorder.permute_tensor(lay.get(k), t, orders))


def quantize_and_validate(ckpt, label: str, recipe: str, seed: int, a) -> dict:
    art = a.work / f"{label}-{Path(recipe).stem}-s{seed}"
    t = time.perf_counter()
    omniq("quantize", ckpt, "--recipe", recipe, "--out", art, "--force", "--calib", "tiny-calib",
          "--calib-samples", a.calib_samples, "--calib-seq-len", 256, "--calib-seed", seed)
    r = {s: kl(art, s, a, a.work / f"{art.name}.{s}.json") for s in SETS}
    r["quantize_seconds"] = time.perf_counter() - t
    shutil.rmtree(art)
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--recipes", default="nvfp4")
    ap.add_argument("--points", default="hidden,hidden+inner,hidden+inner+intermediate")
    ap.add_argument("--orders", default="sort,search")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--search-tokens", type=int, default=512)
    ap.add_argument("--baseline", type=Path, help="an earlier run's json: its unpermuted figures, same seeds")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import torch

    from omniq.calib import data as calib_data
    from omniq.validate.artifact import read_artifact

    a.work.mkdir(parents=True, exist_ok=True)
    ref = read_artifact("tiny")
    arch = ref.arch
    w = {n: ref.weights[n].float() for n in ref.base_names}
    recipes = a.recipes.split(",")
    out = {"settings": {k: str(v) for k, v in vars(a).items()}, "seeds": {}}
    for seed in (int(x) for x in a.seeds.split(",")):
        rows = calib_data.load("tiny-calib", ref.tokenizer, samples=a.calib_samples, seq_len=256, seed=seed).rows
        hidden, inner, inter = capture(arch, w, rows)
        needed = {g for point in a.points.split(",") for g in point.split("+")}
        groups = {g: v for g, v in (("hidden", hidden), ("inner", inner), ("intermediate", inter)) if g in needed}
        res = {"input_error": {}, "bf16": {}, "points": {}, "baseline": {}}
        orders = {}
        for strategy in a.orders.split(","):
            t = time.perf_counter()
            orders[strategy] = {g: choose(strategy, groups[g], arch, a.search_tokens) for g in groups}
            took = time.perf_counter() - t
            for g, grp in groups.items():
                ident = sum(error(halves(v, 1), torch.arange(v[0].x.shape[1])) for v in grp.values())
                mine = sum(error(halves(v, 1), orders[strategy][g][key]) for key, v in grp.items())
                res["input_error"].setdefault(g, {"identity": ident})[strategy] = mine
                print(f"seed {seed} {strategy:<6} {g:<12}: NVFP4 input error (report half) {mine:.4e} "
                      f"against {ident:.4e} in the checkpoint's order ({mine / ident:.3f}x)", flush=True)
            res["input_error"].setdefault("seconds", {})[strategy] = took
        earlier = json.loads(a.baseline.read_text())["seeds"].get(str(seed), {}) if a.baseline else {}
        for recipe in recipes:
            r = earlier.get("baseline", {}).get(Path(recipe).stem) or quantize_and_validate("tiny", "tiny", recipe,
                                                                                          seed, a)
            res["baseline"][Path(recipe).stem] = r
            print(f"seed {seed} unpermuted {Path(recipe).stem}: KL eval {r['eval']['kl_mean']:.4e} "
                  f"eval2 {r['eval2']['kl_mean']:.4e}", flush=True)
        for strategy in a.orders.split(","):
            for point in a.points.split(","):
                chosen = {}
                for g in point.split("+"):
                    chosen.update(orders[strategy][g])
                label = f"tiny-{strategy}-{point.replace('+', '-')}"
                ckpt = a.work / f"{label}-s{seed}"
                write_permuted(ckpt, chosen)
                res["bf16"][f"{strategy} {point}"] = {s: kl(ckpt, s, a, a.work / f"{ckpt.name}.{s}.json")
                                                      for s in SETS}
                for recipe in recipes:
                    stem = Path(recipe).stem
                    r = quantize_and_validate(ckpt, label, recipe, seed, a)
                    base = res["baseline"][stem]
                    r["of_unpermuted"] = {s: r[s]["kl_mean"] / base[s]["kl_mean"] for s in SETS}
                    res["points"][f"{strategy} {point} {stem}"] = r
                    print(f"seed {seed} {strategy} {point} {stem}: KL eval {r['eval']['kl_mean']:.4e} "
                          f"eval2 {r['eval2']['kl_mean']:.4e} ({r['of_unpermuted']['eval']:.3f} / "
                          f"{r['of_unpermuted']['eval2']:.3f}x unpermuted); BF16 KL "
                          f"{res['bf16'][f'{strategy} {point}']['eval']['kl_mean']:.1e}", flush=True)
                shutil.rmtree(ckpt)
        out["seeds"][str(seed)] = res
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
