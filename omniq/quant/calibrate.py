"""Calibration with ModelOpt on transformers' native NemotronH, numerically right on CPU, isolated.

Loading. `NemotronHForCausalLM.from_pretrained` (transformers' own class: the checkpoint's `auto_map` code is
never imported or run), `use_mamba_kernels=False`, in **bfloat16**: the checkpoint's own dtype, what
ModelOpt's GPU flow calibrates in, and half the memory of fp32 (the 30B model fits in about 63 GB). The
router weight is the one tensor NVIDIA stores in fp32; transformers would round it to bf16, so it is put
back in fp32 from the checkpoint (the router computes in fp32 anyway), and export writes it as F32 again.
Every loaded tensor is checked for NaN / inf.

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
import io
import types
import warnings
from dataclasses import dataclass
from typing import Callable

from omniq.errors import OmniqError
from omniq.model.arch import MOE
from omniq.model.checkpoint import Checkpoint
from omniq.quiet import quiet

Progress = Callable[[str, int, int], None]   # (stage, done, total)
LOAD_DTYPE = "bfloat16"
BATCH_SIZE = 4


# ----- loading -----------------------------------------------------------------------------------------
def load_model(ckpt: Checkpoint, progress: Progress | None = None, device: str = "cpu"):
    """The checkpoint as transformers' `NemotronHForCausalLM` in bf16 (router fp32), checked for NaN / inf,
    on `device` (cpu, or cuda: then ModelOpt's CUDA kernels serve the export)."""
    import torch
    from transformers import NemotronHForCausalLM

    if progress:
        progress("load", 0, 2)
    try:  # quiet: an Omni checkpoint's tower tensors are "unexpected" here, by design
        with quiet(transformers=True, progress_bar=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = NemotronHForCausalLM.from_pretrained(
                str(ckpt.path), dtype=getattr(torch, LOAD_DTYPE), output_loading_info=True, **_llm_only(ckpt))
    except Exception as e:  # noqa: BLE001 - a checkpoint transformers cannot load is a user-fixable input
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"{ckpt.path}: transformers cannot load it as NemotronH ({type(e).__name__}: "
                         f"{first})") from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise OmniqError(f"{ckpt.path}: transformers found no weights for {missing[0]} "
                         f"({len(missing)} missing); config and weights do not match")
    model.eval()
    model.config.use_cache = False
    if progress:
        progress("load", 1, 2)
    check_finite(model, ckpt)
    restore_router_fp32(model, ckpt)
    if device != "cpu":
        model.to(device)
    if progress:
        progress("load", 2, 2)
    return model


def _llm_only(ckpt: Checkpoint) -> dict:
    """from_pretrained arguments: a plain NemotronH as is; of an Omni checkpoint only the language model,
    built from `llm_config` and read from the `language_model.*` tensors (the towers are never loaded: they
    are run by omniq's own functions for multimodal calibration and copied byte for byte at export)."""
    if not ckpt.is_omni:
        return {"use_mamba_kernels": False}
    from transformers import NemotronHConfig

    cfg = NemotronHConfig(**dict(ckpt.llm_config, use_mamba_kernels=False))
    return {"config": cfg, "key_mapping": {"^" + ckpt.arch.prefix.replace(".", r"\."): ""}}


def hub_name_of(native: str, ckpt: Checkpoint, expert: int | None = None) -> str:
    """transformers' parameter name -> the checkpoint's tensor name (for messages)."""
    name = native
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if name == "backbone.embeddings.weight" or name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    if expert is not None and name.endswith(("experts.up_proj", "experts.down_proj")):
        base, proj = name.rsplit(".", 1)
        name = f"{base}.{expert}.{proj}.weight"
    return ckpt.arch.prefix + name


def check_finite(model, ckpt: Checkpoint) -> None:
    """Refuse weights with NaN or inf (they would poison every scale computed from them)."""
    import torch

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        expert = None
        if t.dim() == 3:  # fused routed experts: name the first bad expert
            bad = (~torch.isfinite(t)).flatten(1).any(1)
            expert = int(bad.nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise OmniqError(f"{ckpt.path}: tensor {hub_name_of(name, ckpt, expert)} contains {kind} values; "
                         "fix or re-download the checkpoint")


def restore_router_fp32(model, ckpt: Checkpoint) -> None:
    """Put every router weight back in fp32, read from the checkpoint (transformers loads it in bf16)."""
    import torch

    arch = ckpt.arch
    names = {i: f"{arch.layer_prefix(i)}.mixer.gate.weight" for i in arch.layers_of(MOE)}
    if not names:
        return
    src = ckpt.read(names.values())
    for i, hub in names.items():
        gate = model.model.layers[i].mixer.gate
        gate.weight = torch.nn.Parameter(src[hub].to(torch.float32), requires_grad=False)


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


# ----- calibration --------------------------------------------------------------------------------------
@dataclass
class Calibration:
    model: object
    restored: list[str]          # torch functions ModelOpt left patched (put back)
    log: str                     # what ModelOpt printed


def calibrate(model, config: dict, rows, *, batch_size: int = BATCH_SIZE, progress: Progress | None = None,
              enabled: dict[str, str] | None = None, coverage=None) -> Calibration:
    """`mtq.quantize(model, config, loop)` over calibration rows (samples, seq_len), isolated.

    `enabled` (quantizer name -> format), when given, is checked against the quantized model afterwards:
    exactly those quantizers are on, each with a finite, positive amax. `coverage`
    (`omniq.calib.experts.ExpertCoverage`), when given, counts (and per its policy tops up) the tokens of every
    routed expert while ModelOpt calibrates."""
    import torch

    import modelopt.torch.quantization as mtq

    # rows: token rows (samples, seq_len), or a list of callables f(model) that each run one forward
    # (multimodal calibration: `omniq.calib.multimodal.forwards`, inputs_embeds one sample at a time)
    batches = list(rows) if isinstance(rows, list) else [rows[i:i + batch_size]
                                                         for i in range(0, rows.shape[0], batch_size)]
    total = len(batches)

    def forward_loop(m):
        if progress:
            progress("calibrate", 0, total)
        device = next(m.parameters()).device
        with torch.no_grad():
            for k, batch in enumerate(batches):
                if callable(batch):
                    batch(m)
                else:
                    m(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)
                if progress:
                    progress("calibrate", k + 1, total)

    restored: list[str] = []
    log = io.StringIO()
    counting = coverage.installed(model) if coverage is not None else contextlib.nullcontext()
    with modelopt_isolation(restored), contextlib.redirect_stdout(log), warnings.catch_warnings(), counting:
        warnings.simplefilter("ignore")
        mtq.quantize(model, config, forward_loop)
    if enabled is not None:
        check_calibrated(model, enabled)
    return Calibration(model=model, restored=restored, log=log.getvalue())


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
