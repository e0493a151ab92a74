"""Read a checkpoint from its files into what the plain-torch forward needs, the way an engine would run it.

A BF16 reference and a quantized candidate go through the same reader. Each weight's format is inferred
from the tensors present (dtype plus companions) and cross-checked with what the checkpoint declares
(`hf_quant_config.json` or `config.json` `quantization_config`), since an engine picks its kernels from the
declaration and reads the scales from the tensors:

    X.weight BF16/F16/F32                                          -> "bf16"  (kept in high precision)
    X.weight F8_E4M3 + X.weight_scale (fp32, per tensor or channel)  -> "fp8"
    X.weight U8 [out, in/2] + X.weight_scale F8_E4M3 [out, in/16] + X.weight_scale_2 -> "nvfp4"

Nothing is read whole: `read_artifact` reads the headers, the declaration and the small companion tensors
(scales), and keeps the shards open; a weight is read from its shard when it is used (`Artifact.unit`: one
decoder layer's tensors, in their stored dtype, on the device) and dequantized into float32 per matrix on
use (`UnitWeights`), so memory is one layer per artifact, not the model. Activations are quantized in the `linear` hook from
`X.input_scale` (static per-tensor FP8, or dynamic per-16-block NVFP4 with the per-tensor global scale, see
`omniq.quant.formats`), after `X.pre_quant_scale` when present; K and V in the `kv` hook from
`k_proj.k_scale` / `v_proj.v_scale` when the KV cache is declared FP8. An attention layer's FP8 q / k / v
share the largest of their scales, as the engines' fused QKV GEMM does. Everything else is computed in
float32: the engines' BF16 rounding of GEMM outputs and activations is the noise floor (`bf16_compute_hooks`,
`omniq.validate.gates`), not part of the quantization error.

`check_same_model` refuses (exit 2) a candidate whose config, tensor layout or tokenizer differs from the
reference beyond what quantization allows: quantized weights may change dtype and shape (packing) and
gain scale tensors; nothing else may differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F

from omniq.errors import OmniqError
from omniq.heap import give_back
from omniq.model import names
from omniq.model.arch import Arch
from omniq.model.checkpoint import Checkpoint, open_checkpoint
from omniq.quant import formats
from omniq.validate import declaration as decl_mod

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
ALGOS = decl_mod.ALGO_FORMATS      # declared per-layer algorithm -> (weight format, activation format)
_companion = formats.companion_of  # a quantizer's tensor next to `X.weight`; everything else is the reference's

LinearFn = Callable[[str, torch.Tensor], torch.Tensor]
KvFn = Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """How one module's weight is stored and how its input is quantized."""

    name: str                          # module name, hub layout, without ".weight"
    weight_format: str                 # "bf16", "fp8", "nvfp4"
    activation: str | None = None      # "fp8" (static per tensor), "nvfp4" (dynamic per block) or None
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None


class ShardReader:
    """The checkpoint's safetensors files, opened once and read tensor by tensor (`omniq.model.checkpoint.
    TensorReader`: `pread` into the tensor, the page cache of the bytes read dropped, no memory map): a
    tensor is read from its shard only when asked for, with validate's own messages."""

    def unmap(self) -> None:
        """Close the shards (reopened on the next read)."""
        self._reader.close()

    def __init__(self, ckpt: Checkpoint):
        from omniq.model.checkpoint import TensorReader

        self.ckpt = ckpt
        self._reader = TensorReader(ckpt)

    def get(self, name: str) -> torch.Tensor:
        info = self.ckpt.headers.get(name)
        if info is None:
            raise OmniqError(f"{_where(self.ckpt)}: tensor {name!r} is not in the checkpoint")
        f = info.file
        if not f.is_file():
            raise OmniqError(f"{_where(self.ckpt)}: shard {f.name} disappeared during the run; "
                             "the checkpoint changed under omniq")
        try:
            return self._reader.get(name)
        except OmniqError:  # a truncated or rewritten shard: the user's to fix
            raise OmniqError(f"{_where(self.ckpt)}: cannot read {name} from {f.name} (shorter than its header "
                             "says, or changed); re-download or re-export it") from None


@dataclass
class Artifact:
    checkpoint: Checkpoint
    layers: dict[str, Layer]                         # every module with a `.weight`
    kv_scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)   # layer -> {"k","v"}
    warnings: list[str] = field(default_factory=list)
    small: dict[str, torch.Tensor] = field(default_factory=dict)  # companion tensors read up front (scales)
    common_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # fused FP8 q/k/v: module -> scale
    reader: ShardReader | None = None

    @property
    def arch(self) -> Arch:
        return self.checkpoint.arch

    @property
    def path(self):
        return self.checkpoint.path

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def quantized(self) -> dict[str, Layer]:
        return {n: layer for n, layer in self.layers.items() if layer.weight_format != "bf16"}

    @property
    def format(self) -> str:
        """`bf16`, `fp8`, `nvfp4`, or `mixed` (several formats among the quantized layers)."""
        kinds = {layer.weight_format for layer in self.quantized.values()}
        if not kinds:
            return "bf16"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def kv_cache(self) -> str | None:
        return "fp8" if self.kv_scales else None

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lin in self.arch.linears:
            layer = self.layers.get(lin.name)
            key = layer.weight_format if layer else "bf16"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ----- tensors, on use --------------------------------------------------------------------------------
    @cached_property
    def base_names(self) -> list[str]:
        """Every tensor that is not a quantizer's companion (weights, norms, biases, towers), in file order."""
        return [n for n in self.checkpoint.headers if _companion(n) is None]

    @cached_property
    def names_by_layer(self) -> dict[int, list[str]]:
        """Decoder layer index -> its base tensors, in file order."""
        out: dict[int, list[str]] = {}
        for n in self.base_names:
            i = self.arch.layer_index(n)
            if i is not None:
                out.setdefault(i, []).append(n)
        return out

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """The shape of a base tensor once dequantized."""
        info = self.checkpoint.headers[name]
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        layer = self.layers.get(module) if module else None
        if layer is None or layer.weight_format == "bf16":
            return info.shape
        logical = self.arch.tensor_by_name.get(name)
        if logical is not None:
            return logical.shape
        f = formats.FORMATS[layer.weight_format]
        return (*info.shape[:-1], f.logical_in_features(info.shape[-1]))

    def stored_names(self, names) -> list[str]:
        """The base tensors `names` and the companions their dequantization reads from the shards."""
        out = []
        for n in names:
            out.append(n)
            module = n[: -len(".weight")] if n.endswith(".weight") else None
            layer = self.layers.get(module) if module else None
            if layer is not None and layer.weight_format in formats.FORMATS:
                out += [f"{module}.{c.suffix}" for c in formats.FORMATS[layer.weight_format].block_scales]
        return out

    def unit_bytes(self, names) -> int:
        """Bytes the stored tensors of `names` take (what `unit` holds)."""
        h = self.checkpoint.headers
        return sum(h[n].nbytes for n in self.stored_names(names))

    def unit(self, names, device: torch.device | str = "cpu", keep_float32_below: int = 0,
             lazy: bool = False) -> "UnitWeights":
        """The tensors `names` (e.g. one decoder layer's) read from the shards in their stored dtype onto
        `device` (checked for corrupt codes on the way), dequantized to float32 when used. `lazy`: nothing is
        read up front; each matrix is read from its shard (page cache) when used and dropped after, so a
        real-width MoE layer (3.6 GiB of both checkpoints) is never resident at once."""
        if lazy:
            return UnitWeights(self, {}, list(names), 0, device=device)
        stored = {n: self.reader.get(n) for n in self.stored_names(names)}
        for n in names:
            if n.endswith(".weight"):
                self._check_codes(n[: -len(".weight")], stored)
        return UnitWeights(self, {n: t.to(device) for n, t in stored.items()}, list(names), keep_float32_below)

    def read_stored(self, name: str, device) -> dict[str, torch.Tensor]:
        """Base tensor `name` and the companions its dequantization reads, from the shards onto `device`."""
        stored = {n: self.reader.get(n) for n in self.stored_names([name])}
        if name.endswith(".weight"):
            self._check_codes(name[: -len(".weight")], stored)
        return {n: t.to(device) for n, t in stored.items()}

    @property
    def weights(self) -> "LazyWeights":
        """Every base tensor, read and dequantized when asked for (nothing kept): for callers that want one
        tensor at a time, e.g. tests and benchmarks; the validate run uses `unit` per layer."""
        return LazyWeights(self)

    def _stored_tensors(self, module: str, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"weight", and the weight's scale companions} of a quantized `module`, as its format names them:
        the per-block scales from `stored` (on its device), the small ones read up front moved there."""
        w = stored[f"{module}.weight"]
        out = {"weight": w}
        for c in formats.FORMATS[self.layers[module].weight_format].weight_scales:
            name = f"{module}.{c.suffix}"
            out[c.suffix] = stored[name] if c.block else self.small[name].to(w.device)
        return out

    def _check_codes(self, module: str, stored: dict[str, torch.Tensor]) -> None:
        """Refuse a quantized weight whose codes or scales are corrupt (NaN), read on the CPU."""
        layer = self.layers.get(module)
        if layer is None or layer.weight_format == "bf16":
            return
        bad = formats.FORMATS[layer.weight_format].corrupt(self._stored_tensors(module, stored))
        if bad:
            raise OmniqError(f"{_where(self.checkpoint)}: {module}{bad}; the artifact is corrupt; re-export it")

    def dequantize(self, name: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """Base tensor `name` in float32 from its stored tensors (on their device)."""
        t = stored[name]
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        layer = self.layers.get(module) if module else None
        fmt = layer.weight_format if layer else "bf16"
        if fmt == "bf16":
            return t.float()
        tensors = self._stored_tensors(module, stored)
        if fmt == "fp8":
            # a per-output-channel scale (third-party FP8 exports) is read too
            q, s = t.view(torch.float8_e4m3fn), tensors["weight_scale"].float()
            s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (t.dim() - 1)))
            common = self.common_scale.get(module)
            if common is not None:
                # re-rounded to the fused q/k/v scale via bf16, as TensorRT-LLM does (`_fuse_qkv_fp8`)
                common = common.to(t.device)
                return formats.fp8_dequantize(formats.cast_e4m3((q.to(torch.bfloat16) * s) / common), common)
            return formats.fp8_dequantize(q, s)
        logical = self.arch.tensor_by_name[name].shape if name in self.arch.tensor_by_name else None
        return formats.FORMATS[fmt].dequantize(tensors, None if logical is None else logical[-1])

    # ----- hooks -------------------------------------------------------------------------------------------
    def linear(self, weights: Mapping[str, torch.Tensor] | None = None) -> "EngineLinear":
        """The forward's hook: dequantized weight, activations quantized as the layer's engine kernel does."""
        return EngineLinear(self.layers, self.weights if weights is None else weights)

    def kv(self) -> KvFn | None:
        if not self.kv_scales:
            return None
        scales = self.kv_scales

        def kv(layer: int, which: str, t: torch.Tensor) -> torch.Tensor:
            s = scales.get(layer, {}).get(which)
            return t if s is None else formats.fp8_fake_quant(t, s.to(t.device))

        return kv


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# A unit read matrix by matrix (a real-width MoE layer) gives freed heap pages back every this many reads:
# glibc's dynamic mmap threshold serves the experts' 20-40 MB temporaries from its heap and keeps the freed
# pages through the layer. Without it a reference-cache hit of the 5-layer real-width checkpoint (4 x 128
# tokens) peaked at 7.66 GiB RSS and was killed inside 6 GiB; with it the same runs peak at 5.13 GiB and pass
# there (benchmarks/validate_realwidth.py --reference-cache, docs/validate-streamed.md).
LAZY_TRIM_EVERY = 8


class UnitWeights(Mapping):
    """Some of an artifact's tensors, held as stored; `w[name]` is float32, dequantized on use. A unit whose
    float32 form is smaller than `keep_float32_below` bytes keeps it after first use (the bundled model's
    layers: converting once per layer, not once per batch); a larger one converts per matrix every time."""

    def __init__(self, artifact: Artifact, stored: dict[str, torch.Tensor], names: list[str],
                 keep_float32_below: int = 0, device=None):
        self.artifact, self.stored, self.names = artifact, stored, names
        self.lazy_device = device                 # set: nothing held, each tensor read from its shard on use
        self._reads = 0
        self._known = set(names)
        self._float32: dict[str, torch.Tensor] | None = None
        if keep_float32_below and 4 * sum(math.prod(artifact.logical_shape(n)) for n in names) < keep_float32_below:
            self._float32 = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.lazy_device is not None:
            if name not in self._known or _companion(name) is not None:
                raise KeyError(name)
            self._reads += 1
            if self._reads % LAZY_TRIM_EVERY == 0:
                give_back()
            return self.artifact.dequantize(name, self.artifact.read_stored(name, self.lazy_device))
        if name not in self.stored or _companion(name) is not None:
            raise KeyError(name)
        if self._float32 is not None:
            if name not in self._float32:
                self._float32[name] = self.artifact.dequantize(name, self.stored)
            return self._float32[name]
        return self.artifact.dequantize(name, self.stored)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def share_identical(self, other: "UnitWeights") -> list[str]:
        """Let this unit use `other`'s float32 form of every tensor both keep in high precision with the same
        stored bytes (the candidate's never-quantized embeddings and lm_head are the reference's: one float32
        copy of a 131,072 x 2,688 matrix, 1.4 GB, instead of two). Both units must keep their float32 forms;
        returns the names shared."""
        if self._float32 is None or other._float32 is None:
            return []
        shared = []
        for name in self.names:
            mine, theirs = self.stored.get(name), other.stored.get(name)
            if (mine is None or theirs is None or self.stored_dtype(name) is None
                    or other.stored_dtype(name) is None or mine.dtype != theirs.dtype or mine.shape != theirs.shape):
                continue
            if not mine.is_meta and torch.equal(mine, theirs):      # (meta tensors have no values to compare)
                self._float32[name] = other[name]
                shared.append(name)
        return shared

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype `name` is stored in, when it is kept in high precision (None for a quantized weight)."""
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        layer = self.artifact.layers.get(module) if module else None
        if layer is not None and layer.weight_format != "bf16":
            return None
        if self.lazy_device is not None:
            info = self.artifact.checkpoint.headers.get(name) if name in self._known else None
            return None if info is None else _TORCH_DTYPES.get(info.dtype)
        t = self.stored.get(name)
        return None if t is None else t.dtype


class LazyWeights(Mapping):
    """All of an artifact's base tensors, each read from its shard and dequantized when asked for."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.names = artifact.base_names
        self._known = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.artifact.unit([name])[name]

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


class EngineLinear:
    """The candidate's linear layers as an engine runs them: the input scaled by `pre_quant_scale` and
    quantized (static per-tensor FP8, or dynamic per-16-block NVFP4 with the static global scale), then a
    float32 GEMM with the dequantized weight. `input_key` / `prepare` / `matmul` let the MoE quantize a
    layer input once for all experts that quantize it alike (omniq.model.forward)."""

    def __init__(self, layers: dict[str, Layer], weights: Mapping[str, torch.Tensor]):
        self.layers, self.weights = layers, weights
        self._on: dict = {}

    def _device(self, t: torch.Tensor | None, device) -> torch.Tensor | None:
        if t is None or t.device == device:
            return t
        key = (id(t), device)
        if key not in self._on:
            self._on[key] = t.to(device)
        return self._on[key]

    def input_key(self, name: str):
        layer = self.layers.get(name)
        if layer is None:
            return None
        return (layer.activation if layer.input_scale is not None else None,
                None if layer.input_scale is None else float(layer.input_scale),
                None if layer.pre_quant_scale is None else name)

    def prepare(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers.get(name)
        if layer is not None and layer.pre_quant_scale is not None:
            x = x * self._device(layer.pre_quant_scale, x.device)
        if layer is not None and layer.input_scale is not None:
            s = self._device(layer.input_scale, x.device)
            if layer.activation == "fp8":
                x = formats.fp8_fake_quant(x, s)
            elif layer.activation == "nvfp4":
                x = formats.nvfp4_fake_quant(x, s)
        return x

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weights[f"{name}.weight"], self.weights.get(f"{name}.bias"))

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(name, self.prepare(name, x))


def bf16_compute_hooks(weights: Mapping[str, torch.Tensor]) -> tuple[LinearFn, KvFn]:
    """Hooks that run every linear as a BF16 engine does (bf16 inputs and weights, fp32 accumulation, bf16
    output) and keep K / V in bf16. Used for the noise floor: a bf16 forward against the float32 one. A
    weight stored in BF16 (`UnitWeights.stored_dtype`) is used as it is: rounding it again changes nothing."""

    def kv(layer: int, which: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    return BF16Linear(weights), kv


class BF16Linear:
    """The noise floor's linear (`bf16_compute_hooks`). Every input is rounded to bf16 alike (`input_key`), so
    the forward rounds a layer input once for all the linears that read it (the MoE's experts, q / k / v)."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = weights
        self.stored_dtype = getattr(weights, "stored_dtype", lambda name: None)

    def input_key(self, name: str):
        return "bf16"

    def prepare(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).float()

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[f"{name}.weight"]
        if self.stored_dtype(f"{name}.weight") != torch.bfloat16:
            w = w.to(torch.bfloat16).float()
        b = self.weights.get(f"{name}.bias")
        return F.linear(x, w, None if b is None else b.to(torch.bfloat16).float()).to(torch.bfloat16).float()

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(name, self.prepare(name, x))


# ----- reading ------------------------------------------------------------------------------------------
def _where(ckpt: Checkpoint) -> str:
    return str(ckpt.source or ckpt.path)


def weight_format(ckpt: Checkpoint, module: str) -> str:
    """Infer how `module.weight` is stored from its dtype and companion tensors (the format whose stored
    weight dtype it is, with that format's weight scales in their dtypes)."""
    h = ckpt.headers
    w = h[f"{module}.weight"]
    where = _where(ckpt)
    if w.dtype in FLOAT_DTYPES:
        scales = [c.suffix for g in formats.FORMATS.values() for c in g.weight_scales if f"{module}.{c.suffix}" in h]
        if scales:
            raise OmniqError(f"{where}: {module}.weight is {w.dtype} but has a {scales[0]}; "
                             "the artifact mixes quantized and unquantized tensors; re-export it")
        return "bf16"
    f = formats.BY_WEIGHT_DTYPE.get(w.dtype)
    if f is None:
        raise OmniqError(f"{where}: {module}.weight has dtype {w.dtype}; omniq validates BF16, "
                         f"{' and '.join(f'{g.quant_algo} ({g.weight_dtype})' for g in formats.FORMATS.values())} "
                         "checkpoints")
    wrong = [c for c in f.weight_scales if getattr(h.get(f"{module}.{c.suffix}"), "dtype", None) != c.dtype]
    if wrong:
        want = " and ".join(f"a {c.dtype} {c.suffix}" for c in f.weight_scales)
        raise OmniqError(f"{where}: {module}.weight is {w.dtype} but lacks {want}; cannot read it as "
                         f"{f.quant_algo}; re-export the checkpoint")
    for c in f.weight_scales:
        n = math.prod(h[f"{module}.{c.suffix}"].shape)
        # a per-output-channel FP8 scale (third-party exports) is read too; block scales: _check_packed_shape
        if c.block is None and n != 1 and not (f is formats.FP8 and n == w.shape[0]):
            raise OmniqError(f"{where}: {module}.{c.suffix} has shape {list(h[f'{module}.{c.suffix}'].shape)}; "
                             f"expected a per-tensor{' or per-output-channel' if f is formats.FP8 else ''} "
                             f"{f.quant_algo} scale")
    return f.name


def _check_packed_shape(ckpt: Checkpoint, module: str, fmt: str, shape: tuple[int, ...]) -> None:
    """The stored shapes of a quantized weight are consistent with the logical shape the config implies."""
    h = ckpt.headers
    w = h[f"{module}.weight"].shape
    f = formats.FORMATS[fmt]
    ok = w == f.stored_shape(shape) and all(h[f"{module}.{c.suffix}"].shape == c.shape(shape)
                                            for c in f.block_scales)
    if not ok:
        raise OmniqError(f"{_where(ckpt)}: {module}.weight is stored as {list(w)} ({fmt}), which does not hold "
                         f"the {list(shape)} weight config.json implies; config and weights do not match")


def _scalar(t: torch.Tensor, what: str, where: str) -> torch.Tensor:
    t = t.float()
    if t.numel() != 1 or not torch.isfinite(t).all() or (t <= 0).any():
        raise OmniqError(f"{where}: {what} must be one positive finite number, got {t.flatten()[:4].tolist()}")
    return t.reshape(())


def read_artifact(name_or_path) -> Artifact:
    """Open a checkpoint directory (or bundled name) to be read as an engine would run it: headers, the
    declaration and the scales now; the weights from the shards when used (`Artifact.unit`)."""
    ckpt = open_checkpoint(str(name_or_path), check_shapes=False)
    where = _where(ckpt)
    arch = ckpt.arch
    reading = decl_mod.of_quantization(ckpt.quantization, ckpt.is_omni)
    warnings: list[str] = []

    base = [n for n in ckpt.headers if _companion(n) is None]
    missing = [t.name for t in arch.tensors if t.name not in ckpt.headers]
    if missing:
        raise OmniqError(f"{where}: tensor {missing[0]} implied by config.json is missing "
                         f"({len(missing)} missing in all); config and weights do not match")

    modules = [n[: -len(".weight")] for n in base if n.endswith(".weight")]
    fmt_of = {m: weight_format(ckpt, m) for m in modules}
    for t in arch.tensors:
        if not t.name.endswith(".weight"):
            continue
        m = t.name[: -len(".weight")]
        f = fmt_of.get(m, "bf16")
        if f == "bf16":
            if ckpt.headers[t.name].shape != t.shape:
                raise OmniqError(f"{where}: tensor {t.name} has shape {list(ckpt.headers[t.name].shape)} but "
                                 f"config.json implies {list(t.shape)}; config and weights do not match")
        else:
            _check_packed_shape(ckpt, m, f, t.shape)
    for t in arch.tensors:
        if not t.name.endswith(".weight") and ckpt.headers[t.name].shape != t.shape:
            raise OmniqError(f"{where}: tensor {t.name} has shape {list(ckpt.headers[t.name].shape)} but "
                             f"config.json implies {list(t.shape)}; config and weights do not match")

    reader = ShardReader(ckpt)
    # the small companions (every scale but the per-block ones, NVFP4's weight_scale) are read now
    small = {}
    for n in ckpt.headers:
        c = _companion(n)
        f = formats.FORMATS.get(fmt_of.get(c[0])) if c is not None else None
        if c is not None and not (f is not None and c[1] in {b.suffix for b in f.block_scales}):
            small[n] = reader.get(n)
    layers = _layers(ckpt, fmt_of, small, reading, warnings)
    common = _fuse_qkv_fp8(arch, layers, small)
    kv_scales = _kv_scales(ckpt, small, reading)
    return Artifact(checkpoint=ckpt, layers=layers, kv_scales=kv_scales, warnings=warnings, small=small,
                    common_scale=common, reader=reader)


def _layers(ckpt: Checkpoint, fmt_of: dict[str, str], raw: dict, reading: decl_mod.Reading,
            warnings: list[str]) -> dict:
    where = _where(ckpt)
    algo = reading.declared.quant_algo if reading.declared else None
    quantized = {m for m, f in fmt_of.items() if f != "bf16"}
    if quantized and reading.declared is None:
        raise OmniqError(f"{where}: has quantized tensors but no hf_quant_config.json or quantization_config; "
                         "an engine cannot load it; re-export with ModelOpt's export_hf_checkpoint")
    if algo and algo not in ALGOS and algo != "MIXED_PRECISION":
        raise OmniqError(f"{where}: declares quant_algo {algo!r}; omniq validates "
                         f"{', '.join(ALGOS)} and MIXED_PRECISION mixes of them")
    bad = reading.corrupted()
    if bad["quantized_layers"]:
        warnings.append(f"quantized_layers has {len(bad['quantized_layers'])} corrupted names (ModelOpt's "
                        f"sentinel, e.g. {bad['quantized_layers'][0]!r}); read here as their module names, "
                        "but engines match none of them")
    if bad["exclude_modules"]:
        warnings.append(f"exclude_modules has {len(bad['exclude_modules'])} corrupted entries (e.g. "
                        f"{bad['exclude_modules'][0]!r}); engines match none of them")

    layers: dict[str, Layer] = {}
    used: set[str] = set()
    for m, f in fmt_of.items():
        if f == "bf16":
            layers[m] = Layer(m, "bf16")
            continue
        if algo == "MIXED_PRECISION":
            entry = reading.layer_entry(m, repair=True)
            if entry is None:
                raise OmniqError(f"{where}: {m} is stored as {f} but is not in quantized_layers of the "
                                 "MIXED_PRECISION declaration; engines would misread it; re-export it")
            used.add(entry)
        if reading.excluded_by(m) is not None:
            raise OmniqError(f"{where}: {m} is quantized ({f}) but matches exclude_modules; engines would "
                             "load it as BF16; re-export it")
        layer_algo = reading.algo(m, covered=True, repair=True)
        if layer_algo not in ALGOS:
            raise OmniqError(f"{where}: {m} declares quant_algo {layer_algo!r}; omniq validates "
                             f"{', '.join(ALGOS)}")
        want_w, act = ALGOS[layer_algo]
        if want_w != f:
            raise OmniqError(f"{where}: {m} is stored as {f} but the checkpoint declares {layer_algo}; "
                             "declaration and tensors disagree; re-export it")
        s_name = f"{m}.{formats.FORMATS[f].input_scale.suffix}"
        s = raw.get(s_name)
        input_scale = _scalar(s, s_name, where) if s is not None else None
        if act is not None and input_scale is None:
            warnings.append(f"{m}: {layer_algo} without input_scale; simulated weight-only")
            act = None
        pqs = raw.get(f"{m}.{formats.PRE_QUANT_SCALE.suffix}")
        layers[m] = Layer(m, f, act, input_scale, None if pqs is None else pqs.float())
    unused = sorted(set(reading.declared.quantized_layers) - used) if algo == "MIXED_PRECISION" else []
    if unused:
        raise OmniqError(f"{where}: quantized_layers lists {decl_mod.repaired(unused[0])} but its weight is "
                         "not quantized (or not present); declaration and tensors disagree; re-export it")
    return layers


def _fuse_qkv_fp8(arch: Arch, layers: dict[str, Layer], small: dict) -> dict[str, torch.Tensor]:
    """Engines run an attention layer's q / k / v as one GEMM with one weight scale and one input scale, the
    largest of the three (TensorRT-LLM's `FP8QDQLinearMethod.rescale_fused_weights`, vLLM's
    `requantize_with_max_scale`): each FP8 weight is re-rounded to the common scale (via bf16, as
    TensorRT-LLM does; `Artifact.dequantize` applies it on use) and the input quantized with the common input
    scale. Returns module -> common weight scale, for the modules whose own scale is smaller."""
    common_scale: dict[str, torch.Tensor] = {}
    for i in arch.attention_layers:
        qkv = names.qkv(f"{arch.layer_prefix(i)}.mixer")
        group = [layers.get(n) for n in qkv]
        scale = formats.FP8.weight_scales[0].suffix
        if any(g is None or g.weight_format != "fp8" or small[f"{g.name}.{scale}"].numel() != 1 for g in group):
            continue
        scales = [small[f"{n}.{scale}"].float().reshape(()) for n in qkv]
        s_max = max(scales)
        for n, s in zip(qkv, scales):
            if s != s_max:
                common_scale[n] = s_max
        inputs = [g.input_scale for g in group]
        if all(x is not None for x in inputs):
            common = max(inputs)
            for n, g in zip(qkv, group):
                layers[n] = replace(g, input_scale=common)
    return common_scale


def _kv_scales(ckpt: Checkpoint, raw: dict, reading: decl_mod.Reading) -> dict[int, dict[str, torch.Tensor]]:
    where = _where(ckpt)
    arch = ckpt.arch
    kv_algo = reading.declared.kv_cache_quant_algo if reading.declared else None
    found: dict[int, dict[str, torch.Tensor]] = {}
    for i in arch.attention_layers:
        for which, name in names.kv_scales(f"{arch.layer_prefix(i)}.mixer").items():
            t = raw.get(name)
            if t is not None:
                found.setdefault(i, {})[which] = _scalar(t, name, where)
    if kv_algo is None:
        if found:
            raise OmniqError(f"{where}: has k_scale / v_scale tensors but declares no kv_cache_quant_algo; "
                             "engines would run a BF16 KV cache; re-export it")
        return {}
    if kv_algo != "FP8":
        raise OmniqError(f"{where}: kv_cache_quant_algo {kv_algo!r} is not supported; omniq validates FP8 KV caches")
    incomplete = [i for i in arch.attention_layers if set(found.get(i, {})) != {"k", "v"}]
    if incomplete:
        raise OmniqError(f"{where}: declares an FP8 KV cache but attention layer {incomplete[0]} lacks k_scale "
                         "or v_scale; re-export it")
    return found


# ----- same model? ----------------------------------------------------------------------------------------
def check_same_model(reference: Artifact, candidate: Artifact) -> None:
    """Refuse (exit 2) a candidate that is not a quantization of the reference's model."""
    ref, cand = reference.checkpoint, candidate.checkpoint
    if reference.quantized:
        raise OmniqError(f"{_where(ref)}: the reference is quantized ({reference.format}); pass the BF16 "
                         "checkpoint the candidate was made from")
    if ref.arch != cand.arch:
        diff = [k for k in ref.arch.__dataclass_fields__ if k != "extra"
                and getattr(ref.arch, k) != getattr(cand.arch, k)]
        k = diff[0] if diff else "architecture"
        raise OmniqError(f"{_where(cand)}: not the reference's model: config differs in {k} "
                         f"({getattr(ref.arch, k, '?')!r} vs {getattr(cand.arch, k, '?')!r})")
    ref_names = {n for n in ref.headers if _companion(n) is None}
    cand_names = {n for n in cand.headers if _companion(n) is None}
    if ref_names != cand_names:
        extra = sorted(cand_names - ref_names)
        lost = sorted(ref_names - cand_names)
        what = f"has {extra[0]} that the reference lacks" if extra else f"lacks the reference's {lost[0]}"
        raise OmniqError(f"{_where(cand)}: not the reference's model: it {what}")
    for n in ref_names:
        a, b = reference.logical_shape(n), candidate.logical_shape(n)
        if a != b:
            raise OmniqError(f"{_where(cand)}: not the reference's model: {n} has shape "
                             f"{list(b)}, the reference {list(a)}")
    _check_same_tokenizer(reference, candidate)


def _tokenizer_files(ckpt: Checkpoint) -> bool:
    return any((ckpt.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                   "vocab.json"))


def _check_same_tokenizer(reference: Artifact, candidate: Artifact) -> None:
    if not _tokenizer_files(candidate.checkpoint):
        candidate.warnings.append("the candidate has no tokenizer files; the reference's tokenizer was used")
        return
    a, b = reference.tokenizer, candidate.tokenizer
    where = _where(candidate.checkpoint)
    if a.get_vocab() != b.get_vocab():
        raise OmniqError(f"{where}: not the reference's model: its tokenizer has a different vocabulary "
                         f"({len(b.get_vocab())} vs {len(a.get_vocab())} tokens)")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise OmniqError(f"{where}: not the reference's model: tokenizer {attr} is "
                             f"{getattr(b, attr, None)}, the reference's {getattr(a, attr, None)}")
    probe = "Return the number of items in a container.\n    >>> len([1, 2])  # héllo 3.14"
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe, add_special_tokens=False)["input_ids"]:
        raise OmniqError(f"{where}: not the reference's model: its tokenizer splits text differently")

def unquantized_names(reference: Artifact, candidate: Artifact, names) -> list[str]:
    """Those of `names` the candidate keeps in high precision (the ones compared value for value)."""
    out = []
    for name in names:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in candidate.quantized and name in candidate.checkpoint.headers:
            out.append(name)
    return out


def changed_unquantized(reference, candidate, names=None) -> dict[str, float]:
    """Of `names` (tensors the candidate keeps in high precision, see `unquantized_names`), those whose values
    differ from the reference's (e.g. a router saved in BF16 instead of FP32): name -> largest absolute
    difference. `reference` / `candidate` are float32 mappings (one layer's `UnitWeights`, or `weights`), or
    two Artifacts: then every unquantized tensor, read one at a time."""
    if isinstance(reference, Artifact):
        if names is None:
            names = unquantized_names(reference, candidate, reference.base_names)
        reference, candidate = reference.weights, candidate.weights
    out = {}
    for name in names:
        ref, cand = reference[name], candidate[name]
        if not torch.equal(ref, cand):
            out[name] = (ref - cand).abs().max().item()
    return out
