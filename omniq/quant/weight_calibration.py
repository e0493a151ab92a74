"""Weight calibration beyond max: calibration-input statistics layer by layer, then the algorithms.

`LayerByLayer(arch, rows, formats, algorithms, embedding)` is one step per decoder layer: `layer(i, weights,
global_scales)` runs omniq's own float32 forward (`omniq.model.forward.decoder_layer`) of layer i over all
calibration rows with a `linear` hook that records, per linear layer and per routed expert (an expert's hook
sees only the tokens routed to it), the token count and the input statistics its algorithm needs:

    local-hessian   block-local Hessians, sum of x_b^T x_b for every 16-block b of input channels [in/16, 16, 16]
                    (their diagonals are the per-channel second moments that FP8's local-hessian weights by)
    gptq            the full input Hessian, sum of x^T x [in, in]: in_features^2 floats per linear and per
                    expert while its layer is calibrated (tiny: 256 KiB; Nemotron 3 Nano's 2,688-wide
                    inputs: 29 MiB per linear; 128 experts x 2 projections of one MoE layer would be 5.5 GB
                    at once, so the routed experts' are gathered a chunk of experts at a time, below)
    gptaq           with xq = Q(x) the input as the engine quantizes it (the linear's format and its exported
                    input_scale), sum of xq^T xq and the cross term sum of x^T xq: twice gptq's statistics;
                    the weight aimed at is `gptq.asymmetric_target` (the least-squares weight mapping the
                    quantized inputs onto the float outputs), then GPTQ under the quantized inputs' Hessian

then quantizes that layer's weights (`weight_search`, `gptq`) and runs the layer again with its quantized
weights (every quantized linear, max ones included) to produce the next layer's inputs, so a layer's
statistics reflect the quantization of the layers before it, as GPTQ's sequential mode and ModelOpt's
`get_qdq_activations_from_prev_layer` do. When some layer uses `gptaq`, that forward also quantizes every
quantized linear's inputs as the engine does (exported input_scale), so later layers see the engine's inputs;
without an exported input_scale (`calibrate_weights` for `omniq search`), the layer's max calibration
(amax / (6 x 448) NVFP4, amax / 448 FP8, routed experts of one projection sharing the largest, as ModelOpt
exports them) is measured from the stream's inputs first. `mse` and `four-over-six` need no statistics; when no layer asks for
any, no forward runs. A routed expert with fewer than `min_tokens` routed tokens falls back to `mse` and is
listed in `fallbacks`. Activation (input) scales stay ModelOpt's max calibration.

Routed experts under gptq / gptaq are calibrated in chunks of experts (`_expert_chunks`,
`memory.gptq_expert_chunk`): the layer's first forward records every other linear and counts the routed
tokens (skipping the experts' matmuls); then per chunk a forward over the same kept inputs runs only that
chunk's experts (`_Recorder`'s `skip`), GPTQ runs on the chunk as one batched call, and the results are
packed (`CalibratedWeight.compact`) and the statistics freed before the next chunk. The statistics are those
of one pass over every expert (tests/quant/test_gptq_chunks.py); the price is one routing of the layer's
tokens per chunk.

The result is per-linear packed tensors (`tensors()`, the names and dtypes ModelOpt exports) that replace the
exported weight and weight scale of those layers; `weight_scale_2` / `input_scale` stay the export's.

`omniq quantize` runs it inside the layer-streamed export (`LayerByLayer.exported_layer` as
`omniq.export.streamed.run`'s `layer_tensors_hook`): right after ModelOpt has calibrated and packed layer i,
the layer's source tensors are read from the shards, its statistics gathered, its weights calibrated and put
in place of ModelOpt's before the layer is written; between layers only the float32 hidden states of the
calibration rows are kept, so memory stays about one packed layer (plus those hidden states and one layer's
statistics, or one chunk of its experts'). `calibrate_weights` runs the same steps over a model held whole (`omniq search`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F

from omniq.heap import give_back
from omniq.model import forward
from omniq.model.arch import Arch
from omniq.quant import formats, gptq as gptq_mod, memory, weight_search
from omniq.quant.recipe import GPTQ_LIKE, NO_COMPENSATION, Algorithm, Compensation

STATS = {"local-hessian": "blocks", "gptq": "hessian", "gptaq": "asymmetric"}
ACT_AWARE = ("gptaq",)            # algorithms whose statistics see the engine's quantized inputs
# activation_calibration: mse tries input_scale = max's x these (1.0 first: a tie keeps max's)
ACT_FACTORS = (1.0, 0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2, 1.25)
BATCH_ROWS = memory.WEIGHT_CALIBRATION_BATCH_ROWS   # calibration rows per forward of a layer


@dataclass
class CalibratedWeight:
    name: str                       # module (hub layout, no ".weight")
    fmt: str                        # fp8 | nvfp4
    algorithm: str                  # the one that ran (mse when an expert fell back)
    values: torch.Tensor            # float32 [out, in] to pack with weight_scale
    weight_scale: torch.Tensor      # nvfp4: float8_e4m3fn [out, in/16]; fp8: fp32 scalar
    weight_scale_2: torch.Tensor | None = None
    tokens: int | None = None       # calibration tokens that reached it (None: no statistics needed)
    _packed: object = field(default=None, repr=False, compare=False)   # `compact`: the packed weight ...
    in_features: int | None = None                                      # ... and its width (values dropped)

    def packed(self):
        if self._packed is not None:
            return self._packed
        if self.fmt == "nvfp4":
            return weight_search.nvfp4_pack(self.values, self.weight_scale, self.weight_scale_2)
        return formats.fp8_quantize(self.values, self.weight_scale)

    def compact(self) -> "CalibratedWeight":
        """Pack now and drop the float32 `values` (the stream keeps a layer's calibrated weights packed: a
        real-width MoE layer's routed experts are 0.7 GB as NVFP4, 5.1 GB as float32); `tensors()` and
        `dequantized()` are the same bytes as before."""
        if self._packed is None:
            self._packed, self.in_features = self.packed(), self.values.shape[-1]
            self.values = None
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The exported tensors this replaces: X.weight and X.weight_scale."""
        p = self.packed()
        return {f"{self.name}.weight": p.weight, f"{self.name}.weight_scale": p.weight_scale}

    def dequantized(self) -> torch.Tensor:
        p = self.packed()
        if self.fmt != "nvfp4":
            return p.dequantize()
        return p.dequantize(self.values.shape[-1] if self.values is not None else self.in_features)


@dataclass
class WeightCalibration:
    weights: dict[str, CalibratedWeight] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)       # experts that fell back to mse (too few tokens)
    seconds: float = 0.0
    stats_bytes: int = 0                                      # largest statistics held at once
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)   # activation mse: module -> input_scale
    input_factors: dict[str, float] = field(default_factory=dict)         # ... and its factor on max's
    compensated: dict[str, torch.Tensor] = field(default_factory=dict)    # norm-tweak: name -> fitted BF16
    compensation: dict = field(default_factory=dict)                      # ... its omniq.json record

    def manifest(self, algorithms: dict[str, Algorithm]) -> dict:
        """omniq.json `weight_calibration`: algorithms with their parameters and layer counts, fallbacks."""
        used: dict[str, dict] = {}
        for algo in algorithms.values():
            entry = used.setdefault(algo.name, {"layers": 0, "parameters": []})
            entry["layers"] += 1
            params = {"name": algo.name} if isinstance(algo.as_dict(), str) else algo.as_dict()
            if params not in entry["parameters"]:
                entry["parameters"].append(params)
        out = {"implementation": "omniq.quant.weight_calibration (CPU, omniq's own arithmetic)",
               "algorithms": used, "fallback_to_mse": sorted(self.fallbacks),
               "seconds": round(self.seconds, 3), "statistics_peak_bytes": self.stats_bytes}
        if self.input_factors:
            out["activation_calibration"] = {"algorithm": "mse", "factors_tried": list(ACT_FACTORS),
                                             "input_scale_factor": dict(sorted(self.input_factors.items()))}
        if self.compensation:
            out["compensation"] = self.compensation
        return out


def _accumulate(into: dict, name: str, add: torch.Tensor) -> None:
    into[name] = into[name] + add if name in into else add


class _Recorder:
    """A `linear` hook that accumulates input statistics for the layers in `want` (name -> kind); `quantize`
    (name -> the engine's input quantization) for the `asymmetric` kind, whose linears then compute from the
    quantized input as the engine will. `record`: the names of `want` whose statistics are accumulated (default
    all; the others only transform their input as their kind does, so what they feed sees what it would);
    `skip`: name -> out_features of linears whose output nothing recorded depends on: zeros, without reading
    the weight or multiplying (the routed experts outside a chunk, `LayerByLayer.layer`)."""

    def __init__(self, weights, want: dict[str, str], quantize: dict | None = None, *,
                 record=None, skip: dict[str, int] | None = None):
        self.plain = forward.plain_linear(weights)
        self.want, self.quantize = want, quantize or {}
        self.record = set(want if record is None else record)
        self.skip = skip or {}
        self.stats: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {name: 0 for name in self.record}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in self.skip:
            return x.new_zeros(*x.shape[:-1], self.skip[name])
        kind = self.want.get(name)
        if kind is not None:
            flat = x.reshape(-1, x.shape[-1]).float()
            keep = name in self.record
            add = None
            if keep:
                self.tokens[name] += flat.shape[0]
            if kind == "hessian":
                add = flat.T @ flat if keep else None
            elif kind == "asymmetric":
                xq = self.quantize[name](flat)
                if keep:
                    add = xq.T @ xq
                    _accumulate(self.cross, name, flat.T @ xq)
                x = xq.reshape(x.shape)
            elif keep:
                xb = weight_search._blocks(flat)                          # [n, nb, 16]
                add = torch.einsum("nbi,nbj->bij", xb, xb)
            if add is not None:
                _accumulate(self.stats, name, add)
        return self.plain(name, x)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.stats, self.cross) for t in d.values())


def _input_quantizer(fmt: str, input_scale: torch.Tensor):
    """The engine's quantization of a `fmt` linear's input with its input_scale."""
    scale = torch.as_tensor(input_scale, dtype=torch.float32).reshape(())
    return lambda x: formats.FORMATS[fmt].fake_quant_input(x, scale)


def _max_input_scales(arch: Arch, lins, formats_of: dict[str, str], weights, xs) -> dict[str, torch.Tensor]:
    """Max-calibrated input scales of one layer's quantized linears from the stream's inputs (routed experts
    of one projection share the largest amax, as ModelOpt exports them)."""
    amax: dict[str, float] = {}
    plain = forward.plain_linear(weights)

    def linear(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().amax()) if x.numel() else 0.0)
        return plain(name, x)

    layer = lins[0].layer
    with torch.inference_mode():
        for x in xs:
            forward.decoder_layer(arch, weights, layer, x, linear=linear)
    shared: dict[str, float] = {}
    for lin in lins:
        if lin.expert is not None:
            shared[lin.role] = max(shared.get(lin.role, 0.0), amax.get(lin.name, 0.0))
    out = {}
    for lin in lins:
        fmt = formats_of.get(lin.name, "bf16")
        a = shared[lin.role] if lin.expert is not None else amax.get(lin.name, 0.0)
        if fmt == "nvfp4":
            out[lin.name] = formats.nvfp4_global_scale(a)
        elif fmt == "fp8":
            out[lin.name] = formats.fp8_scale(a)
    return out


def search_input_scales(arch: Arch, lins, formats_of: dict[str, str], weights, xs,
                        scales: dict[str, torch.Tensor]) -> dict[str, float]:
    """activation_calibration mse: per quantized linear of one layer, the factor f in `ACT_FACTORS` for which
    input_scale = max's x f gives the least squared input error sum ||x - Q(x)||^2 over the calibration
    inputs (Q: the engine's input quantization of the linear's format). Routed experts of one projection share
    one factor (summed over their routed tokens), so their input scales stay equal as the engines load them.

    Why it can help NVFP4 though its block scales are dynamic: a block's E4M3 scale is rounded relative to
    input_scale, so the factor moves where the blocks' scales round (and f < 1 clips the largest blocks)."""
    qlins = {lin.name: lin for lin in lins if formats_of.get(lin.name, "bf16") != "bf16"}
    key = {n: (lin.role if lin.expert is not None else n) for n, lin in qlins.items()}
    errs: dict = {}
    plain = forward.plain_linear(weights)

    def linear(name, x):
        if name in qlins and x.numel():
            flat = x.reshape(-1, x.shape[-1]).float()
            fmt = formats.FORMATS[formats_of[name]]
            base = torch.as_tensor(scales[name], dtype=torch.float32).reshape(())
            e = torch.stack([(flat - fmt.fake_quant_input(flat, base * f)).double().square().sum()
                             for f in ACT_FACTORS])
            errs[key[name]] = errs[key[name]] + e if key[name] in errs else e
        return plain(name, x)

    with torch.inference_mode():
        for x in xs:
            forward.decoder_layer(arch, weights, lins[0].layer, x, linear=linear)
    best = {k: ACT_FACTORS[int(torch.argmin(e))] for k, e in errs.items()}     # argmin: the first of equals
    return {n: best.get(key[n], 1.0) for n in qlins}


def quantize_one(name: str, w: torch.Tensor, fmt: str, algo: Algorithm, ws2: torch.Tensor | None,
                 stat: torch.Tensor | None, tokens: int | None, cross: torch.Tensor | None = None) -> CalibratedWeight:
    """One linear's weight by its algorithm; `stat` is the summed statistic (`STATS`), `tokens` its count,
    `cross` gptaq's summed cross term."""
    wf = w.detach().float()
    name_used = algo.name
    if name_used in STATS and (stat is None or not tokens):
        name_used = "mse"
    if name_used == "gptaq":
        wf = gptq_mod.asymmetric_target(wf, stat / tokens, cross / tokens, algo.target_damping)
    if fmt == "nvfp4":
        ws2 = formats.nvfp4_global_scale(w.detach().float().abs().amax()) if ws2 is None else ws2
        if name_used in GPTQ_LIKE:
            r = gptq_mod.gptq(wf, stat / tokens, "nvfp4", weight_scale_2=ws2, damping=algo.damping,
                              block_size=algo.block_size, act_order=algo.act_order)
            return CalibratedWeight(name, fmt, name_used, r.values, r.weight_scale, ws2, tokens)
        hb = stat / tokens if name_used == "local-hessian" else None
        codes = weight_search.nvfp4_search_scales(wf, ws2, name_used, hb)
        return CalibratedWeight(name, fmt, name_used, wf, codes, ws2, tokens)
    if name_used in GPTQ_LIKE:
        r = gptq_mod.gptq(wf, stat / tokens, "fp8", damping=algo.damping, block_size=algo.block_size,
                          act_order=algo.act_order)
        return CalibratedWeight(name, fmt, name_used, r.values, r.weight_scale, None, tokens)
    if name_used == "four-over-six":
        raise ValueError("four-over-six applies to NVFP4 only")
    moment = torch.diagonal(stat, dim1=-2, dim2=-1).flatten()[: wf.shape[1]] / tokens if name_used == "local-hessian" else None
    return CalibratedWeight(name, fmt, name_used, wf, weight_search.fp8_search_scale(wf, name_used, moment),
                            None, tokens)


def _unneeded(lins, recorded: set[str], *, experts_only: bool = False) -> dict[str, int]:
    """The linears of one layer whose outputs no statistic in `recorded` depends on (name -> out_features,
    `_Recorder`'s `skip`): the layer's output is not used while statistics are gathered, and a routed expert's
    up projection feeds only its own down projection. `experts_only` (the forward that records the other
    linears): only routed experts are left out; else (a chunk's forward, its experts' inputs come from the
    layer's norm and router alone) every linear that is neither recorded nor an up feeding a recorded down."""
    ups = {lin.expert: lin.name for lin in lins if lin.role == "expert_up"}
    needed = set(recorded) | {ups[lin.expert] for lin in lins if lin.role == "expert_down" and lin.name in recorded}
    return {lin.name: lin.out_features for lin in lins
            if lin.name not in needed and (lin.expert is not None or not experts_only)}


def _expert_chunks(group: list, algo: Algorithm) -> list[list]:
    """The routed experts of one projection (same shape, format and algorithm) in chunks of
    `memory.gptq_expert_chunk` experts: each chunk's statistics are gathered by its own forward over the
    layer's calibration inputs, GPTQ runs on it as one batched call, and its statistics are freed before the
    next, so one chunk's are held at a time rather than the layer's (5.5 GB for gptq's 256 expert Hessians of
    a real-width MoE layer)."""
    n = memory.gptq_expert_chunk(group[0].in_features, group[0].out_features, algo.name, algo.act_order)
    return [group[k:k + n] for k in range(0, len(group), n)]


def _gptq_stack(lins, fmt: str, algo: Algorithm, source, rec: "_Recorder", global_scales) -> dict:
    """GPTQ (or gptaq) of same-shaped weights (a chunk of the routed experts of one projection) in one batched
    call; the statistics are taken out of `rec` as they are stacked, gptaq's float64 target solved one
    expert at a time."""
    W = torch.stack([source[f"{lin.name}.weight"].float() for lin in lins])
    H = torch.stack([rec.stats.pop(lin.name) / rec.tokens[lin.name] for lin in lins])
    ws2 = None
    if fmt == "nvfp4":
        ws2 = torch.stack([torch.as_tensor(global_scales[lin.name], dtype=torch.float32).reshape(())
                           if lin.name in global_scales else formats.nvfp4_global_scale(W[k].abs().amax())
                           for k, lin in enumerate(lins)])
    if algo.name == "gptaq":
        for k, lin in enumerate(lins):
            W[k] = gptq_mod.asymmetric_target(W[k], H[k], rec.cross.pop(lin.name) / rec.tokens[lin.name],
                                              algo.target_damping)
    r = gptq_mod.gptq(W, H, fmt, weight_scale_2=ws2, damping=algo.damping, block_size=algo.block_size,
                      act_order=algo.act_order)
    return {lin.name: CalibratedWeight(lin.name, fmt, algo.name, r.values[k], r.weight_scale[k],
                                       None if ws2 is None else r.weight_scale_2[k], rec.tokens[lin.name])
            for k, lin in enumerate(lins)}


class LayerWeights(Mapping):
    """One layer's tensors by hub name, made on access and never kept: `read(name)` for the names in `names`
    (the source, e.g. a shard reader), and `made` (name -> function) in place of some of them (quantized
    weights as the next layer will see them). At real width a MoE layer's float32 copies would be 5 GB
    (1.3 G parameters); made per access, one linear's is held at a time. The price: each forward over the
    calibration batches reads the layer's source again (the stream's `TensorReader` drops the page cache of
    what it read, so from disk: about five reads of the layer per calibrated layer, 2.5 GB each for a
    real-width MoE layer)."""

    def __init__(self, read: Callable[[str], torch.Tensor], names, made: dict | None = None):
        self.read, self.names, self.made = read, set(names), dict(made or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.made:
            return self.made[name]()
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


fake_quant = formats.fake_quant_weight   # max-calibrated weight as it will be exported (float32)


class LayerByLayer:
    """The weight calibration as one step per decoder layer, for a caller that holds one layer at a time (the
    layer-streamed quantize, `omniq.export.streamed.run`'s `layer_tensors_hook`; `calibrate_weights` for one
    that holds the whole model).

    Holds, between layers, only the float32 hidden states of the calibration rows entering the next layer
    (rows x seq_len x hidden, when some algorithm needs statistics) and the results; a layer's statistics
    (block Hessians, full Hessians per linear and per routed expert) live only while that layer is calibrated.
    `layer(i, weights, global_scales)` must be called for i = 0, 1, ... in order."""

    def __init__(self, arch: Arch, rows: torch.Tensor | None, formats_of: dict[str, str],
                 algorithms: dict[str, Algorithm], embedding: torch.Tensor | None = None, *,
                 keep_weights: bool = True, activation: str = "max", compensation: Compensation = NO_COMPENSATION):
        """`embedding`: the embedding matrix (read once, for the first layer's inputs; needed only when some
        algorithm needs statistics, see `needs_stats`). `keep_weights`: keep every layer's calibrated weights
        in `result.weights` (float32, the whole model's worth: `calibrate_weights`); the stream passes False
        and uses each layer's as it is returned. `activation`: the recipe's activation_calibration (max | mse:
        each quantized linear's input_scale searched, `search_input_scales`). `compensation`: the recipe's
        (norm-tweak: after its weights, each layer's BF16 norms are fitted, `omniq.quant.compensation`; the
        float reference's hidden states are then kept beside the quantized ones)."""
        self.arch, self.formats_of, self.keep_weights = arch, formats_of, keep_weights
        self.todo = {n: a for n, a in algorithms.items() if a.name != "max" and formats_of.get(n, "bf16") != "bf16"}
        self.result = WeightCalibration()
        self.activation = activation
        self.compensation = compensation
        self.compensate = compensation.name != "none"
        self.needs_stats = (any(a.name in STATS for a in self.todo.values()) or activation == "mse"
                            or self.compensate)
        self.act_aware = any(a.name in ACT_AWARE for a in self.todo.values())
        self.engine_inputs = self.act_aware or self.compensate     # the stream quantizes inputs as engines do
        self.next_layer = 0
        self.xs: list[torch.Tensor] = []
        self.xs_ref: list[torch.Tensor] = []        # compensation: the float reference's hidden states
        if self.needs_stats:
            if rows is None:
                raise ValueError("local-hessian and gptq need calibration token rows")
            if embedding is None:
                raise ValueError("local-hessian and gptq need the embedding matrix for the first layer's inputs")
            t0 = time.perf_counter()
            emb = embedding.float()
            self.xs = [F.embedding(rows[b:b + BATCH_ROWS], emb) for b in range(0, rows.shape[0], BATCH_ROWS)]
            if self.compensate:
                self.xs_ref = [x.clone() for x in self.xs]
            self.result.seconds += time.perf_counter() - t0
        self.by_layer: dict[int, list] = {}
        for lin in arch.linears:
            if lin.layer is not None:
                self.by_layer.setdefault(lin.layer, []).append(lin)

    def layer_tensor_names(self, i: int) -> list[str]:
        """The source tensors `layer(i, ...)` reads (all of decoder layer i's, hub names)."""
        prefix = f"{self.arch.layer_prefix(i)}."
        return [t.name for t in self.arch.tensors if t.name.startswith(prefix)]

    def layer(self, i: int, weights: Mapping[str, torch.Tensor], global_scales: dict[str, torch.Tensor],
              input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, CalibratedWeight]:
        """Calibrate decoder layer `i` from its source tensors `weights` (hub names, as stored; a mapping that
        reads on access, `LayerWeights`, keeps memory to one tensor) and its
        linears' NVFP4 global scales as exported (module name -> weight_scale_2) and, for gptaq, their input
        scales as exported (module name -> input_scale; missing ones are max-calibrated here); returns the
        layer's calibrated weights (also kept in `result` with `keep_weights`) and moves the hidden states
        past the layer."""
        if i != self.next_layer:
            raise ValueError(f"weight calibration expects layer {self.next_layer}, got {i}")
        self.next_layer += 1
        t0 = time.perf_counter()
        todo, result, formats_of = self.todo, self.result, self.formats_of
        lins = self.by_layer.get(i, [])
        want = {lin.name: STATS[todo[lin.name].name] for lin in lins
                if lin.name in todo and todo[lin.name].name in STATS}
        current = weights
        quantize = {}
        if self.engine_inputs or self.activation == "mse":
            scales = dict(input_scales or {})
            missing = [lin for lin in lins if formats_of.get(lin.name, "bf16") != "bf16" and lin.name not in scales]
            if missing:
                scales.update({n: s for n, s in _max_input_scales(self.arch, lins, formats_of, current,
                                                                  self.xs).items() if n not in scales})
            if self.activation == "mse" and lins:
                factors = search_input_scales(self.arch, lins, formats_of, current, self.xs, scales)
                for n, f in factors.items():
                    scales[n] = torch.as_tensor(scales[n], dtype=torch.float32).reshape(()) * f
                    result.input_scales[n], result.input_factors[n] = scales[n], f
        if self.engine_inputs:    # the engine's input quantization of every quantized linear of the layer
            quantize = {lin.name: _input_quantizer(formats_of[lin.name], scales[lin.name]) for lin in lins
                        if formats_of.get(lin.name, "bf16") != "bf16"}
        # Routed experts under gptq / gptaq: statistics chunk by chunk of experts (`_expert_chunks`); the first
        # forward gathers every other linear's and counts the routed tokens.
        chunked = {lin.name for lin in lins if lin.expert is not None and lin.name in want
                   and todo[lin.name].name in GPTQ_LIKE}
        first = set(want) - chunked
        rec = _Recorder(current, want, quantize, record=first, skip=_unneeded(lins, first, experts_only=True))
        routes: dict = {}
        if want:
            with torch.inference_mode():
                for x in self.xs:
                    forward.decoder_layer(self.arch, current, i, x, linear=rec, route_stats=routes)
            result.stats_bytes = max(result.stats_bytes, rec.nbytes())
        routed = routes[i].tolist() if i in routes else []
        done: dict[str, CalibratedWeight] = {}
        stacks: dict[tuple, list] = {}          # routed experts under gptq: batched calls per projection
        for lin in lins:
            if lin.name not in todo:
                continue
            algo = todo[lin.name]
            tokens = routed[lin.expert] if lin.name in chunked else rec.tokens.get(lin.name)
            if algo.name in STATS and lin.expert is not None and (tokens or 0) < algo.min_tokens:
                result.fallbacks.append(lin.name)
                algo = Algorithm("mse")
            if algo.name in GPTQ_LIKE and lin.expert is not None:
                stacks.setdefault((lin.role, formats_of[lin.name], algo), []).append(lin)
                continue
            done[lin.name] = self._kept(quantize_one(
                lin.name, weights[f"{lin.name}.weight"], formats_of[lin.name], algo, global_scales.get(lin.name),
                rec.stats.pop(lin.name, None), tokens, rec.cross.pop(lin.name, None)))
        del rec
        for (_, fmt, algo), group in stacks.items():
            for chunk in _expert_chunks(group, algo):
                names = {lin.name for lin in chunk}
                crec = _Recorder(current, want, quantize, record=names, skip=_unneeded(lins, names))
                with torch.inference_mode():
                    for x in self.xs:
                        forward.decoder_layer(self.arch, current, i, x, linear=crec)
                result.stats_bytes = max(result.stats_bytes, crec.nbytes())
                for name, cw in _gptq_stack(chunk, fmt, algo, weights, crec, global_scales).items():
                    done[name] = self._kept(cw)
                del crec
                give_back()      # the chunk's freed temporaries: glibc keeps them between the packed results
        if self.keep_weights:
            result.weights.update(done)
        if self.needs_stats:
            made = {}
            for lin in lins:
                fmt = formats_of.get(lin.name, "bf16")
                if lin.name in done:
                    made[f"{lin.name}.weight"] = done[lin.name].dequantized
                elif fmt != "bf16":
                    made[f"{lin.name}.weight"] = (lambda n=lin.name, f=fmt: fake_quant(
                        weights[f"{n}.weight"], f, global_scales.get(n)))
            current = LayerWeights(weights.__getitem__, weights.keys(), made)
            if self.compensate:
                current = self._compensate(i, weights, current, quantize)
            with torch.inference_mode():
                plain = forward.plain_linear(current)
                if quantize:
                    def linear(name, x):
                        return plain(name, quantize[name](x) if name in quantize else x)
                else:
                    linear = plain
                self.xs = [forward.decoder_layer(self.arch, current, i, x, linear=linear) for x in self.xs]
        result.seconds += time.perf_counter() - t0
        return done

    def _kept(self, cw: CalibratedWeight) -> CalibratedWeight:
        """A calibrated weight as this run keeps it: float32 values with `keep_weights`, else packed."""
        return cw if self.keep_weights else cw.compact()

    def _compensate(self, i: int, source, current: "LayerWeights", quantize: dict) -> "LayerWeights":
        """norm-tweak of layer i: its BF16 tensors of the recipe's kinds fitted so that the layer as the
        engine runs it (`current`: the calibrated / max weights; `quantize`: its inputs' quantization) on the
        quantized stream's hidden states gives the source layer's outputs on the reference stream's; moves
        the reference stream past the layer; returns `current` with the fitted tensors in place."""
        from omniq.quant import compensation as comp

        c = self.compensation
        t0 = time.perf_counter()
        with torch.no_grad():           # (not inference mode: autograd saves these for the fit's backward)
            targets = [forward.decoder_layer(self.arch, source, i, x.clone()) for x in self.xs_ref]
            xs = [x.clone() for x in self.xs]
        names = comp.tweakable(self.arch, i, c.params)
        view = comp.layer_view(current)                  # one layer's float32 tensors while it is fitted
        fitted, rec = comp.fit_layer(self.arch, i, view, xs, targets, quantize, names, c.steps, c.lr)
        del xs
        del view
        self.xs_ref = targets
        self.result.compensated.update(fitted)
        record = self.result.compensation or {"name": c.name, "steps": c.steps, "lr": c.lr,
                                               "params": list(c.params), "seconds": 0.0, "layers": []}
        record["layers"].append({"layer": i, "tensors": len(fitted), "loss_before": rec.loss_before,
                                 "loss_after": rec.loss_after, "kept": rec.kept})
        record["seconds"] = round(record["seconds"] + time.perf_counter() - t0, 3)
        self.result.compensation = record
        made = dict(current.made, **{n: (lambda t=t: t.float()) for n, t in fitted.items()})
        return LayerWeights(current.read, current.names, made)

    def exported_layer(self, read) -> "Callable[[int, dict], dict]":
        """The layer-streamed quantize's `layer_tensors_hook`: given layer i's exported tensors (hub names ->
        packed weights and scales, as ModelOpt wrote them), calibrate the layer from its source tensors
        (`read(name)`, e.g. a `TensorReader.get`) and the exported global scales, and return the tensors with
        the calibrated layers' weight and weight_scale in place of ModelOpt's (same names, dtypes, shapes)."""
        suffix, in_suffix = ".weight_scale_2", ".input_scale"

        def hook(i: int, tensors: dict) -> dict:
            if not any(lin.name in self.todo for lin in self.by_layer.get(i, [])) and not self.needs_stats:
                self.next_layer += 1
                return tensors
            weights = LayerWeights(read, self.layer_tensor_names(i))
            scales = {n[: -len(suffix)]: t for n, t in tensors.items() if n.endswith(suffix)}
            inputs = {n[: -len(in_suffix)]: t for n, t in tensors.items() if n.endswith(in_suffix)}
            for lin in self.by_layer.get(i, []):          # ModelOpt's weights of what is calibrated: replaced
                if lin.name in self.todo:                 # below, freed now (the writer places tensors by name)
                    tensors.pop(f"{lin.name}.weight", None)
                    tensors.pop(f"{lin.name}.weight_scale", None)
            for cw in self.layer(i, weights, scales, inputs).values():
                tensors.update(cw.tensors())
            for n in self.result.input_scales.keys() & inputs.keys():       # activation mse: this layer's
                tensors[f"{n}{in_suffix}"] = self.result.input_scales[n].reshape(inputs[n].shape).to(inputs[n].dtype)
            prefix = f"{self.arch.layer_prefix(i)}."
            for n, t in self.result.compensated.items():                   # norm-tweak: this layer's
                if n.startswith(prefix):
                    if n not in tensors:
                        raise ValueError(f"compensation fitted {n}, which the export does not write")
                    tensors[n] = t.to(tensors[n].dtype)
            return tensors
        return hook


def calibrate_weights(arch: Arch, source: dict[str, torch.Tensor], rows: torch.Tensor | None,
                      formats_of: dict[str, str], algorithms: dict[str, Algorithm],
                      global_scales: dict[str, torch.Tensor] | None = None,
                      progress=None, input_scales: dict[str, torch.Tensor] | None = None) -> WeightCalibration:
    """Weights of every linear whose algorithm is not max, layer by layer (`LayerByLayer` over a model held
    whole: `omniq search`).

    `source`: every tensor of the language model (hub names), float32 or bf16; `rows`: calibration token ids
    (samples, seq_len); `formats_of` / `algorithms`: per linear (the plan's); `global_scales`: NVFP4
    weight_scale_2 per linear as exported (fused layers share one), else amax / (6 * 448); `input_scales`
    (gptaq): input_scale per linear as exported, else max-calibrated from the stream's inputs."""
    global_scales = global_scales or {}
    cal = LayerByLayer(arch, rows, formats_of, algorithms, source.get(arch.embedding_weight))
    for i in range(arch.num_layers):
        cal.layer(i, {n: source[n] for n in cal.layer_tensor_names(i)}, global_scales, input_scales)
        if progress:
            progress("weights", i + 1, arch.num_layers)
    return cal.result
