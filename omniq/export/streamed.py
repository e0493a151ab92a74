"""Layer-streamed quantize: calibrate and export one decoder layer at a time, straight from the shards.

Memory is about one decoder layer (its BF16 tensors, ModelOpt's quantizer state, the packed result) plus the
calibration hidden states of every row (rows x seq_len x hidden in BF16), whatever the model's depth.
Nothing holds the whole model, nor a whole output shard.

How (the same numbers as a whole-model `mtq.quantize` + `export_hf_checkpoint`, byte for byte on the bundled
models: tests/export/test_quantize_streamed.py against tests/data/golden/quantize_tiny.json):
1. `Skeleton`: transformers' own `NemotronHForCausalLM` built on the `meta` device (no storage) from the
   checkpoint's config, in bf16, with omniq's Mamba forward (`calibrate.patch_mamba_mixers`). Its module tree
   gives ModelOpt the module names and classes it knows; a layer's parameters are materialized from the
   safetensors shards (shard handles kept open; routed experts copied in place into transformers' fused 3-D tensors,
   the router weight in F32 as NVIDIA stores it, buffers in their stored dtype) when that
   layer is calibrated, and dropped after it is written.
2. Inputs: every calibration batch runs through the skeleton's own `forward` once with each decoder block
   replaced by a probe that records the block's keyword arguments (transformers' causal / Mamba masks,
   position ids) and passes the hidden states on; so each block later gets exactly what the model would give
   it. The embedding is materialized only for this and released after (Omni media batches bring their own
   `inputs_embeds`, text batches token ids).
3. Per layer: `mtq.quantize` on a one-layer shell (the block at its own index, `model.layers.{i}`, so the
   plan's ModelOpt config and quantizer names apply unchanged) with a forward loop that runs the stored
   hidden states of every batch through the block; max calibration observes with fake quantization off, so
   the block's outputs are the unquantized activations the next layer gets (as in the whole-model run).
   Expert coverage hooks (`omniq.calib.experts`) and the Omni modality counter are installed on the skeleton
   and see each layer's batches in the whole-model order.
4. Per layer export with ModelOpt's own export steps on the shell, the ones `export_hf_checkpoint` runs on a
   whole model: `_prepare_moe_inputs`, the shared-input fusion of q/k/v (`preprocess_linear_fusion`, which
   ModelOpt finds with a dummy forward of the whole model; here from the architecture: in NemotronH only an
   attention layer's q/k/v share an input), `_process_quantized_modules` (packing; it splits fused experts
   into per-expert modules named like the hub's `experts.{e}.up_proj`, and frees the fused BF16 tensors, so
   the whole-model export's `_reconstruct_fused_moe_linear`, which stacks them again for transformers' reverse
   conversion to split, is skipped: one packed copy less), `postprocess_state_dict` (KV scales = amax / 448),
   then hub-layout names (`hf_checkpoint.hub_names`). The tensors are written at their offsets in the output
   shards laid out from the plan up front (`ShardWriter`), each layer's quantized weights read back and
   compared with their source rows right after (`WriteCheck`), each shard hashed once it is complete.

Why not ModelOpt's own layer-by-layer tools (nvidia-modelopt 0.47, transformers 5.14, CPU):
`LayerwiseConfig` / `layerwise_calib.LayerActivationCollector` and the streaming `export_hf_checkpoint`
(`unified_export_hf_streaming.py`) both work on the whole model instantiated with accelerate offload hooks
(the streaming export refuses anything else). What was checked here: `LayerActivationCollector.is_supported`
is true for transformers' NemotronH and its conversion mapping has no split rules (so the streaming export
would not refuse it). What was not run: the offloaded route itself. transformers 5 loads NemotronH's routed
experts through a load-time conversion (per-expert tensors merged into fused 3-D tensors), so an offloaded
model's weights are the converted ones, which accelerate keeps in its `offload_folder` (a second copy of the
checkpoint on disk, 63 GB for the real model) rather than reading the source shards; and the streaming export
writes its own shard layout. Here each layer's tensors come straight from the source shards, and the
calibration, packing and scale arithmetic are still ModelOpt's (`mtq.quantize` and its export functions);
only the loop over layers is omniq's.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omniq import checksums
from omniq.errors import OmniqError
from omniq.heap import give_back
from omniq.model import names
from omniq.model.arch import ATTENTION
from omniq.model.checkpoint import DTYPE_BYTES, TORCH_DTYPES, Checkpoint, TensorReader

Progress = Callable[[str, int, int], None]
# Output shards of at most 1 GB (ModelOpt's export writes 5 GB ones; the buffer of one shard is part of the
# streamed peak, `omniq.quant.memory.streamed_estimate`). The bundled models fit one shard either way.
from omniq.quant.memory import STREAM_SHARD_BYTES as SHARD_BYTES  # noqa: E402
KV_MAX_BOUND = 448
TRIM_EVERY = 16                 # packed weights between two heap trims in the export (omniq_packing)


class _Stop(Exception):
    """Raised by the last probe: the inputs of every block are recorded, nothing past them is needed."""


# ----- the model without storage, and a layer's tensors from the shards ------------------------------------
def build_skeleton(ckpt: Checkpoint):
    """transformers' NemotronHForCausalLM of the checkpoint on the meta device, bf16, omniq's Mamba forward."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from omniq.quant.calibrate import patch_mamba_mixers

    if ckpt.is_omni:
        cfg = NemotronHConfig(**dict(ckpt.llm_config, use_mamba_kernels=False))
    else:
        cfg = NemotronHConfig.from_pretrained(str(ckpt.path), use_mamba_kernels=False)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = NemotronHForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    model.config.use_cache = False
    patch_mamba_mixers(model)
    return model


def materialize(module, native_prefix: str, source: TensorReader, keep: dict | None = None,
                kept: dict | None = None) -> int:
    """Give `module` (part of the skeleton, named `native_prefix`) its tensors from the checkpoint, checked for
    NaN / inf; returns the bytes loaded. `keep` (checkpoint tensor name -> row indices): copies of those rows
    of those tensors, as stored, go into `kept` (the export self-check's source rows, `WriteCheck`)."""
    import torch

    from omniq.quant.calibrate import hub_name_of

    ckpt = source.ckpt
    loaded = 0
    entries = [(n, p, True) for n, p in module.named_parameters()] + [(n, b, False) for n, b in module.named_buffers()]
    for name, old, is_param in entries:
        full = f"{native_prefix}.{name}" if native_prefix else name
        if old.dim() == 3 and names.fused_expert(full):
            parts = [hub_name_of(full, ckpt, e) for e in range(old.shape[0])]
            first = source.get(parts[0])
            t = torch.empty((len(parts), *first.shape), dtype=first.dtype)    # filled in place: no second copy
            t[0].copy_(first)
            del first
            for e in range(1, len(parts)):
                source.get(parts[e], out=t[e])        # read straight into the stack (shape / dtype checked)
            for e, part in enumerate(parts):
                if keep and part in keep:
                    kept[part] = t[e, keep[part]].clone()
        else:
            parts = [hub_name_of(full, ckpt)]
            t = source.get(parts[0])
            if keep and parts[0] in keep:
                kept[parts[0]] = t[keep[parts[0]]].clone()
        if tuple(t.shape) != tuple(old.shape):
            raise OmniqError(f"{ckpt.path}: tensor {parts[0]} has shape {list(t.shape)} but the config says "
                             f"{list(old.shape)}; config and weights do not match")
        if is_param:
            dtype = torch.float32 if names.is_router_weight(name) else old.dtype     # router: F32 as stored
        else:
            dtype = t.dtype
        t = t.to(dtype)
        if t.is_floating_point() and not _all_finite(t):
            bad = parts[int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0])] if t.dim() == 3 else parts[0]
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise OmniqError(f"{ckpt.path}: tensor {bad} contains {kind} values; fix or re-download the checkpoint")
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if is_param:
            sub._parameters[leaf] = torch.nn.Parameter(t, requires_grad=not names.is_router_weight(name))
        else:
            sub._buffers[leaf] = t
        loaded += t.numel() * t.element_size()
    return loaded


def _all_finite(t, chunk_elements: int = 1 << 24) -> bool:
    """`torch.isfinite(t).all()` without its temporaries, by one min / max pass: `torch.aminmax` propagates
    NaN (documented), so a NaN makes both results NaN and an inf makes one of them infinite. On CPU
    `isfinite` is four elementwise kernels (x == x, abs, != inf, and) plus the reduction: on a real-width
    MoE layer (2.4 GiB of BF16) 6 s of the layer's 11 s of loading at one thread, aminmax 0.3 s
    (benchmarks/calibration_profile.py; on a whole fused expert stack isfinite's temporaries were also 3 GB,
    the peak of the whole quantize). Other dtypes (float8, which has neither aminmax nor isfinite on CPU) are
    checked a block of rows at a time in float32."""
    import math

    import torch

    if t.numel() == 0:
        return True
    if t.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        lo, hi = torch.aminmax(t.detach())
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, chunk_elements // max(rows.shape[1], 1))
    return all(bool(torch.isfinite(rows[a:a + step].float()).all()) for a in range(0, rows.shape[0], step))


def release(module) -> None:
    """Drop `module`'s tensors (back to meta), so the layer's memory goes when its results are written."""
    module.to("meta")


# ----- 2. every block's inputs ----------------------------------------------------------------------------
class _Probe:
    """Stands in for decoder block `i` while the inputs of every block are recorded."""

    def __init__(self, i: int, block_type: str, sink: dict, last: bool):
        self.i, self.block_type, self.sink, self.last = i, block_type, sink, last

    def __call__(self, hidden_states, **kwargs):
        if self.i == 0:
            self.sink["hidden"] = hidden_states
        self.sink.setdefault("kwargs", {})[self.i] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


@contextlib.contextmanager
def probes(model, sink: dict):
    import torch

    layers = model.model.layers
    saved = list(layers)
    n = len(saved)

    class _P(torch.nn.Module):
        def __init__(self, probe):
            super().__init__()
            self.probe = probe
            self.block_type = probe.block_type

        def forward(self, *args, **kwargs):
            return self.probe(*args, **kwargs)

    for i, block in enumerate(saved):
        layers[i] = _P(_Probe(i, block.block_type, sink, i == n - 1))
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block


def block_inputs(model, batch) -> tuple[object, dict]:
    """(hidden states entering block 0, {block index: its keyword arguments}) for one calibration batch: a
    token tensor (rows, seq_len) or an Omni `multimodal.Batch` (inputs_embeds)."""
    import torch

    sink: dict = {}
    kwargs = ({k: v for k, v in batch.kwargs.items()} if hasattr(batch, "kwargs") else {"input_ids": batch})
    with probes(model, sink), torch.no_grad():
        try:
            model(**kwargs, use_cache=False, logits_to_keep=1)
        except _Stop:
            pass
    return sink["hidden"], sink["kwargs"]


# ----- 3. one layer -------------------------------------------------------------------------------------
def register_modelopt_plugins(model) -> None:
    """Run ModelOpt's model plugins (the class registrations `mtq.quantize` does on the model it is given)
    once on the whole skeleton: some register only for a transformers `PreTrainedModel` (e.g. NemotronH's
    attention for KV-cache quantization), which the one-layer shell is not."""
    from modelopt.torch.quantization.plugins.custom import CUSTOM_MODEL_PLUGINS

    from omniq.quant.calibrate import modelopt_isolation

    with modelopt_isolation(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for plugin in CUSTOM_MODEL_PLUGINS:
            plugin(model)


def _shell(model, i: int):
    """A module whose only child is block `i` at its own path `model.layers.{i}` (and the model's config)."""
    import torch

    shell = torch.nn.Module()
    shell.config = model.config
    shell.model = torch.nn.Module()
    shell.model.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(i)] + [model.model.layers[i]])
    return shell


@dataclass
class LayerResult:
    tensors: dict                    # hub-layout name -> tensor, as the whole-model export writes them
    quant_config: dict               # ModelOpt's get_quant_config of the layer
    log: str = ""


def calibrate_layer(model, i: int, config: dict, hidden: list, kwargs: list, *, enabled: dict[str, str],
                    observe=None, restored: list | None = None, weight_amax_once: bool = True):
    """`mtq.quantize` of block `i` over the stored hidden states (replaced in place by the block's outputs);
    returns the one-layer shell, quantized and calibrated.

    `weight_amax_once` (`omniq.quant.calibrate.weights_calibrated_once`): the weight quantizers that
    ModelOpt's weight-only pass already calibrated do not reduce their constant weight again in every
    forward of the loop (the same amax; tests/quant/test_calibrate.py compares both ways)."""
    import torch

    import modelopt.torch.quantization as mtq

    from omniq.quant.calibrate import check_calibrated, modelopt_isolation, weights_calibrated_once

    block = model.model.layers[i]
    shell = _shell(model, i)

    def loop(_m):
        with torch.no_grad(), weights_calibrated_once(_m) if weight_amax_once else contextlib.nullcontext():
            for k in range(len(hidden)):
                with observe(k) if observe is not None else contextlib.nullcontext():
                    hidden[k] = block(hidden[k], **kwargs[k][i])

    prefix = names.native_layer(i) + "."
    mine = {n: f for n, f in enabled.items() if n.startswith(prefix)}
    if not mine:
        # Nothing of this layer is quantized (a BF16 layer of a mixed recipe, e.g. one `omniq search` wrote):
        # the block only passes the hidden states on. ModelOpt would refuse the one-layer shell (its check that
        # the config's weight quantizers matched some module), as a whole model it finds them elsewhere.
        loop(shell)
        shell.omniq_bf16_layer = True        # export_layer: the layer's tensors as loaded, no ModelOpt step
        return shell
    log = io.StringIO()
    # Only KV-cache quantizers in this layer (a BF16 attention layer under an FP8 KV cache, as nano3-nvfp4 has):
    # ModelOpt's check that the config's weight quantizers matched a module would refuse the one-layer shell;
    # it is skipped for this call only (check_calibrated below still checks the layer's own quantizers).
    kv_only = not any("weight_quantizer" in n for n in mine)
    with modelopt_isolation(restored), contextlib.redirect_stdout(log), warnings.catch_warnings(), \
            _skip_weight_check(kv_only):
        warnings.simplefilter("ignore")
        mtq.quantize(shell, config, loop)
    check_calibrated(shell, mine)
    return shell


@contextlib.contextmanager
def _skip_weight_check(skip: bool):
    """ModelOpt's MODELOPT_SKIP_WEIGHT_QUANT_CHECK set for one mtq.quantize call (restored after)."""
    key = "MODELOPT_SKIP_WEIGHT_QUANT_CHECK"
    old = os.environ.get(key)
    if skip:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if skip:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def omniq_packing():
    """ModelOpt's export with its FP8 / NVFP4 packing step done by omniq's arithmetic, in chunks.

    `_export_quantized_weight` computes the scales (ModelOpt's code, unchanged) and hands the weight and
    scales to `to_quantized_weight`; for NVFP4 that runs `NVFP4QTensor.quantize`, whose CPU path is about 3x
    slower than `formats.nvfp4_pack` on a 1856 x 2688 expert matrix at one thread (0.165 s vs 0.052 s,
    measured here) and dominated the export of a real-width MoE layer (256 expert matrices). Both compute the
    same codes (tests/quant/test_formats.py: bit-identical; the artifact goldens of
    tests/export/test_quantize_streamed.py cover the whole export). Both ModelOpt paths also divide a whole
    fused expert stack at once (transformers 5 keeps a layer's 128 experts in one 3-D tensor), so a float32
    quotient of 2.55 GB per projection sat beside the layer; omniq's run an expert or row block at a time.
    Anything else (other formats, padded rows, packed wrappers) still goes to ModelOpt's own function.

    NVFP4 block scales: ModelOpt's export computes a weight's per-block scales twice (once to register
    `weight_scale`, once to pack), each by cloning the weight and reducing its blocks' min and max; here
    `formats.nvfp4_block_scales` computes them once (the same arithmetic: the block's largest magnitude in the
    weight's dtype, divided in float32 by 6 x weight_scale_2, zero scales set to 1, clamped to the E4M3 range;
    bit-identical, tests/quant/test_formats.py) and the second call gets the same result: on one real-width MoE
    layer 10.5 of the export's 21.7 s were those scales (cProfile, one thread).

    Every `TRIM_EVERY` packed weights the heap's free pages go back to the OS (`omniq.heap.give_back`): an MoE
    layer's export packs 256 expert matrices whose tens-of-MB temporaries glibc serves from its heap (its
    mmap threshold grows past them) between the packed results that stay, and the freed pages stayed in the
    process: measured on one real-width MoE layer's NVFP4 export (benchmarks/export_layer_memory.py,
    benchmarks/results/export_layer_memory.json), the peak without trims was 1.36-1.45 GiB above the calibrated
    layer (varying run to run, so the 12-layer checkpoint's peak grew with its number of MoE layers) against the
    packed copy's 0.69 GiB; with the trims 0.87-0.96 GiB, at an export time within this shared machine's noise
    (32 and 94 s against 41 and 42 s). A fixed 1 MiB mmap threshold instead (every temporary its own mapping)
    held it at 0.72 GiB but made the export 2.3-3.1x slower (page faults on every fresh temporary)."""
    import torch
    from modelopt.torch.export import unified_export_hf as ue
    from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_NVFP4

    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniq.quant.formats.nvfp4 import NVFP4_BLOCK, nvfp4_block_scales, nvfp4_pack

    theirs = ue.to_quantized_weight
    packed = [0]

    def to_quantized_weight(weight, weights_scaling_factor, quantization, weights_scaling_factor2=None,
                            block_size=None):
        packed[0] += 1
        if packed[0] % TRIM_EVERY == 0:
            give_back()
        plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dtype != torch.float8_e4m3fn
        if (quantization == QUANTIZATION_FP8 and plain and weights_scaling_factor is not None
                and (weight.dim() == 3 and weights_scaling_factor.dim() == 2
                     and weights_scaling_factor.shape[0] == weight.shape[0]
                     or weight.dim() == 2 and weights_scaling_factor.numel() == 1)):
            return _fp8_in_chunks(weight, weights_scaling_factor.to(weight.device))
        if (quantization == QUANTIZATION_NVFP4 and type(weight) in (torch.Tensor, torch.nn.Parameter)
                and block_size == NVFP4_BLOCK and weight.shape[-1] % NVFP4_BLOCK == 0
                and weights_scaling_factor is not None and weights_scaling_factor2 is not None):
            return nvfp4_pack(weight, weights_scaling_factor.to(weight.device),
                              weights_scaling_factor2.to(weight.device), block_size)
        return theirs(weight, weights_scaling_factor, quantization, weights_scaling_factor2, block_size)

    theirs_scales = NVFP4QTensor.__dict__["get_weights_scaling_factor"]
    last: list = []                    # [(weight, weights_scaling_factor_2, result)] of the previous call

    def get_weights_scaling_factor(cls, input, block_size, weights_scaling_factor_2=None, keep_high_precision=False):
        ws2 = weights_scaling_factor_2
        if (keep_high_precision or ws2 is None or ws2.numel() != 1 or block_size != NVFP4_BLOCK
                or type(input) not in (torch.Tensor, torch.nn.Parameter) or input.shape[-1] % NVFP4_BLOCK
                or not input.is_floating_point()):
            return theirs_scales.__func__(cls, input, block_size, ws2, keep_high_precision)
        if last:
            w, s2, result = last[0]
            # `w` is held, so no other tensor can have its storage: same pointer, shape, stride and dtype
            # mean the same values.
            if (w.data_ptr() == input.data_ptr() and w.shape == input.shape and w.stride() == input.stride()
                    and w.dtype == input.dtype and s2.dtype == ws2.dtype and float(s2) == float(ws2)):
                return result
        result = (nvfp4_block_scales(input, ws2), ws2)
        last[:] = [(input, ws2, result)]
        return result

    ue.to_quantized_weight = to_quantized_weight
    NVFP4QTensor.get_weights_scaling_factor = classmethod(get_weights_scaling_factor)
    try:
        yield
    finally:
        ue.to_quantized_weight = theirs
        NVFP4QTensor.get_weights_scaling_factor = theirs_scales
        last.clear()


def _fp8_in_chunks(weight, scale, chunk_elements: int = 1 << 24):
    """`(weight / scale).to(float8_e4m3fn)` as ModelOpt's FP8 export computes it (a stacked expert tensor
    divided by its per-expert scale), one expert / row block at a time: the float32 quotient of a whole
    real-width expert stack is 2.55 GB, of one row block 64 MB."""
    import torch

    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    if weight.dim() == 3:
        s = scale.unsqueeze(-1)                # (experts, 1 or out, 1), as ModelOpt broadcasts it
        for e in range(weight.shape[0]):
            out[e] = (weight[e] / s[e]).to(torch.float8_e4m3fn)
        return out
    s = scale.reshape(())
    rows = max(1, chunk_elements // max(weight.shape[-1], 1))
    for a in range(0, weight.shape[0], rows):
        out[a:a + rows] = (weight[a:a + rows] / s).to(torch.float8_e4m3fn)
    return out


def export_layer(shell, model, arch) -> LayerResult:
    """ModelOpt's export steps on a calibrated one-layer shell -> the layer's tensors in hub-layout names."""
    import torch
    from modelopt.torch.export.quant_utils import get_quant_config, postprocess_state_dict, preprocess_linear_fusion
    from modelopt.torch.export.unified_export_hf import _prepare_moe_inputs, _process_quantized_modules

    from omniq.export.hf_checkpoint import hub_names
    from omniq.quant.calibrate import modelopt_isolation

    log = io.StringIO()
    i = len(shell.model.layers) - 1
    block = shell.model.layers[i]
    if getattr(shell, "omniq_bf16_layer", False):      # nothing quantized: bf16 (router F32) as loaded
        return LayerResult({hub: t.detach().contiguous() for name, t in shell.state_dict().items()
                            for hub, t in hub_names(name, t, arch)},
                           {"quantization": {"quant_algo": None, "kv_cache_quant_algo": None}})
    with modelopt_isolation(), contextlib.redirect_stdout(log), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _prepare_moe_inputs(shell, torch.bfloat16, False)
        if i in arch.layers_of(ATTENTION):
            from modelopt.torch.export.layer_utils import get_quantization_format
            from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_NONE

            qkv = [block.mixer.q_proj, block.mixer.k_proj, block.mixer.v_proj]
            fmt = get_quantization_format(qkv[0])
            if fmt not in (QUANTIZATION_FP8, QUANTIZATION_NONE, "fp8_pb_real"):
                preprocess_linear_fusion(qkv)
        qc = get_quant_config(shell)
        with omniq_packing():
            _process_quantized_modules(shell, torch.bfloat16, False)
        kv = qc["quantization"].get("kv_cache_quant_algo")
        sd = postprocess_state_dict(shell.state_dict(), KV_MAX_BOUND, kv)
    out: dict = {}
    for name, t in sd.items():
        for hub, tensor in hub_names(name, t, arch):
            out[hub] = tensor.detach().contiguous()
    return LayerResult(out, qc, log.getvalue())


# ----- 4. output shards -----------------------------------------------------------------------------------
_DTYPES = TORCH_DTYPES        # safetensors dtype name -> torch dtype name (omniq.model.checkpoint's one table)


def _dtype_name(t) -> str:
    import torch

    return next(k for k, v in _DTYPES.items() if getattr(torch, v) == t.dtype)


def _safetensors_order() -> dict[str, int]:
    """dtype name -> its rank in safetensors' data order (tensors are laid out by dtype, then by name), learnt
    from safetensors itself so the header written here is the one `save_file` writes."""
    import struct

    import torch
    from safetensors.torch import save

    raw = save({k: torch.zeros(1, dtype=getattr(torch, v)) for k, v in _DTYPES.items()})
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: rank for rank, k in enumerate(sorted(header, key=lambda k: header[k]["data_offsets"][0]))}


@dataclass
class _Shard:
    path: Path
    names: list[str]                        # in data order
    offsets: dict[str, tuple[int, int]]     # absolute file offsets (start, end)
    written: set = field(default_factory=set)
    fd: int = -1
    digest: object = None                   # checksums.Soon: its sha256, read once its last tensor is written


class ShardWriter:
    """The output shards laid out from the plan before any layer is calibrated, filled tensor by tensor.

    Every output tensor's dtype and shape is known up front (`hf_checkpoint.expected_tensors`), so each shard's
    safetensors header (the layout `save_file` writes: `__metadata__` first, tensors by dtype then name,
    space-padded to 8 bytes) is written first, the file's full size is reserved (`posix_fallocate`: a disk too
    small fails before calibration starts), and each layer's tensors are written at their offsets as the layer
    is exported: no shard buffer in memory. Tensors go to shards in model order, at most `limit` bytes each.
    A tensor the plan does not have, or of another dtype or shape, or one missing at the end, fails the run
    (GateFailed, the coverage assertion's message). A full disk is raised as OSError(ENOSPC), which
    `omniq.atomic.staged_dir` turns into a one-line error after removing the stage.

    A shard whose last tensor is written is handed to `checksums.hash_soon`: its sha256 is read back (from the
    page cache, in file order, which the tensors' arrival in model order is not) in a background thread while
    the next layers are calibrated and packed, or, for the last shards, while the export self-check runs; the
    manifest takes those digests (`checksums.sha256_file`) instead of reading the shards again. A run that
    fails abandons them (`close`) before the stage is removed."""

    def __init__(self, final: Path, layout: dict, limit: int = SHARD_BYTES):
        """`layout`: tensor name -> (safetensors dtype name, shape), in model order."""
        import math

        self.final, self.layout = Path(final), layout
        self.finished = False
        rank = _safetensors_order()
        nbytes = {n: math.prod(shape) * _itemsize(dt) for n, (dt, shape) in layout.items()}
        groups: list[list[str]] = [[]]
        size = 0
        for n in layout:
            if groups[-1] and size + nbytes[n] > limit:
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += nbytes[n]
        self.shards: list[_Shard] = []
        self.where: dict[str, _Shard] = {}
        self.total = sum(nbytes.values())
        for k, group in enumerate(groups):
            order = sorted(group, key=lambda n: (rank[layout[n][0]], n))
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for n in order:
                header[n] = {"dtype": layout[n][0], "shape": list(layout[n][1]), "data_offsets": [pos, pos + nbytes[n]]}
                pos += nbytes[n]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            base = 8 + len(raw)
            shard = _Shard(self.final / f".part-{k:05d}.safetensors", order,
                           {n: (base + a, base + b) for n, (a, b) in
                            ((n, header[n]["data_offsets"]) for n in order)})
            shard.fd = os.open(shard.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.shards.append(shard)
            os.pwrite(shard.fd, len(raw).to_bytes(8, "little") + raw, 0)
            if pos:
                try:
                    os.posix_fallocate(shard.fd, base, pos)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):   # file systems without fallocate
                        raise
                    os.ftruncate(shard.fd, base + pos)
            self.where.update({n: shard for n in order})

    def add(self, tensors: dict) -> None:
        from omniq.errors import GateFailed

        for name, t in tensors.items():
            shard = self.where.get(name)
            if shard is None:
                raise GateFailed(f"exported checkpoint does not match the layer plan: unexpected tensor {name} "
                                 f"({_dtype_name(t)})")
            dt, shape = self.layout[name]
            if _dtype_name(t) != dt or tuple(t.shape) != tuple(shape):
                raise GateFailed(f"exported checkpoint does not match the layer plan: {name} is {_dtype_name(t)} "
                                 f"{list(t.shape)}, expected {dt} {list(shape)}")
            if name in shard.written:
                raise RuntimeError(f"export wrote tensor {name} twice")
            import torch

            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            start, end = shard.offsets[name]
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(shard.fd, view[done:], start + done)
            if done != end - start:
                raise RuntimeError(f"{name}: wrote {done} bytes, the layout has {end - start}")
            shard.written.add(name)
            if len(shard.written) == len(shard.names):
                shard.digest = checksums.hash_soon(shard.path)

    # ----- reading back what was written (the export self-check's share done while the shards are open) -----
    def _pread(self, name: str, start: int, out):
        import torch

        shard = self.where[name]
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            n = os.preadv(shard.fd, [view[done:]], start + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{shard.path}: short read of tensor {name} at byte {start + done}")
            done += n
        return out

    def _dtype(self, name: str):
        import torch

        return getattr(torch, _DTYPES[self.layout[name][0]])

    def read(self, name: str):
        """Tensor `name` as written to its shard (read from the file, i.e. the page cache just filled)."""
        import torch

        return self._pread(name, self.where[name].offsets[name][0],
                           torch.empty(self.layout[name][1], dtype=self._dtype(name)))

    def read_rows(self, name: str, rows: list[int]):
        """Rows `rows` (first dimension) of tensor `name` as written to its shard."""
        import torch

        shape = tuple(self.layout[name][1])
        start, end = self.where[name].offsets[name]
        row_bytes = (end - start) // max(shape[0], 1)
        out = torch.empty((len(rows), *shape[1:]), dtype=self._dtype(name))
        for k, r in enumerate(rows):
            self._pread(name, start + r * row_bytes, out[k])
        return out

    def holds(self, name: str, t, chunk: int = 1 << 26) -> bool:
        """Whether the bytes of `name` in its shard are `t`'s, bit for bit, compared `chunk` bytes at a time."""
        import torch

        want = t.detach().contiguous().reshape(-1).view(torch.uint8)
        start, end = self.where[name].offsets[name]
        if want.numel() != end - start:
            return False
        buf = torch.empty(min(chunk, max(want.numel(), 1)), dtype=torch.uint8)
        for a in range(0, want.numel(), chunk):
            n = min(chunk, want.numel() - a)
            got = self._pread(name, start + a, buf[:n])
            if not torch.equal(got, want[a:a + n]):
                return False
        return True

    def finish(self, extra: int = 0) -> list[str]:
        """Check every planned tensor was written, close and name the shards (plus `extra` more written by the
        caller after them: model-K-of-N); returns every shard name."""
        from omniq.errors import GateFailed

        missing = [n for s in self.shards for n in s.names if n not in s.written]
        self.finished = not missing
        self.close()
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise GateFailed(f"exported checkpoint does not match the layer plan: "
                             f"{'; '.join(f'missing {n}' for n in missing[:3])}{more}")
        n = len(self.shards) + extra
        files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for shard, name in zip(self.shards, files):
            os.replace(shard.path, self.final / name)
        return files

    def close(self) -> None:
        """Close the shards; before `finish` (a failed run) their background digests are abandoned too."""
        for s in self.shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
        if not self.finished:
            self.abandon()

    def abandon(self) -> None:
        for s in self.shards:
            if s.digest is not None:
                s.digest.abandon()
                s.digest = None

    def weight_map(self, files: list[str]) -> dict[str, str]:
        return {t: name for shard, name in zip(self.shards, files) for t in shard.names}


def _itemsize(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


_NOWHERE = _Shard(Path(), [], {})


class WriteCheck:
    """The export self-check's costly share (`hf_checkpoint.verify_tensors`), done as each tensor is written:
    each quantized weight's CHECK_ROWS rows are dequantized from the shard just written (read back from the
    file) and compared with the same rows of its source weight, copied when the layer was read from the
    source (`materialize(keep=...)`), so the source is not read a second time row by row (a real-width MoE
    layer: 256 x 32 scattered reads of a few KB); the passthrough tensors outside the layers (embedding,
    final norm, lm_head: 1.3 GB of the real model) are compared bit for bit, read back from the shard, with
    the source tensor the export has just written. What was compared is `checked`, which the final
    self-check skips (its header, dtype, shape and scale checks still cover every tensor)."""

    def __init__(self, plan, writer: ShardWriter):
        from omniq.export.hf_checkpoint import check_rows, expected_tensors
        from omniq.quant.formats import FORMATS

        self.writer = writer
        self.checked: set[str] = set()
        self.weights: dict[int, dict[str, tuple[str, list[int]]]] = {}
        self.needs: dict[str, list[str]] = {}          # weight -> it and its weight scales (what is read back)
        for name, e in expected_tensors(plan).items():
            if e.kind == "weight":
                layer = plan.arch.layer_index(name)
                self.weights.setdefault(layer, {})[name] = (e.fmt, check_rows(e.shape[0]))
                module = name[: -len(".weight")]
                self.needs[name] = [name] + [f"{module}.{c.suffix}" for c in FORMATS[e.fmt].weight_scales]
        self.kept: dict = {}

    def keep(self, i: int) -> dict[str, list[int]]:
        """Checkpoint tensor name -> the rows to copy of it while layer `i` is read."""
        return {n: rows for n, (_, rows) in self.weights.get(i, {}).items()}

    def layer_written(self, i: int) -> None:
        from omniq.export.hf_checkpoint import _fail, weight_error, weight_problem

        problems = []
        for name, (fmt, rows) in self.weights.get(i, {}).items():
            src = self.kept.pop(name, None)
            if src is None or any(n not in self.writer.where.get(n, _NOWHERE).written for n in self.needs[name]):
                continue            # not loaded or not written: the final self-check / `finish` name it
            problem = weight_problem(name, fmt, weight_error(name, fmt, rows, src, self.writer.read_rows,
                                                             self.writer.read))
            if problem:
                problems.append(problem)
            self.checked.add(name)
        self.kept.clear()
        if problems:
            _fail(problems)

    def passthrough_written(self, tensors: dict) -> None:
        from omniq.export.hf_checkpoint import _fail

        bad = [f"{n} differs from the source checkpoint" for n, t in tensors.items() if not self.writer.holds(n, t)]
        if bad:
            _fail(bad)
        self.checked.update(tensors)


def output_layout(plan) -> dict:
    """Every tensor the artifact's language-model shards hold -> (dtype, shape), in model order (embeddings,
    each layer's tensors, final norm, lm_head)."""
    from omniq.export.hf_checkpoint import expected_tensors

    expected = expected_tensors(plan)
    position = {t.name: k for k, t in enumerate(plan.arch.tensors)}

    def key(name):
        layer = plan.arch.layer_index(name)
        if layer is None:
            layer = -1 if name == plan.arch.embedding_weight else 1 << 30
        module = name.rsplit(".", 1)[0]
        return layer, position.get(name, position.get(module + ".weight", 1 << 30)), name

    return {n: (expected[n].dtype, tuple(expected[n].shape)) for n in sorted(expected, key=key)}


# ----- the whole run ------------------------------------------------------------------------------------
@dataclass
class Streamed:
    quant_config: dict                      # merged ModelOpt quant config (quant_algo, kv_cache_quant_algo)
    restored: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    peak_layer_bytes: int = 0
    checked: frozenset = frozenset()        # what WriteCheck compared while writing (the final self-check skips it)


def _passthrough(source: TensorReader, arch, name: str):
    """A tensor outside the decoder layers as the whole-model export writes it: bf16 (the load dtype) unless the
    architecture stores it in F32."""
    import torch

    t = source.get(name)
    return t if arch.tensor_by_name[name].dtype == "F32" else t.to(torch.bfloat16)


def _merge_quant_config(configs: list[dict]) -> dict:
    """One hf_quant_config `quantization` from the layers' (ModelOpt's rule: one algorithm, else mixed)."""
    algos = {c["quantization"].get("quant_algo") for c in configs} - {None}
    kv = {c["quantization"].get("kv_cache_quant_algo") for c in configs} - {None}
    algo = next(iter(algos)) if len(algos) == 1 else ("MIXED_PRECISION" if algos else None)
    return {"quantization": {"quant_algo": algo, "kv_cache_quant_algo": next(iter(kv)) if kv else None}}


def run(ckpt: Checkpoint, plan, config: dict, enabled: dict[str, str], batches: list, final: Path, *,
        coverage=None, counter=None, device: str = "cpu", progress: Progress | None = None,
        shard_bytes: int = SHARD_BYTES, model=None, layer_tensors_hook=None) -> Streamed:
    """Calibrate and export every decoder layer in turn into `final` (a stage directory); `batches` are token
    tensors (rows, seq_len) or Omni `multimodal.Batch`es. The embedding, final norm and lm_head (never
    quantized) are copied from the source. `model`: the skeleton to use (`build_skeleton`), when the caller
    has hooked it (the Omni modality counter).

    `layer_tensors_hook(i, tensors) -> tensors`: the hook point for weight calibration beyond max (the
    contract with `omniq.quant.weight_calibration`): called once per decoder layer with the layer's exported
    tensors (hub names -> packed weights and scales, as ModelOpt wrote them) before they are written; what it
    returns is written instead (e.g. a weight and weight_scale from another algorithm; names, dtypes and shapes
    must stay those of the plan, which the export self-check verifies)."""
    import time

    from omniq.export.hf_checkpoint import copy_raw_tensors, tower_tensors

    arch = plan.arch
    out = Streamed(quant_config={})
    t = time.perf_counter()
    model = model if model is not None else build_skeleton(ckpt)   # the counter's hooks may sit on it
    register_modelopt_plugins(model)
    source = TensorReader(ckpt)
    mm = bool(batches) and hasattr(batches[0], "kwargs")
    out.bytes_read += materialize(model.model.embeddings, names.NATIVE_EMBEDDINGS, source)   # token rows (Omni too)
    model.model.embeddings.to(device)
    hidden, kwargs = [], []
    for b in batches:
        if mm:
            b = type(b)(kwargs={k: v.to(device) for k, v in b.kwargs.items()}, modality=b.modality, sha256=b.sha256)
        h, kw = block_inputs(model, b if mm else b.to(device))
        hidden.append(h)
        kwargs.append(kw)
    release(model.model.embeddings)
    out.seconds["inputs"] = time.perf_counter() - t

    def observe(k):
        return counter.observing(batches[k]) if counter is not None else contextlib.nullcontext()

    writer = ShardWriter(final, output_layout(plan), shard_bytes)
    check = WriteCheck(plan, writer)
    configs: list[dict] = []
    counting = coverage.installed(model) if coverage is not None else contextlib.nullcontext()
    calib_s = export_s = read_s = 0.0
    # The collection after each layer (its shell's reference cycles) would otherwise walk every object of
    # transformers, ModelOpt and the skeleton each time (0.34 s a layer measured here); objects alive now are
    # set aside from the collector for the loop (`gc.freeze`) and given back to it after (`gc.unfreeze`).
    gc.collect()
    gc.freeze()
    try:
        first = {n: _passthrough(source, arch, n) for n in [arch.embedding_weight]}
        writer.add(first)
        check.passthrough_written(first)
        del first
        with counting:
            for i in range(arch.num_layers):
                t = time.perf_counter()
                block = model.model.layers[i]
                n = materialize(block, names.native_layer(i), source, keep=check.keep(i), kept=check.kept)
                out.bytes_read += n
                out.peak_layer_bytes = max(out.peak_layer_bytes, n)
                block.to(device)
                read_s += time.perf_counter() - t
                shell = calibrate_layer(model, i, config, hidden, kwargs, enabled=enabled, observe=observe,
                                        restored=out.restored)
                calib_s += time.perf_counter() - t
                t = time.perf_counter()
                layer = export_layer(shell, model, arch)
                configs.append(layer.quant_config)
                tensors = {k: v.cpu() for k, v in layer.tensors.items()}
                del layer, shell
                release(block)                  # before the hook: weight calibration reads the source itself
                give_back(collect=True)
                if layer_tensors_hook is not None:
                    tensors = layer_tensors_hook(i, tensors)
                writer.add(tensors)
                del tensors
                check.layer_written(i)
                export_s += time.perf_counter() - t
                if progress:
                    progress("calibrate", i + 1, arch.num_layers)
        if counter is not None:
            for b in batches:
                counter.count(b)
        del hidden, kwargs
        t = time.perf_counter()
        last = {n: _passthrough(source, arch, n) for n in arch.final_tensors}
        writer.add(last)
        check.passthrough_written(last)
        del last
        towers = tower_tensors(ckpt)
        files = writer.finish(extra=1 if towers else 0)
    finally:
        gc.unfreeze()
        writer.close()
        source.close()
    weight_map = writer.weight_map(files)
    total = writer.total
    if towers:
        try:
            total += copy_raw_tensors(ckpt, sorted(towers), final / files[-1])
        except BaseException:
            writer.abandon()
            raise
        checksums.hash_soon(final / files[-1])
        weight_map.update({name: files[-1] for name in towers})
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (final / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out.seconds.update(calibrate=calib_s, read_layers=read_s, export_layers=export_s + time.perf_counter() - t)
    out.quant_config = _merge_quant_config(configs)
    out.files = files
    out.checked = frozenset(check.checked)
    out.bytes_written = sum((final / n).stat().st_size for n in files)
    return out
