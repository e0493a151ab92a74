"""Layer-streamed quantize: calibrate and export one decoder layer at a time, straight from the shards.

Memory is about one decoder layer (its BF16 tensors, ModelOpt's quantizer state, the packed result) plus the
calibration hidden states of every row (rows x seq_len x hidden in BF16, twice: a layer's inputs and
outputs) plus one output shard buffer, whatever the model's depth. Nothing holds the whole model.

How (the same numbers as a whole-model `mtq.quantize` + `export_hf_checkpoint`, byte for byte on the bundled
models: tests/export/test_streamed.py against tests/data/golden/quantize_tiny.json):
1. `Skeleton`: transformers' own `NemotronHForCausalLM` built on the `meta` device (no storage) from the
   checkpoint's config, in bf16, with omniq's Mamba forward (`calibrate.patch_mamba_mixers`). Its module tree
   gives ModelOpt the module names and classes it knows; a layer's parameters are materialized from the
   safetensors shards (shard handles kept open; routed experts stacked into transformers' fused 3-D tensors,
   the router weight in F32 as `calibrate.restore_router_fp32` does, buffers in their stored dtype) when that
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
   attention layer's q/k/v share an input), `_process_quantized_modules` (packing),
   `_reconstruct_fused_moe_linear`, `postprocess_state_dict` (KV scales = amax / 448), then hub-layout names
   (`hf_checkpoint.hub_names`). The tensors go into the output shard being filled; a shard is written when it
   reaches `SHARD_BYTES`.

Why not ModelOpt's own layer-by-layer tools (nvidia-modelopt 0.47; checked here, transformers 5.14, CPU):
`LayerwiseConfig` / `layerwise_calib.LayerActivationCollector` and the streaming `export_hf_checkpoint`
(`unified_export_hf_streaming.py`) both need the whole model instantiated with accelerate offload hooks.
transformers 5 loads NemotronH's routed experts through a load-time conversion (per-expert tensors merged into
fused 3-D tensors), so a disk-offloaded model is a converted copy of the whole checkpoint written to
`offload_folder` first (63 GB more disk for the real model) and read back per layer; the streaming export
writes its own shard layout and names. Here the layer's tensors come straight from the source shards and the
calibration, packing and scale arithmetic are still ModelOpt's (`mtq.quantize` and its export functions), only
the loop over layers is omniq's. `LayerActivationCollector.is_supported` is true for NemotronH and it has no
split rules, so the offloaded route would run given the disk; it is not used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omniq.errors import OmniqError
from omniq.model.arch import ATTENTION, MOE
from omniq.model.checkpoint import Checkpoint

Progress = Callable[[str, int, int], None]
SHARD_BYTES = 5 * 10**9          # as ModelOpt's export (max_shard_size "5GB"); see `ShardWriter`
KV_MAX_BOUND = 448


class _Stop(Exception):
    """Raised by the last probe: the inputs of every block are recorded, nothing past them is needed."""


# ----- the model without storage, and a layer's tensors from the shards ------------------------------------
class Source:
    """The checkpoint's tensors, read by name from shard handles opened once."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._handles: dict[Path, object] = {}

    def get(self, name: str):
        from safetensors import safe_open

        meta = self.ckpt.headers.get(name)
        if meta is None:
            raise OmniqError(f"{self.ckpt.path}: tensor {name} is missing from the checkpoint")
        f = Path(meta.file)
        if f not in self._handles:
            if not f.is_file():
                raise OmniqError(f"{f}: shard missing (it was there when quantize started); restore it and rerun")
            self._handles[f] = safe_open(str(f), framework="pt")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a shard truncated or replaced mid-run is a user-fixable input
            raise OmniqError(f"{f}: cannot read tensor {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "the shard changed or is damaged") from None

    def close(self) -> None:
        self._handles.clear()


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


def materialize(module, native_prefix: str, source: Source) -> int:
    """Give `module` (part of the skeleton, named `native_prefix`) its tensors from the checkpoint, checked for
    NaN / inf; returns the bytes loaded."""
    import torch

    from omniq.quant.calibrate import hub_name_of

    ckpt = source.ckpt
    loaded = 0
    entries = [(n, p, True) for n, p in module.named_parameters()] + [(n, b, False) for n, b in module.named_buffers()]
    for name, old, is_param in entries:
        full = f"{native_prefix}.{name}" if native_prefix else name
        if old.dim() == 3 and name.endswith(("experts.up_proj", "experts.down_proj")):
            parts = [hub_name_of(full, ckpt, e) for e in range(old.shape[0])]
            t = torch.stack([source.get(p) for p in parts])
        else:
            parts = [hub_name_of(full, ckpt)]
            t = source.get(parts[0])
        if tuple(t.shape) != tuple(old.shape):
            raise OmniqError(f"{ckpt.path}: tensor {parts[0]} has shape {list(t.shape)} but the config says "
                             f"{list(old.shape)}; config and weights do not match")
        if is_param:
            dtype = torch.float32 if name.endswith("gate.weight") else old.dtype     # router: F32 as stored
        else:
            dtype = t.dtype
        t = t.to(dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = parts[int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0])] if t.dim() == 3 else parts[0]
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise OmniqError(f"{ckpt.path}: tensor {bad} contains {kind} values; fix or re-download the checkpoint")
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if is_param:
            sub._parameters[leaf] = torch.nn.Parameter(t, requires_grad=not name.endswith("gate.weight"))
        else:
            sub._buffers[leaf] = t
        loaded += t.numel() * t.element_size()
    return loaded


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
                    observe=None, restored: list | None = None):
    """`mtq.quantize` of block `i` over the stored hidden states (replaced in place by the block's outputs);
    returns the one-layer shell, quantized and calibrated."""
    import torch

    import modelopt.torch.quantization as mtq

    from omniq.quant.calibrate import check_calibrated, modelopt_isolation

    block = model.model.layers[i]
    shell = _shell(model, i)

    def loop(_m):
        with torch.no_grad():
            for k in range(len(hidden)):
                with observe(k) if observe is not None else contextlib.nullcontext():
                    hidden[k] = block(hidden[k], **kwargs[k][i])

    log = io.StringIO()
    with modelopt_isolation(restored), contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(shell, config, loop)
    prefix = f"model.layers.{i}."
    check_calibrated(shell, {n: f for n, f in enabled.items() if n.startswith(prefix)})
    return shell


def export_layer(shell, model, arch) -> LayerResult:
    """ModelOpt's export steps on a calibrated one-layer shell -> the layer's tensors in hub-layout names."""
    import torch
    from modelopt.torch.export.quant_utils import get_quant_config, postprocess_state_dict, preprocess_linear_fusion
    from modelopt.torch.export.unified_export_hf import _prepare_moe_inputs, _process_quantized_modules
    from modelopt.torch.quantization.plugins.huggingface import _reconstruct_fused_moe_linear

    from omniq.export.hf_checkpoint import hub_names
    from omniq.quant.calibrate import modelopt_isolation

    log = io.StringIO()
    i = len(shell.model.layers) - 1
    block = shell.model.layers[i]
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
        _process_quantized_modules(shell, torch.bfloat16, False)
        _reconstruct_fused_moe_linear(shell)
        kv = qc["quantization"].get("kv_cache_quant_algo")
        sd = postprocess_state_dict(shell.state_dict(), KV_MAX_BOUND, kv)
    out: dict = {}
    for name, t in sd.items():
        for hub, tensor in hub_names(name, t, arch):
            out[hub] = tensor.detach().contiguous()
    return LayerResult(out, qc, log.getvalue())


# ----- 4. output shards -----------------------------------------------------------------------------------
class ShardWriter:
    """Tensors -> safetensors shards in the stage, one buffer at a time: a shard is written (sorted names, as
    the whole-model rewrite does) when adding a layer would pass `limit` bytes; named model-K-of-N at the end.
    A full disk (ENOSPC) is a one-line error; the stage (and so every part written) is removed by
    `hf_checkpoint.staged_output`."""

    def __init__(self, final: Path, limit: int = SHARD_BYTES):
        self.final, self.limit = Path(final), limit
        self.buffer: dict = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.buffer and self.size + n > self.limit:
            self.flush()
        for name, t in tensors.items():
            if name in self.buffer or any(name in names for _, names in self.parts):
                raise RuntimeError(f"export wrote tensor {name} twice")
            self.buffer[name] = t
        self.size += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.final / f".part-{len(self.parts):05d}.safetensors"
        try:
            save_file(dict(sorted(self.buffer.items())), str(path), metadata={"format": "pt"})
        except (OSError, RuntimeError, Exception) as e:  # noqa: BLE001 - safetensors reports ENOSPC as its own error
            if _disk_full(e, path):
                raise OmniqError(f"{self.final.parent.parent}: no space left on the device while writing the "
                                 f"artifact ({self.size / 2**30:.2f} GiB shard); free space or choose another --out",
                                 exit_code=1) from None
            raise
        self.parts.append((path, sorted(self.buffer)))
        self.total += self.size
        self.buffer, self.size = {}, 0

    def finish(self, extra: int = 0) -> list[str]:
        """Name the shards (plus `extra` more written by the caller after them); returns every shard name."""
        self.flush()
        n = len(self.parts) + extra
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for (path, _), name in zip(self.parts, names):
            os.replace(path, self.final / name)
        return names

    def weight_map(self, names: list[str]) -> dict[str, str]:
        return {t: name for (_, tensors), name in zip(self.parts, names) for t in tensors}


def _disk_full(e: Exception, path: Path) -> bool:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e).lower()
    if "no space" in text or "os error 28" in text:
        return True
    try:
        st = os.statvfs(path.parent)
        return st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        return False


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


def _passthrough(source: Source, arch, name: str):
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
        shard_bytes: int = SHARD_BYTES, model=None) -> Streamed:
    """Calibrate and export every decoder layer in turn into `final` (a stage directory); `batches` are token
    tensors (rows, seq_len) or Omni `multimodal.Batch`es. The embedding, final norm and lm_head (never
    quantized) are copied from the source. `model`: the skeleton to use (`build_skeleton`), when the caller
    has hooked it (the Omni modality counter)."""
    import time

    import torch

    from omniq.export.hf_checkpoint import copy_raw_tensors, tower_tensors

    arch = plan.arch
    out = Streamed(quant_config={})
    t = time.perf_counter()
    model = model if model is not None else build_skeleton(ckpt)   # the counter's hooks may sit on it
    register_modelopt_plugins(model)
    source = Source(ckpt)
    mm = bool(batches) and hasattr(batches[0], "kwargs")
    out.bytes_read += materialize(model.model.embeddings, "model.embeddings", source)   # token rows (Omni too)
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

    writer = ShardWriter(final, shard_bytes)
    head = [f"{arch.prefix}backbone.embeddings.weight"]
    writer.add({n: _passthrough(source, arch, n) for n in head})
    configs = []
    counting = coverage.installed(model) if coverage is not None else contextlib.nullcontext()
    calib_s = export_s = 0.0
    with counting:
        for i in range(arch.num_layers):
            t = time.perf_counter()
            block = model.model.layers[i]
            n = materialize(block, f"model.layers.{i}", source)
            out.bytes_read += n
            out.peak_layer_bytes = max(out.peak_layer_bytes, n)
            block.to(device)
            shell = calibrate_layer(model, i, config, hidden, kwargs, enabled=enabled, observe=observe,
                                    restored=out.restored)
            calib_s += time.perf_counter() - t
            t = time.perf_counter()
            layer = export_layer(shell, model, arch)
            configs.append(layer.quant_config)
            writer.add({k: v.cpu() for k, v in layer.tensors.items()})
            del layer, shell
            release(block)
            model.model.layers[i] = block
            export_s += time.perf_counter() - t
            if progress:
                progress("calibrate", i + 1, arch.num_layers)
    if counter is not None:
        for b in batches:
            counter.count(b)
    del hidden, kwargs
    t = time.perf_counter()
    tail = [f"{arch.prefix}backbone.norm_f.weight"] + ([] if arch.tie_word_embeddings else [f"{arch.prefix}lm_head.weight"])
    writer.add({n: _passthrough(source, arch, n) for n in tail})
    towers = tower_tensors(ckpt)
    names = writer.finish(extra=1 if towers else 0)
    weight_map = writer.weight_map(names)
    total = writer.total
    if towers:
        total += copy_raw_tensors(ckpt, sorted(towers), final / names[-1])
        weight_map.update({name: names[-1] for name in towers})
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (final / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    source.close()
    out.seconds.update(calibrate=calib_s, export_layers=export_s + time.perf_counter() - t)
    out.quant_config = _merge_quant_config(configs)
    out.files = names
    out.bytes_written = sum((final / n).stat().st_size for n in names)
    return out
