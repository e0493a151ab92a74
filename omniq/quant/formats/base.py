"""The one interface every quantization format module implements (the shape of transformers' `quantizers/`:
one small module per format, one registry). A new format is one more module here; plan, export, validate,
lint and deploy ask the registry (`omniq.quant.formats.FORMATS`) for what they need to know about it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

class _Lazy:
    """A module imported on first attribute use. The format facts (names, dtypes, sizes, configs) serve
    `omniq plan`, `lint` and `build`, which never load torch; the arithmetic imports it when it runs."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


torch = _Lazy("torch")
F = _Lazy("torch.nn.functional")
SCALAR_BYTES = 4        # an fp32 scalar scale (weight_scale of FP8, weight_scale_2 of NVFP4, input_scale)


@dataclass(frozen=True)
class Format:
    name: str                      # the recipe's name: "fp8", "nvfp4"
    quant_algo: str                # what hf_quant_config.json declares and engines read: "FP8", "NVFP4"
    weight_dtype: str              # safetensors dtype of the stored weight: "F8_E4M3", "U8"
    bits: int                      # bits per weight element (before scales)
    companions: tuple[str, ...]    # scale tensors stored next to `X.weight`, as `X.<companion>`
    group_size: int | None         # elements per block scale (None: per tensor)
    modelopt_quantizer: dict = field(default_factory=dict)   # ModelOpt quantizer config (weights and inputs)

    @property
    def bytes_per_element(self) -> float:
        return self.bits / 8

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes on disk of one linear weight [out, in] and its companion scales."""
        raise NotImplementedError

    def companion_specs(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """companion -> (safetensors dtype, shape) for a weight of logical `shape` (input_scale included)."""
        raise NotImplementedError

    def quantize(self, w, **scales) -> dict:
        """A float weight -> {"weight", and the weight's scale companions} exactly as ModelOpt exports them."""
        raise NotImplementedError

    def dequantize(self, tensors: dict, in_features: int | None = None):
        """{"weight", scale companions} read from a checkpoint -> float32 weight."""
        raise NotImplementedError

    def fake_quant_input(self, x, input_scale):
        """What an engine does to a linear layer's input with the calibrated `input_scale`."""
        raise NotImplementedError
