"""How much of an NVFP4 artifact's KL its weights cause, and how much its activation quantization adds.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/nvfp4_error_split.py ARTIFACT [ARTIFACT ...]
        [--eval eval] [--samples 8 --seq-len 256] [--json PATH]

For each artifact (a quantized `tiny`), mean KL(reference || candidate) at the logits on the evaluation rows
with (a) the artifact's dequantized weights and unquantized activations (`weights only`) and (b) the engine's
arithmetic, inputs quantized as the artifact says (`omniq.validate.artifact.EngineLinear`, what `omniq
validate` measures). Weight calibration (mse, gptq, ...) can only lower (a); what (b) keeps above (a) comes from
the W4A4 activation quantization, which no weight algorithm removes. The reference is the BF16 model in the
same float32 forward.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    a = ap.parse_args(argv)
    ref = read_artifact("tiny")
    rows = token_rows(ref.tokenizer, eval_texts(a.eval)[1], a.samples, a.seq_len)
    batches = [(rows[b:b + BATCH_ROWS, :-1], rows[b:b + BATCH_ROWS, 1:]) for b in range(0, rows.shape[0], BATCH_ROWS)]
    lazy = LazyWeights(ref)
    rw = {n: lazy[n] for n in lazy}
    with torch.inference_mode():
        base = [forward.logits(ref.arch, rw, x) for x, _ in batches]
    out = {"eval": a.eval, "tokens": int(rows[:, 1:].numel()), "artifacts": {}}
    print(f"{'artifact':<40} {'KL weights only':>16} {'KL engine':>12} {'weights share':>14}")
    for path in a.artifacts:
        art = read_artifact(path)
        lazy = LazyWeights(art)
        w = {n: lazy[n] for n in lazy}
        kl = {}
        for mode, linear in (("weights_only", forward.plain_linear(w)), ("engine", EngineLinear(art.layers, w))):
            cmp = Comparison()
            with torch.inference_mode():
                for (x, y), logits in zip(batches, base):
                    cmp.add(logits, forward.logits(art.arch, w, x, linear=linear), y)
            kl[mode] = cmp.summary()["kl_mean"]
        out["artifacts"][str(path)] = kl
        print(f"{Path(path).name:<40} {kl['weights_only']:>16.3e} {kl['engine']:>12.3e} "
              f"{kl['weights_only'] / kl['engine']:>14.2f}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
