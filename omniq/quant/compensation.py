"""Compensation of a quantized layer's error in the parameters that stay BF16 ("norm tweaking").

An NVFP4 artifact keeps some of each decoder layer's parameters in high precision: the pre-mixer RMSNorm
weight, and in a Mamba layer the gated RMSNorm weight before out_proj, D, dt_bias, A_log and the conv1d.
Weight calibration (gptq, gptaq, ...) can only lower the error of the quantized weights; the W4A4 activation
quantization (Mamba in_proj / out_proj inputs above all, `benchmarks/nvfp4_error_split.py`) stays. Here,
layer by layer in calibration order, those BF16 parameters are fitted so that the quantized layer, run as
the engine runs it (weights as packed, every quantized linear's input fake-quantized with its exported
input_scale; straight-through estimator for the rounding), fed the *quantized* model's hidden states,
reproduces the float reference layer's output on the *reference* hidden states (mean squared error over the
calibration rows, Adam). The artifact's format is unchanged: the fitted values are stored in BF16 where the
originals were. The idea is Norm Tweaking (Li et al. 2024) / block reconstruction (BRECQ) restricted to
the parameters the format keeps in BF16; neither ModelOpt nor transformers offers it (ModelOpt's
calibration never changes unquantized parameters), hence omniq's own.

Only calibration rows are seen (never an evaluation set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F

from omniq.model import forward
from omniq.model.arch import MAMBA, Arch

# parameter kinds -> the tensor (relative to `backbone.layers.{i}.`) each names; a kind absent from a layer
# (a Mamba kind on an attention layer) is skipped
KINDS = {
    "norm": ("norm.weight",),                          # the pre-mixer RMSNorm (every layer)
    "mixer-norm": ("mixer.norm.weight",),              # Mamba's gated RMSNorm before out_proj
    "D": ("mixer.D",),
    "dt_bias": ("mixer.dt_bias",),
    "A_log": ("mixer.A_log",),
    "conv": ("mixer.conv1d.weight", "mixer.conv1d.bias"),
}
BATCH_ROWS = 8


@dataclass
class LayerFit:
    layer: int
    names: list[str]
    loss_before: float
    loss_after: float
    kept: bool                               # False: the fit did not lower the loss; the originals stay


@dataclass
class CompensationResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> new BF16 value
    fits: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0


def tweakable(arch: Arch, i: int, kinds) -> list[str]:
    """Layer i's tensors of the parameter `kinds` that exist in it (hub names)."""
    lp = arch.layer_prefix(i)
    known = arch.tensor_by_name
    out = []
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown compensation parameter kind {k!r}")
        if k not in ("norm",) and arch.kinds[i] != MAMBA:
            continue
        out += [f"{lp}.{s}" for s in KINDS[k] if f"{lp}.{s}" in known]
    return out


class STELinear:
    """A `linear` hook: each input quantized by `quantizers[name]` (the engine's input quantization) with a
    straight-through gradient, then the GEMM with the layer's weight as given (the dequantized packed one)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], quantizers: dict[str, Callable]):
        self.weights, self.quantizers = weights, quantizers

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizers.get(name)
        if q is not None:
            xd = x.detach()
            x = x + (q(xd) - xd)
        bias = self.weights.get(f"{name}.bias")
        return F.linear(x, self.weights[f"{name}.weight"], bias)


def _loss(arch, i, weights, params: Callable[[], dict], xs, targets, quantizers, grad: bool) -> float:
    """Mean squared error of the layer over all batches (`params()`: the fitted tensors, made per batch so
    each batch's graph is its own); with `grad`, the gradients accumulated."""
    total, n = 0.0, sum(t.numel() for t in targets)
    for x, t in zip(xs, targets):
        with torch.set_grad_enabled(grad):
            view = _Overlay(weights, params())
            hook = STELinear(view, quantizers)
            out = forward.decoder_layer(arch, view, i, x, linear=hook)
            loss = (out - t).square().sum() / n
            if grad:
                loss.backward()
        total += float(loss.detach())
    return total


class _Overlay(Mapping):
    """`weights` with some tensors replaced by `params`' (the ones being fitted)."""

    def __init__(self, weights, params):
        self.weights, self.params = weights, params

    def __getitem__(self, name):
        return self.params[name] if name in self.params else self.weights[name]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def _offsets(weights: Mapping[str, torch.Tensor], names: list[str]):
    """The fitted parametrisation of `names`: each tensor as base + scale * delta, delta the Adam variable
    (scale: the tensor's mean magnitude, so one learning rate suits norms and biases alike). Returns
    (delta, params); `params(rounded=True)` gives the values rounded to BF16 (as float32), detached."""
    base = {n: weights[n].detach().float() for n in names}
    scale = {n: base[n].abs().mean().clamp(min=1e-3) for n in names}
    delta = {n: torch.zeros_like(base[n], requires_grad=True) for n in names}

    def params(rounded: bool = False):
        out = {n: base[n] + scale[n] * delta[n] for n in names}
        return {n: v.detach().to(torch.bfloat16).float() for n, v in out.items()} if rounded else out

    return delta, params


def _fit(weights, names: list[str], loss: Callable[[Callable, bool], float], steps: int, lr: float, log=None):
    """Adam on `names` against `loss(make_params, grad)`; returns the fitted tensors in BF16 (empty when the
    loss did not drop), the loss before and the loss kept."""
    delta, params = _offsets(weights, names)
    before = loss(dict, False)
    fitted = _adam(delta, lambda: loss(params, True), params, steps, lr, log)
    after = loss(lambda: fitted, False)
    kept = after < before
    out = {n: v.to(torch.bfloat16) for n, v in fitted.items()} if kept else {}
    return out, before, after if kept else before, kept


def layer_view(weights: Mapping[str, torch.Tensor], trim_every: int = 8) -> dict[str, torch.Tensor]:
    """Every tensor of `weights` (one layer's, made on access: `weight_calibration.LayerWeights`) made once and
    kept for the fit. Made tensors are fresh (a shard read, a fake-quantized weight) and kept as they are;
    only inference tensors are cloned (autograd cannot save them). Every `trim_every` tensors the heap's free
    pages go back to the OS (`omniq.heap.give_back`): each fake-quantized weight's temporaries are freed
    between the kept 20 MB tensors and glibc kept them (a real-width MoE layer's 4.83 GiB view took 6.69 GiB,
    benchmarks/compensation_memory.py)."""
    from omniq.heap import give_back

    give_back()                          # (the reference layer's temporaries, freed just before)
    out = {}
    for k, n in enumerate(weights):
        t = weights[n]
        out[n] = t.clone() if t.is_inference() else t
        if k % trim_every == trim_every - 1:
            give_back()
    give_back()
    return out


def fit_layer(arch: Arch, i: int, weights: Mapping[str, torch.Tensor], xs: list[torch.Tensor],
              targets: list[torch.Tensor], quantizers: dict[str, Callable], names: list[str],
              steps: int, lr: float) -> tuple[dict[str, torch.Tensor], LayerFit]:
    """Fit layer i's tensors `names` (BF16 in the artifact) so that the quantized layer (`weights`: its
    tensors as the engine will see them, float32; `quantizers`: its linears' input quantization) on the
    quantized model's inputs `xs` gives the reference outputs `targets`. Returns the fitted tensors rounded
    to BF16 (empty when the fit did not lower the loss) and the record."""
    out, before, after, kept = _fit(
        weights, names, lambda make, grad: _loss(arch, i, weights, make, xs, targets, quantizers, grad),
        steps, lr)
    return out, LayerFit(i, list(names), before, after, kept)


def _adam(delta: dict, step_loss: Callable[[], float], params: Callable, steps: int, lr: float, log=None) -> dict:
    """Adam on `delta` with a cosine-decayed learning rate; `step_loss()` accumulates the gradients and
    returns the loss at the current values. Returns the BF16-rounded values (float32) of the step with the
    lowest loss seen (the last step's loss is measured once more at the end)."""
    opt = torch.optim.Adam(list(delta.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best, best_loss = params(rounded=True), float("inf")
    for step in range(steps + 1):
        opt.zero_grad()
        cur = step_loss()
        if cur < best_loss:
            best, best_loss = params(rounded=True), cur
        if log is not None and (step % 20 == 0 or step == steps):
            log(f"  step {step}: loss {cur:.4e}")
        if step < steps:
            opt.step()
            sched.step()
    return best


def kl_loss(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(ref || cand) over the tokens of one batch (`ref_logp`: the reference's log-softmax)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def _model_kl(arch: Arch, weights: Mapping[str, torch.Tensor], rows: list[torch.Tensor],
              ref_logp: list[torch.Tensor], quantizers: dict[str, Callable], make: Callable[[], dict],
              grad: bool) -> float:
    """Mean KL per token of the whole quantized model (`weights` overlaid with `make()`, made per batch so
    each batch's graph is its own; inputs fake-quantized by `quantizers` with a straight-through gradient)
    against the reference's `ref_logp` over the calibration `rows`; with `grad`, the gradients accumulated."""
    tokens = sum(r.numel() for r in rows)
    total = 0.0
    for x, lp in zip(rows, ref_logp):
        with torch.set_grad_enabled(grad):
            view = _Overlay(weights, make())
            kl = kl_loss(lp, forward.logits(arch, view, x, linear=STELinear(view, quantizers))) / tokens
            if grad:
                kl.backward()
        total += float(kl.detach())
    return total


def fit_model(arch: Arch, weights: Mapping[str, torch.Tensor], rows: list[torch.Tensor],
              ref_logp: list[torch.Tensor], quantizers: dict[str, Callable], names: list[str],
              steps: int, lr: float, log=None) -> tuple[dict[str, torch.Tensor], LayerFit]:
    """End-to-end: fit `names` (BF16 tensors of any layers, the final norm too) jointly so that the whole
    quantized model (`weights` as the engine sees them, inputs fake-quantized with a straight-through
    gradient) on the calibration `rows` gives the reference's next-token distributions (`ref_logp`, mean KL
    per token). Returns the fitted tensors in BF16 (empty when the KL did not drop) and the record."""
    out, before, after, kept = _fit(
        weights, names, lambda make, grad: _model_kl(arch, weights, rows, ref_logp, quantizers, make, grad),
        steps, lr, log)
    return out, LayerFit(-1, list(names), before, after, kept)


@dataclass
class DistillResult:
    latent: dict[str, torch.Tensor]          # `{module}.weight` -> fitted float32 weight, before quantization
    norms: dict[str, torch.Tensor]           # fitted BF16 tensors (`norm_names`)
    fit: LayerFit
    steps_run: int
    best_step: int
    seconds_per_step: float


def distill_weights(arch: Arch, weights: Mapping[str, torch.Tensor], quantized: Mapping[str, tuple],
                    rows: list[torch.Tensor], ref_logp: list[torch.Tensor], quantizers: dict[str, Callable],
                    steps: int, lr: float, norm_names: list[str] = (), log=None) -> DistillResult:
    """Quantization-aware distillation: the float32 weights of the `quantized` linears (module -> (format,
    weight_scale_2 as exported or None[, NVFP4 block scales kept fixed])), starting from `weights` (the BF16
    source's values, or an artifact's dequantized ones with its block scales), and optionally
    the BF16 tensors `norm_names`, fitted jointly by Adam on the whole model's KL to the reference's
    next-token distributions (`ref_logp`) over the calibration `rows`. Every step each weight is what max
    calibration exports from it (`formats.fake_quant_weight`: amax/6 block scales in FP8, the per-tensor
    global scale; with fixed block scales, its values rounded under those, `weight_search.nvfp4_pack`) with
    a straight-through gradient to the float weight, and each linear's input is quantized
    as the engine does (`quantizers`, `STELinear`). Parametrised as base + scale * delta (scale: the tensor's
    mean magnitude), so `lr` is relative. The step with the lowest calibration KL is kept; the weights are
    returned in float32 (to be quantized the normal way), the norms rounded to BF16."""
    import time

    from omniq.quant import formats, weight_search

    fake_quant = formats.fake_quant_weight

    def quantize(v: torch.Tensor, fmt: str, ws2=None, block_scales=None) -> torch.Tensor:
        if block_scales is None:
            return fake_quant(v, fmt, ws2)
        return weight_search.nvfp4_pack(v, block_scales, ws2).dequantize(v.shape[-1])

    wnames = [f"{m}.weight" for m in quantized]
    fmt_of = {f"{m}.weight": quantized[m] for m in quantized}
    names = wnames + list(norm_names)
    base = {n: weights[n].detach().float() for n in names}
    scale = {n: base[n].abs().mean().clamp(min=1e-12 if n in fmt_of else 1e-3) for n in names}
    delta = {n: torch.zeros_like(base[n], requires_grad=True) for n in names}

    def current() -> dict:
        return {n: base[n] + scale[n] * delta[n] for n in names}

    def exported(values: dict) -> dict:
        """What the engine runs from `values`: each weight as max exports it, norms rounded to BF16."""
        with torch.no_grad():
            return {n: quantize(v.detach(), *fmt_of[n]) if n in fmt_of else v.detach().to(torch.bfloat16).float()
                    for n, v in values.items()}

    def step_loss(grad: bool) -> float:
        with torch.no_grad():
            q = exported(current())

        def make():
            v = current()
            return {n: v[n] + (q[n] - v[n]).detach() if n in fmt_of else v[n] for n in names}

        return _model_kl(arch, weights, rows, ref_logp, quantizers, make, grad)

    def snapshot() -> dict:
        with torch.no_grad():
            return {n: v.detach().clone() for n, v in current().items()}

    before = _model_kl(arch, weights, rows, ref_logp, quantizers, lambda: exported(base), False)
    opt = torch.optim.Adam(list(delta.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best, best_loss, best_step = snapshot(), float("inf"), 0
    t0 = time.perf_counter()
    for step in range(steps + 1):
        opt.zero_grad()
        cur = step_loss(True)
        if cur < best_loss:
            best, best_loss, best_step = snapshot(), cur, step
        if log is not None and (step % 10 == 0 or step == steps):
            log(f"  step {step}: calibration KL {cur:.4e} ({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
        if step < steps:
            opt.step()
            sched.step()
    per_step = (time.perf_counter() - t0) / (steps + 1)
    after = _model_kl(arch, weights, rows, ref_logp, quantizers, lambda: exported(best), False)
    kept = after < before
    if not kept:
        best, after = {n: base[n] for n in names}, before
    latent = {n: best[n] for n in wnames}
    norms = {n: best[n].to(torch.bfloat16) for n in norm_names} if kept else {}
    return DistillResult(latent, norms, LayerFit(-1, names, before, after, kept), steps, best_step, per_step)
