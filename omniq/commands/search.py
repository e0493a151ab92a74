"""`omniq search MODEL --budget BITS --out RECIPE.yaml`: a mixed-precision recipe from measured sensitivity.

1. Cheap checks first (nothing is written on failure): `--out` (refused when it exists, without --force),
   `--formats`, `--algorithm`, the budget against what the model can reach (below every group in its smallest
   allowed format, or above BF16: exit 2), the cache's model.
2. Statistics: activation amax per linear on the calibration rows (omniq's float32 forward, unquantized
   weights, as ModelOpt's max calibration sees them; routed experts share one amax per projection and layer,
   as the export's one input quantizer does), and per format the weights every linear would ship with under
   `--algorithm` (`omniq.quant.weight_calibration`, the same arithmetic as `omniq quantize`).
3. Sensitivity of each group (`omniq.quant.search.groups`) in each format: the mean per-token KL(ref || cand)
   at the logits, on held-out text, when that group alone takes the format (fake-quantized weights and
   activations, the rest of the model unquantized), against the reference forward (float32 on the BF16
   weights). Measured from the group's own layer on: the reference hidden states entering each layer are
   kept. Cached in a JSON file keyed by the model's file hashes and by the data and settings.
4. The exact knapsack (`omniq.quant.search.frontier` / `pick`) under the budget, a normal recipe YAML that
   `omniq quantize` takes, and the plan's exact size of that recipe beside the prediction.

Held-out text: by default the bundled `calib` split read from its end (`calib-tail`): disjoint from the
calibration rows (its first texts) and from the `eval` / `eval2` sets that `omniq validate` reports on.
Memory: the reference hidden states of every layer on the evaluation rows (layers x tokens x hidden floats:
tiny 16 x 256 tokens, 11 MiB) and the reference log-probabilities (tokens x vocab floats).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omniq.atomic import check_new_file, write_atomic
from omniq.checksums import sha256_file
from omniq.errors import OmniqError
from omniq.quant import search as srch
from omniq.quant.recipe import ALGORITHMS, Algorithm, parse

Progress = Callable[[str, int, int], None]
CACHE_FORMAT = 1
DEFAULT_EVAL = "calib-tail"
BATCH_ROWS = 8


@dataclass
class SearchResult:
    out: Path
    recipe: dict
    choice: srch.Choice
    plan_bytes: int
    plan_bits_per_weight: float
    params: int
    measured: int                    # sensitivities measured now (the rest came from the cache)
    cache: Path
    sensitivity: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def predicted_bits_per_weight(self) -> float:
        return self.choice.bits_per_weight(self.params)


def model_hash(ckpt) -> str:
    """sha256 over the checkpoint's files (names and contents): a cache is valid for these weights only."""
    h = hashlib.sha256()
    for p in sorted(ckpt.path.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _rows_hash(rows) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(rows.numpy()).astype("<i8").tobytes()).hexdigest()


def read_cache(path: Path, model_sha: str) -> dict:
    if not path.exists():
        return {"omniq_search_cache": CACHE_FORMAT, "model_sha256": model_sha, "entries": {}}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise OmniqError(f"--cache {path}: not a search cache (unreadable JSON)") from None
    if not isinstance(doc, dict) or doc.get("omniq_search_cache") != CACHE_FORMAT \
            or not isinstance(doc.get("entries"), dict):
        raise OmniqError(f"--cache {path}: not an omniq search cache (format {CACHE_FORMAT})")
    if doc.get("model_sha256") != model_sha:
        raise OmniqError(f"--cache {path}: measured on another model (sha256 {str(doc.get('model_sha256'))[:12]}, "
                         f"this one {model_sha[:12]}); pass another --cache")
    return doc


def eval_rows(tokenizer, eval_set: str, samples: int, seq_len: int):
    from omniq.validate.run import eval_texts, token_rows

    if eval_set == DEFAULT_EVAL:
        _, docs = eval_texts("calib")
        docs = list(reversed(docs))
    else:
        _, docs = eval_texts(eval_set)
    return token_rows(tokenizer, docs, samples, seq_len)


# ----- measurement ------------------------------------------------------------------------------------
def activation_amax(arch, weights, rows) -> dict[str, float]:
    """max |x| of every linear's input over the calibration rows (experts: shared per layer and projection)."""
    import torch

    from omniq.model import forward

    amax: dict[str, float] = {}
    plain = forward.plain_linear(weights)

    def linear(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().amax()))
        return plain(name, x)

    with torch.inference_mode():
        for b in range(0, rows.shape[0], BATCH_ROWS):
            forward.hidden_states(arch, weights, rows[b:b + BATCH_ROWS], linear=linear)
    shared: dict[tuple, float] = {}
    for lin in arch.linears:
        if lin.expert is not None:
            key = (lin.layer, lin.role)
            shared[key] = max(shared.get(key, 0.0), amax.get(lin.name, 0.0))
    for lin in arch.linears:
        if lin.expert is not None:
            amax[lin.name] = shared[(lin.layer, lin.role)]
    return amax


def shipped_weights(arch, source, rows, fmt: str, algorithm: str, progress=None) -> dict:
    """Every linear (but lm_head) in `fmt` under `algorithm`: name -> dequantized float32 weight."""
    from omniq.quant.weight_calibration import calibrate_weights, fake_quant

    names = [lin.name for lin in arch.linears if lin.role != "lm_head"]
    algo = Algorithm(algorithm if fmt in ALGORITHMS[algorithm] else "max")
    if algo.name == "max":
        return {n: fake_quant(source[f"{n}.weight"], fmt) for n in names}
    wc = calibrate_weights(arch, source, rows, {n: fmt for n in names}, {n: algo for n in names},
                           progress=progress)
    return {n: wc.weights[n].dequantized() for n in names}


class Sensitivity:
    """Reference hidden states per layer and reference log-probabilities on the evaluation rows, then the KL
    of the model with one group's weights and activations quantized."""

    def __init__(self, arch, weights, rows):
        import torch

        from omniq.model import forward

        self.arch, self.weights = arch, weights
        self.batches = [rows[b:b + BATCH_ROWS, :-1] for b in range(0, rows.shape[0], BATCH_ROWS)]
        self.inputs: list[list] = []        # per layer: the reference hidden states entering it, per batch
        self.ref_logp = []
        plain = forward.plain_linear(weights)
        with torch.inference_mode():
            xs = [torch.nn.functional.embedding(b, weights[arch.embedding_weight]).float()
                  for b in self.batches]
            for i in range(arch.num_layers):
                self.inputs.append(xs)
                xs = [forward.decoder_layer(arch, weights, i, x, linear=plain) for x in xs]
            self.ref_logp = [self._logp(x, plain) for x in xs]

    def _logp(self, x, linear):
        import torch

        from omniq.model import forward

        a = self.arch
        h = forward.rms_norm(x, self.weights[a.norm_f], a.norm_eps)
        if a.tie_word_embeddings:
            logits = torch.nn.functional.linear(h, self.weights[a.embedding_weight].float())
        else:
            logits = linear(a.lm_head, h)
        return torch.log_softmax(logits.double(), dim=-1).float()

    def kl(self, group: srch.Group, fmt: str, qweights: dict, amax: dict[str, float]) -> float:
        """Mean per-token KL(ref || cand) with `group` alone in `fmt`."""
        import torch
        import torch.nn.functional as F

        from omniq.model import forward
        from omniq.quant import formats

        names = {lin.name for lin in group.linears}
        weights = dict(self.weights)
        weights.update({f"{n}.weight": qweights[n] for n in names})

        def linear(name, x):
            if name in names:
                a = amax.get(name, 0.0)
                if a > 0:
                    x = formats.fp8_fake_quant(x, formats.fp8_scale(a)) if fmt == "fp8" \
                        else formats.nvfp4_fake_quant(x, formats.nvfp4_global_scale(a))
            return F.linear(x, weights[f"{name}.weight"].float())

        total, tokens = 0.0, 0
        with torch.inference_mode():
            for k, x in enumerate(self.inputs[group.layer]):
                for i in range(group.layer, self.arch.num_layers):
                    x = forward.decoder_layer(self.arch, weights, i, x, linear=linear)
                lc = self._logp(x, linear).double()
                lr = self.ref_logp[k].double()
                total += float((lr.exp() * (lr - lc)).sum(-1).clamp_min(0.0).sum())
                tokens += lr.shape[0] * lr.shape[1]
        return total / tokens


# ----- the command --------------------------------------------------------------------------------------
def search(model: str, budget: float, out, *, formats: str = "nvfp4,fp8,bf16", algorithm: str = "max",
           cache=None, eval_set: str = DEFAULT_EVAL, samples: int = 16, seq_len: int = 256,
           calib: str = "tiny-calib", calib_samples: int = 16, calib_seq_len: int = 256,
           calib_seed: int | None = None, force: bool = False, progress: Progress | None = None) -> SearchResult:
    from omniq.calib import data as calib_data
    from omniq.commands.quantize import open_source
    from omniq.quant.plan import make_plan

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out).expanduser().absolute()
    check_new_file(out, "--out", force=force)
    if out.suffix not in (".yaml", ".yml"):
        raise OmniqError(f"--out {out}: a recipe file ends in .yaml or .yml")
    fmts = srch.check_formats(tuple(f.strip() for f in formats.split(",") if f.strip()))
    if algorithm not in ALGORITHMS:
        raise OmniqError(f"--algorithm {algorithm!r} is unknown; expected one of {', '.join(ALGORITHMS)}")
    quantizing = [f for f in fmts if f != "bf16"]
    if quantizing and not any(f in ALGORITHMS[algorithm] for f in quantizing):
        raise OmniqError(f"--algorithm {algorithm} does not apply to --formats {','.join(fmts)}")
    ckpt = open_source(model)
    if ckpt.is_omni:
        raise OmniqError(f"{ckpt.path}: omniq search runs on text NemotronH checkpoints only for now")
    arch = ckpt.arch
    gs = srch.groups(arch)
    base = srch.fixed_bytes(arch)
    params = arch.num_params
    low, high = srch.size_bounds(gs, fmts, base)
    low_bpw, high_bpw = 8 * low / params, 8 * high / params
    if not budget >= low_bpw - 1e-9:
        raise OmniqError(f"--budget {budget:g} bits/weight is below the smallest this model reaches with --formats "
                         f"{','.join(fmts)} ({low_bpw:.3f})")
    if budget > high_bpw + 1e-9:
        raise OmniqError(f"--budget {budget:g} bits/weight is above BF16 ({high_bpw:.3f} bits/weight on this model)")
    model_sha = model_hash(ckpt)
    cache_path = Path(cache).expanduser().absolute() if cache else out.with_name(out.stem + ".sensitivity.json")
    doc = read_cache(cache_path, model_sha)
    seconds["prepare"] = time.perf_counter() - t0

    rows = eval_rows(ckpt.tokenizer, eval_set, samples, seq_len)
    calib_set = calib_data.load(calib, ckpt.tokenizer, samples=calib_samples, seq_len=calib_seq_len, seed=calib_seed)
    settings = {"eval": eval_set, "eval_rows_sha256": _rows_hash(rows), "calib": dict(calib_set.identity),
                "calib_rows_sha256": _rows_hash(calib_set.rows), "algorithm": algorithm,
                "metric": "mean per-token KL(ref || cand), nats"}
    data_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    entry = doc["entries"].setdefault(data_key, {"settings": settings, "kl": {}})
    kl = entry["kl"]
    missing = [(g, f) for g in gs for f in quantizing if f not in kl.get(g.name, {})]
    measured = 0
    if missing:
        import torch

        t = time.perf_counter()
        source = {k: v.float() for k, v in ckpt.read([tt.name for tt in arch.tensors]).items()}
        amax = activation_amax(arch, source, calib_set.rows)
        sens = Sensitivity(arch, source, rows)
        seconds["reference"] = time.perf_counter() - t
        t = time.perf_counter()
        for f in sorted({f for _, f in missing}):
            qweights = shipped_weights(arch, source, calib_set.rows, f, algorithm)
            todo = [g for g, ff in missing if ff == f]
            for k, g in enumerate(todo):
                kl.setdefault(g.name, {})[f] = sens.kl(g, f, qweights, amax)
                measured += 1
                if progress:
                    progress("measure", measured, len(missing))
            del qweights
        seconds["measure"] = time.perf_counter() - t
        del source, sens
        write_atomic(cache_path, json.dumps(doc, indent=1) + "\n")    # a cache: updated in place

    choices = srch.frontier(gs, kl, fmts, base)
    budget_bytes = budget * params / 8
    choice = srch.pick(choices, budget_bytes)
    bpw = choice.bits_per_weight(params)
    name = f"search-{budget:g}bpw"
    description = (f"omniq search on {model}: --budget {budget:g} bits/weight, --formats {','.join(fmts)}, "
                   f"--algorithm {algorithm}; predicted {choice.bytes} bytes ({bpw:.3f} bits/weight), predicted KL "
                   f"{choice.kl:.3e} (sum of the chosen groups' measured sensitivities on {eval_set})")
    recipe = srch.recipe_dict(choice, gs, algorithm, name, description)
    plan = make_plan(arch, parse(recipe, name))        # the recipe quantize will read, checked
    import yaml

    write_atomic(out, yaml.safe_dump(recipe, sort_keys=False, width=120), replace=force)
    seconds["total"] = time.perf_counter() - t0
    return SearchResult(out=out, recipe=recipe, choice=choice, plan_bytes=plan.total_bytes,
                        plan_bits_per_weight=plan.bits_per_weight, params=params, measured=measured,
                        cache=cache_path, sensitivity=kl, seconds=seconds)
