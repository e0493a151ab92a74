"""The one interface every quantization format module implements (the shape of transformers' `quantizers/`:
one small module per format, one registry). A new format is one more module here; plan, export, validate,
lint and deploy ask the registry (`omniq.quant.formats.FORMATS`) for what they need to know about it."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

class _Lazy:
    """A module imported on first attribute use. The format facts (names, dtypes, sizes, configs) serve
    `omniq plan`, `lint` and `build`, which never load torch; the arithmetic imports it when it runs."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        # sys.modules first: `importlib.import_module` costs about 4 us per attribute, which the NVFP4 export's
        # chunked packing (tens of thousands of torch calls per MoE layer) paid 0.2 s a layer for
        return getattr(sys.modules.get(self._name) or importlib.import_module(self._name), attr)


torch = _Lazy("torch")
F = _Lazy("torch.nn.functional")
SCALAR_BYTES = 4        # an fp32 scalar scale (weight_scale of FP8, weight_scale_2 of NVFP4, input_scale)


@dataclass(frozen=True)
class Companion:
    """A tensor a quantizer stores next to a weight `X.weight`, as `X.<suffix>`: its safetensors dtype and
    its shape rule, one value (`block` None) or one per `block` input elements of the weight
    ([*lead, ceil(in / block)])."""

    suffix: str
    dtype: str
    of: str                        # "weight": read to dequantize it; "input": quantizes the layer's input;
                                   # "kv": a KV-cache scale; "other": ModelOpt's, for algorithms omniq does not run
    block: int | None = None

    def shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The companion's shape for a weight of logical shape `weight_shape`."""
        if self.block is None:
            return ()
        *lead, n = weight_shape
        return (*lead, -(-n // self.block))


# Tensors ModelOpt may store next to a weight for algorithms omniq does not run (AWQ / SmoothQuant's
# per-input-channel pre-scale, an output quantizer's scale): readers take them for companions, not weights.
PRE_QUANT_SCALE = Companion("pre_quant_scale", "BF16", "other", block=1)
OTHER_COMPANIONS = (PRE_QUANT_SCALE, Companion("output_scale", "F32", "other"))


@dataclass(frozen=True)
class Format:
    name: str                      # the recipe's name: "fp8", "nvfp4"
    quant_algo: str                # what hf_quant_config.json declares and engines read: "FP8", "NVFP4"
    weight_dtype: str              # safetensors dtype of the stored weight: "F8_E4M3", "U8"
    bits: int                      # bits per weight element (before scales)
    scales: tuple[Companion, ...]  # the tensors stored next to `X.weight`, as `X.<suffix>`
    group_size: int | None         # elements per block scale (None: per tensor)
    modelopt_quantizer: dict = field(default_factory=dict)   # ModelOpt quantizer config (weights and inputs)

    @property
    def bytes_per_element(self) -> float:
        return self.bits / 8

    @property
    def companions(self) -> tuple[str, ...]:
        """The suffixes of `scales`."""
        return tuple(c.suffix for c in self.scales)

    @property
    def weight_scales(self) -> tuple[Companion, ...]:
        """The companions dequantizing the weight reads (the input scale is not one)."""
        return tuple(c for c in self.scales if c.of == "weight")

    @property
    def block_scales(self) -> tuple[Companion, ...]:
        """The weight scales with one value per block (as large as a fraction of the weight, read with it)."""
        return tuple(c for c in self.weight_scales if c.block)

    @property
    def input_scale(self) -> Companion:
        return next(c for c in self.scales if c.of == "input")

    def companion(self, suffix: str) -> Companion:
        return next(c for c in self.scales if c.suffix == suffix)

    def companion_specs(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """companion -> (safetensors dtype, shape) for a weight of logical `shape` (input_scale included)."""
        return {c.suffix: (c.dtype, c.shape(shape)) for c in self.scales}

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `X.weight` is stored in for a weight of logical `shape`: the last dimension padded to
        whole blocks and packed `8 / bits` elements per byte."""
        *lead, n = shape
        block = self.group_size or 1
        return (*lead, -(-n // block) * block * self.bits // 8)

    def logical_in_features(self, stored_in: int) -> int:
        """The (padded) input features a stored last dimension holds."""
        return stored_in * 8 // self.bits

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes on disk of one linear weight [out, in] and its companion scales."""
        raise NotImplementedError

    def quantize(self, w, **scales) -> dict:
        """A float weight -> {"weight", and the weight's scale companions} exactly as ModelOpt exports them."""
        raise NotImplementedError

    def dequantize(self, tensors: dict, in_features: int | None = None):
        """{"weight", scale companions} read from a checkpoint -> float32 weight."""
        raise NotImplementedError

    def corrupt(self, tensors: dict) -> str | None:
        """What is corrupt (NaN codes or scales) in {"weight", scale companions} read from a checkpoint, said
        after the module's name; None when nothing is."""
        raise NotImplementedError

    def fake_quant_input(self, x, input_scale):
        """What an engine does to a linear layer's input with the calibrated `input_scale`."""
        raise NotImplementedError
