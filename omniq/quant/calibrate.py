"""What calibrating with ModelOpt on transformers' native NemotronH needs, numerically right on CPU, isolated.

The model itself is built and filled layer by layer by `omniq.export.streamed` (transformers' own
`NemotronHForCausalLM` on the meta device, in bf16, the checkpoint's `auto_map` code never imported or run;
the router weight kept in fp32 as NVIDIA stores it). This module holds what that run uses around ModelOpt:
the Mamba forward, the isolation of ModelOpt's global patches, the check that exactly the plan's quantizers
calibrated, and the loading constants quantize records.

Numerics. transformers' CPU Mamba-2 path (`torch_forward`) is wrong past `chunk_size` and clamps `dt` at
`time_step_min`. `patch_mamba_mixers` replaces `forward` on every mixer instance with one that calls
`self.in_proj` (so ModelOpt's quantizers on it still see the activations), `omniq.model.mamba2.mixer_scan`
with the module's own parameters and `time_step_limit` (like the CUDA kernels), then `self.out_proj`. It runs
only without a cache and without padding, which is how calibration calls it (`use_cache=False`, packed rows).
The same patch is used on CUDA, so calibration numerics do not depend on whether `mamba-ssm` is installed.
Routed experts: transformers may run `NemotronHExperts` through `torch._grouped_mm`, which ModelOpt's
fused-experts quantizers cannot see; ModelOpt switches the model to the eager per-expert loop
(`config._experts_implementation = "eager"`) when it wraps them, and `check_calibrated` proves every
expert input quantizer received data.

Isolation. ModelOpt patches `torch.nn.functional.linear` (fused experts), `torch.matmul` and
`torch.nn.functional.softmax` (attention) with `replace_function`, which has no try/finally: an exception
inside a quantized forward leaves the patch in place for the rest of the process. `modelopt_isolation`
snapshots the functions of `torch`, `torch.nn.functional`, `torch.Tensor` and `torch._VF` and puts back any
that changed (and drops the `_name` originals ModelOpt stashes), whether quantization succeeded or not.

NVFP4 on CPU: max calibration only collects statistics (fake quantization is off while calibrating), so it
runs without CUDA; nothing here runs the NVFP4 fake-quant model afterwards (ModelOpt's kernels need CUDA).
"""

from __future__ import annotations

import contextlib
import types

from omniq.errors import OmniqError
from omniq.model import names
from omniq.model.checkpoint import Checkpoint

LOAD_DTYPE = "bfloat16"       # the dtype the skeleton computes in (the checkpoint's own; what ModelOpt's GPU flow uses)
BATCH_SIZE = 4                # calibration rows per forward


def hub_name_of(native: str, ckpt: Checkpoint, expert: int | None = None) -> str:
    """transformers' parameter name -> the checkpoint's tensor name (for messages)."""
    return names.hub_from_native(native, ckpt.arch.prefix, expert)


# ----- a right Mamba-2 forward for calibration -----------------------------------------------------------
def _calibration_mixer_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    from omniq.model.mamba2 import mixer_scan

    if cache_params is not None:
        raise RuntimeError("omniq's calibration Mamba mixer runs without a cache: call the model with use_cache=False")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise RuntimeError("omniq's calibration Mamba mixer does not take padded batches; pack the rows instead")
    zxbcdt = self.in_proj(hidden_states)
    y = mixer_scan(zxbcdt, self.conv1d.weight, self.conv1d.bias, self.A_log, self.D, self.dt_bias, self.norm.weight,
                   num_heads=self.num_heads, head_dim=self.head_dim, n_groups=self.n_groups,
                   state_size=self.ssm_state_size, chunk_size=self.chunk_size, eps=self.norm.variance_epsilon,
                   dt_limit=tuple(float(v) for v in self.time_step_limit))
    return self.out_proj(y.to(hidden_states.dtype))


def patch_mamba_mixers(model) -> int:
    """Give every Mamba-2 mixer of a transformers NemotronH the right CPU forward; returns how many."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    n = 0
    for block in model.model.layers:
        if isinstance(block.mixer, NemotronHMamba2Mixer):
            block.mixer.forward = types.MethodType(_calibration_mixer_forward, block.mixer)
            n += 1
    return n


# ----- isolation of ModelOpt's global patches ------------------------------------------------------------
def _patch_targets():
    import torch

    return [torch, torch.nn.functional, torch.Tensor, torch._VF]


@contextlib.contextmanager
def modelopt_isolation(restored: list[str] | None = None):
    """Undo whatever ModelOpt left patched on torch's function namespaces, on success or failure.

    Names of the functions put back are appended to `restored` (normally none after a clean run)."""
    targets = _patch_targets()
    snapshots = [(mod, dict(vars(mod))) for mod in targets]
    try:
        yield
    finally:
        for mod, before in snapshots:
            now = dict(vars(mod))
            label = getattr(mod, "__name__", type(mod).__name__)
            for name, value in before.items():
                if callable(value) and now.get(name, value) is not value:
                    setattr(mod, name, value)
                    if restored is not None:
                        restored.append(f"{label}.{name}")
            for name in set(now) - set(before):
                if name.startswith("_") and name[1:] in before:   # replace_function's stash of the original
                    with contextlib.suppress(AttributeError, TypeError):
                        delattr(mod, name)


@contextlib.contextmanager
def weights_calibrated_once(model):
    """Inside ModelOpt's max-calibration forward loop: weight quantizers that already hold an amax do not
    collect again (restored on exit, so `finish_stats_collection` sees them as ModelOpt left them).

    Why: nvidia-modelopt 0.47's `max_calibrate` first runs `weight_only_quantize` (every weight quantizer's
    MaxCalibrator collects max |W| of its module's weight: `iter_weights_for_calibration`, per expert for
    transformers' fused experts), then the forward loop, in which every weight quantizer collects the same
    weight again on every call (`TensorQuantizer.forward`: `collect` whenever calibrating) and keeps
    max(old, new), i.e. the same value. On a real-width MoE layer that is a max and a min over 2.55 GB of
    BF16 per calibration batch and per forced expert pass (about a third of the layer's calibration time at
    16 x 128 tokens, measured with benchmarks/calibration_profile.py). ModelOpt has no switch for it, so
    omniq turns calibration off for exactly those quantizers (`_if_calib`, ModelOpt's own flag, restored
    with `enable_calib`) while the loop runs; a quantizer without an amax yet (one the weight-only pass did
    not reach) keeps collecting. The amaxes are identical either way: tests/quant/test_calibrate.py, and the
    artifact goldens of tests/export/test_quantize_streamed.py."""
    from modelopt.torch.quantization.calib.max import MaxCalibrator
    from modelopt.torch.quantization.nn import QuantModule

    frozen = []
    for module in model.modules():
        if not isinstance(module, QuantModule):
            continue
        for _weight, q in module.iter_weights_for_calibration():
            cal = getattr(q, "_calibrator", None)
            if (type(cal) is MaxCalibrator and q._if_calib and not getattr(q, "_disabled", False)
                    and not getattr(q, "_dynamic", False)
                    and cal._calib_amax is not None):
                q.disable_calib()
                frozen.append(q)
    try:
        yield frozen
    finally:
        for q in frozen:
            q.enable_calib()


def check_calibrated(model, enabled: dict[str, str]) -> None:
    """Exactly the plan's quantizers are enabled, and each has a finite positive amax (no silent skips)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    on = {name for name, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    missing = sorted(set(enabled) - on)
    extra = sorted(on - set(enabled))
    if missing:
        raise RuntimeError(f"ModelOpt did not enable {len(missing)} planned quantizers, e.g. {missing[0]}")
    if extra:
        raise RuntimeError(f"ModelOpt enabled {len(extra)} quantizers outside the plan, e.g. {extra[0]}")
    modules = dict(model.named_modules())
    for name in enabled:
        amax = getattr(modules[name], "amax", None)
        if amax is None:
            raise OmniqError(f"quantizer {name} got no calibration statistics; the calibration data never "
                             "reached it (more or longer --calib-samples may help)", exit_code=1)
        values = amax.detach().float().flatten()
        if not bool(values.isfinite().all()) or not bool((values > 0).all()):
            raise OmniqError(f"quantizer {name} calibrated to amax {values.tolist()[:4]}; a scale must be finite "
                             "and positive (check the weights and the calibration data)", exit_code=1)
