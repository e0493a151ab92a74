"""Weight calibration beyond max: calibration-input statistics layer by layer, then the algorithms.

`calibrate_weights(arch, source, rows, formats, algorithms, global_scales)` runs omniq's own float32 forward
(`omniq.model.forward.decoder_layer`, one decoder layer at a time over all calibration rows) with a `linear` hook that
records, per linear layer and per routed expert (an expert's hook sees only the tokens routed to it), the
token count and the input statistics its algorithm needs:

    local-hessian   block-local Hessians, sum of x_b^T x_b for every 16-block b of input channels [in/16, 16, 16]
                    (their diagonals are the per-channel second moments that FP8's local-hessian weights by)
    gptq            the full input Hessian, sum of x^T x [in, in]: in_features^2 floats per linear and per
                    expert while its layer is calibrated (tiny: 256 KiB; Nemotron 3 Nano's 2,688-wide
                    inputs: 29 MiB per linear, 128 experts x 2 projections of one MoE layer 3.7 GB at once)

then quantizes that layer's weights (`weight_search`, `gptq`) and runs the layer again with its quantized
weights (every quantized linear, max ones included) to produce the next layer's inputs, so a layer's
statistics reflect the quantization of the layers before it, as GPTQ's sequential mode and ModelOpt's
`get_qdq_activations_from_prev_layer` do. `mse` and `four-over-six` need no statistics; when no layer asks for
any, no forward runs. A routed expert with fewer than `min_tokens` routed tokens falls back to `mse` and is
listed in `fallbacks`. Activation (input) scales stay ModelOpt's max calibration.

The result is per-linear packed tensors (`tensors()`, the names and dtypes ModelOpt exports) that replace the
exported weight and weight scale of those layers; `weight_scale_2` / `input_scale` stay the export's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from omniq.model import forward
from omniq.model.arch import Arch
from omniq.quant import formats, gptq as gptq_mod, weight_search
from omniq.quant.recipe import Algorithm

STATS = {"local-hessian": "blocks", "gptq": "hessian"}
BATCH_ROWS = 8


@dataclass
class CalibratedWeight:
    name: str                       # module (hub layout, no ".weight")
    fmt: str                        # fp8 | nvfp4
    algorithm: str                  # the one that ran (mse when an expert fell back)
    values: torch.Tensor            # float32 [out, in] to pack with weight_scale
    weight_scale: torch.Tensor      # nvfp4: float8_e4m3fn [out, in/16]; fp8: fp32 scalar
    weight_scale_2: torch.Tensor | None = None
    tokens: int | None = None       # calibration tokens that reached it (None: no statistics needed)

    def packed(self):
        if self.fmt == "nvfp4":
            return weight_search.nvfp4_pack(self.values, self.weight_scale, self.weight_scale_2)
        return formats.fp8_quantize(self.values, self.weight_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The exported tensors this replaces: X.weight and X.weight_scale."""
        p = self.packed()
        return {f"{self.name}.weight": p.weight, f"{self.name}.weight_scale": p.weight_scale}

    def dequantized(self) -> torch.Tensor:
        p = self.packed()
        return p.dequantize(self.values.shape[-1]) if self.fmt == "nvfp4" else p.dequantize()


@dataclass
class WeightCalibration:
    weights: dict[str, CalibratedWeight] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)       # experts that fell back to mse (too few tokens)
    seconds: float = 0.0
    stats_bytes: int = 0                                      # largest statistics held at once

    def overrides(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for cw in self.weights.values():
            out.update(cw.tensors())
        return out

    def manifest(self, algorithms: dict[str, Algorithm]) -> dict:
        """omniq.json `weight_calibration`: algorithms with their parameters and layer counts, fallbacks."""
        used: dict[str, dict] = {}
        for algo in algorithms.values():
            entry = used.setdefault(algo.name, {"layers": 0, "parameters": []})
            entry["layers"] += 1
            params = {"name": algo.name} if isinstance(algo.as_dict(), str) else algo.as_dict()
            if params not in entry["parameters"]:
                entry["parameters"].append(params)
        return {"implementation": "omniq.quant.weight_calibration (CPU, omniq's own arithmetic)",
                "algorithms": used, "fallback_to_mse": sorted(self.fallbacks),
                "seconds": round(self.seconds, 3), "statistics_peak_bytes": self.stats_bytes}


class _Recorder:
    """A `linear` hook that accumulates input statistics for the layers in `want` (name -> kind)."""

    def __init__(self, weights, want: dict[str, str]):
        self.plain = forward.plain_linear(weights)
        self.want = want
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {name: 0 for name in want}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kind = self.want.get(name)
        if kind is not None:
            flat = x.reshape(-1, x.shape[-1]).float()
            self.tokens[name] += flat.shape[0]
            if kind == "hessian":
                add = flat.T @ flat
            else:
                xb = weight_search._blocks(flat)                          # [n, nb, 16]
                add = torch.einsum("nbi,nbj->bij", xb, xb)
            self.stats[name] = self.stats[name] + add if name in self.stats else add
        return self.plain(name, x)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stats.values())


def quantize_one(name: str, w: torch.Tensor, fmt: str, algo: Algorithm, ws2: torch.Tensor | None,
                 stat: torch.Tensor | None, tokens: int | None) -> CalibratedWeight:
    """One linear's weight by its algorithm; `stat` is the summed statistic (`STATS`), `tokens` its count."""
    wf = w.detach().float()
    name_used = algo.name
    if name_used in STATS and (stat is None or not tokens):
        name_used = "mse"
    if fmt == "nvfp4":
        ws2 = formats.nvfp4_global_scale(wf.abs().amax()) if ws2 is None else ws2
        if name_used == "gptq":
            r = gptq_mod.gptq(wf, stat / tokens, "nvfp4", weight_scale_2=ws2, damping=algo.damping,
                              block_size=algo.block_size)
            return CalibratedWeight(name, fmt, name_used, r.values, r.weight_scale, ws2, tokens)
        hb = stat / tokens if name_used == "local-hessian" else None
        codes = weight_search.nvfp4_search_scales(wf, ws2, name_used, hb)
        return CalibratedWeight(name, fmt, name_used, wf, codes, ws2, tokens)
    if name_used == "gptq":
        r = gptq_mod.gptq(wf, stat / tokens, "fp8", damping=algo.damping, block_size=algo.block_size)
        return CalibratedWeight(name, fmt, name_used, r.values, r.weight_scale, None, tokens)
    if name_used == "four-over-six":
        raise ValueError("four-over-six applies to NVFP4 only")
    moment = torch.diagonal(stat, dim1=-2, dim2=-1).flatten()[: wf.shape[1]] / tokens if name_used == "local-hessian" else None
    return CalibratedWeight(name, fmt, name_used, wf, weight_search.fp8_search_scale(wf, name_used, moment),
                            None, tokens)


def _gptq_stack(lins, fmt: str, algo: Algorithm, source, rec: "_Recorder", global_scales) -> dict:
    """GPTQ of same-shaped weights (the routed experts of one projection) in one batched call."""
    W = torch.stack([source[f"{lin.name}.weight"].float() for lin in lins])
    H = torch.stack([rec.stats[lin.name] / rec.tokens[lin.name] for lin in lins])
    ws2 = None
    if fmt == "nvfp4":
        ws2 = torch.stack([torch.as_tensor(global_scales[lin.name], dtype=torch.float32).reshape(())
                           if lin.name in global_scales else formats.nvfp4_global_scale(W[k].abs().amax())
                           for k, lin in enumerate(lins)])
    r = gptq_mod.gptq(W, H, fmt, weight_scale_2=ws2, damping=algo.damping, block_size=algo.block_size)
    return {lin.name: CalibratedWeight(lin.name, fmt, "gptq", r.values[k], r.weight_scale[k],
                                       None if ws2 is None else r.weight_scale_2[k], rec.tokens[lin.name])
            for k, lin in enumerate(lins)}


def fake_quant(w: torch.Tensor, fmt: str, ws2: torch.Tensor | None = None) -> torch.Tensor:
    """Max-calibrated weight as it will be exported (float32)."""
    if fmt == "nvfp4":
        return formats.nvfp4_fake_quant_weight(w, ws2)
    if fmt == "fp8":
        return formats.fp8_fake_quant_weight(w)
    return w.float()


def calibrate_weights(arch: Arch, source: dict[str, torch.Tensor], rows: torch.Tensor | None,
                      formats_of: dict[str, str], algorithms: dict[str, Algorithm],
                      global_scales: dict[str, torch.Tensor] | None = None,
                      progress=None) -> WeightCalibration:
    """Weights of every linear whose algorithm is not max, layer by layer (see the module doc).

    `source`: every tensor of the language model (hub names), float32 or bf16; `rows`: calibration token ids
    (samples, seq_len); `formats_of` / `algorithms`: per linear (the plan's); `global_scales`: NVFP4
    weight_scale_2 per linear as exported (fused layers share one), else amax / (6 * 448)."""
    t0 = time.perf_counter()
    global_scales = global_scales or {}
    todo = {n: a for n, a in algorithms.items() if a.name != "max" and formats_of.get(n, "bf16") != "bf16"}
    result = WeightCalibration()
    needs_stats = any(a.name in STATS for a in todo.values())
    if needs_stats and rows is None:
        raise ValueError("local-hessian and gptq need calibration token rows")
    current = dict(source)
    xs = []
    if needs_stats:
        emb = source[arch.embedding_weight].float()
        xs = [F.embedding(rows[b:b + BATCH_ROWS], emb) for b in range(0, rows.shape[0], BATCH_ROWS)]
    by_layer: dict[int, list] = {}
    for lin in arch.linears:
        if lin.layer is not None:
            by_layer.setdefault(lin.layer, []).append(lin)
    for i in range(arch.num_layers):
        lins = by_layer.get(i, [])
        want = {lin.name: STATS[todo[lin.name].name] for lin in lins
                if lin.name in todo and todo[lin.name].name in STATS}
        rec = _Recorder(current, want)
        if want:
            with torch.inference_mode():
                for x in xs:
                    forward.decoder_layer(arch, current, i, x, linear=rec)
            result.stats_bytes = max(result.stats_bytes, rec.nbytes())
        stacks: dict[tuple, list] = {}          # routed experts under gptq: one batched call per projection
        for lin in lins:
            if lin.name not in todo:
                continue
            algo = todo[lin.name]
            tokens = rec.tokens.get(lin.name)
            if algo.name in STATS and lin.expert is not None and (tokens or 0) < algo.min_tokens:
                result.fallbacks.append(lin.name)
                algo = Algorithm("mse")
            if algo.name == "gptq" and lin.expert is not None:
                stacks.setdefault((lin.role, formats_of[lin.name], algo), []).append(lin)
                continue
            cw = quantize_one(lin.name, source[f"{lin.name}.weight"], formats_of[lin.name], algo,
                              global_scales.get(lin.name), rec.stats.get(lin.name), tokens)
            result.weights[lin.name] = cw
        for (_, fmt, algo), group in stacks.items():
            result.weights.update(_gptq_stack(group, fmt, algo, source, rec, global_scales))
        del rec
        if needs_stats:
            for lin in lins:
                fmt = formats_of.get(lin.name, "bf16")
                if lin.name in result.weights:
                    current[f"{lin.name}.weight"] = result.weights[lin.name].dequantized()
                elif fmt != "bf16":
                    current[f"{lin.name}.weight"] = fake_quant(source[f"{lin.name}.weight"], fmt,
                                                               global_scales.get(lin.name))
            with torch.inference_mode():
                xs = [forward.decoder_layer(arch, current, i, x, linear=forward.plain_linear(current)) for x in xs]
        if progress:
            progress("weights", i + 1, arch.num_layers)
    result.seconds = time.perf_counter() - t0
    return result
