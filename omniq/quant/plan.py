"""The layer plan: which linear layer of the model gets which format, decided in exactly one place.

`plan`, `quantize` (its ModelOpt config), the exported `hf_quant_config.json` (exclude_modules /
quantized_layers), the coverage assertion and `lint` all read a `LayerPlan`. Sizes are computed from
shapes, so a plan needs only a config, never weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from omniq.model.arch import ATTENTION, MAMBA, Arch, Linear
from omniq.quant.recipe import FORMATS, Recipe

NVFP4_GROUP = 16
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
FORMAT_OF_ALGO = {v: k for k, v in QUANT_ALGO.items()}
# Bytes of the small per-layer companions the export writes.
_SCALAR = 4  # fp32 scalar (weight_scale for FP8, weight_scale_2 for NVFP4, input_scale)


def weight_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes on disk of one linear weight and its scale tensors in a format."""
    n = out_features * in_features
    if fmt == "bf16":
        return 2 * n
    if fmt == "fp8":
        return n + 2 * _SCALAR                      # F8_E4M3 weight + weight_scale + input_scale
    if fmt == "nvfp4":
        # U8 [out, in/2] + F8_E4M3 weight_scale [out, in/16] + weight_scale_2 + input_scale
        return n // 2 + n // NVFP4_GROUP + 2 * _SCALAR
    raise ValueError(fmt)


def tensor_bytes(dtype: str, numel: int) -> int:
    return numel * (4 if dtype == "F32" else 2)


@dataclass(frozen=True)
class LayerPlan:
    arch: Arch
    recipe: Recipe

    @cached_property
    def formats(self) -> dict[str, str]:
        """Every linear layer (hub-layout name) -> bf16 | fp8 | nvfp4."""
        return {lin.name: self.recipe.format_of(lin, self.arch) for lin in self.arch.linears}

    @property
    def kv_cache(self) -> str | None:
        return None if self.recipe.kv_cache == "none" else self.recipe.kv_cache

    def linears(self, fmt: str | None = None) -> list[Linear]:
        return [lin for lin in self.arch.linears if fmt is None or self.formats[lin.name] == fmt]

    @property
    def quantized(self) -> list[Linear]:
        return [lin for lin in self.arch.linears if self.formats[lin.name] != "bf16"]

    @cached_property
    def counts(self) -> dict[str, int]:
        return {f: len(self.linears(f)) for f in FORMATS}

    @property
    def quant_formats(self) -> list[str]:
        return sorted({self.formats[lin.name] for lin in self.quantized})

    @property
    def quant_algo(self) -> str | None:
        fmts = self.quant_formats
        if not fmts:
            return None
        return QUANT_ALGO[fmts[0]] if len(fmts) == 1 else "MIXED_PRECISION"

    @property
    def conv1d_modules(self) -> list[str]:
        return [f"{self.arch.layer_prefix(i)}.mixer.conv1d" for i in self.arch.layers_of(MAMBA)]

    @property
    def kv_scale_tensors(self) -> list[str]:
        if not self.kv_cache:
            return []
        out = []
        for i in self.arch.layers_of(ATTENTION):
            p = f"{self.arch.layer_prefix(i)}.mixer"
            out += [f"{p}.k_proj.k_scale", f"{p}.v_proj.v_scale"]
        return out

    def exclude_modules(self) -> list[str]:
        """Modules left unquantized, named as NVIDIA's checkpoints name them: every BF16 linear layer and
        every Mamba conv1d (the router is not a linear module in the checkpoint's code and is not listed)."""
        names = [lin.name for lin in self.arch.linears if self.formats[lin.name] == "bf16"]
        return names + self.conv1d_modules

    def quantized_layers(self) -> dict[str, dict]:
        """Per-layer formats for MIXED_PRECISION exports, as TensorRT-LLM and vLLM read them."""
        out = {}
        for lin in self.quantized:
            fmt = self.formats[lin.name]
            entry = {"quant_algo": QUANT_ALGO[fmt]}
            if fmt == "nvfp4":
                entry["group_size"] = NVFP4_GROUP
            out[lin.name] = entry
        return out

    def hf_quant_config(self, producer: dict | None = None) -> dict:
        """The `hf_quant_config.json` this plan exports (ModelOpt's nested shape)."""
        q: dict = {"quant_algo": self.quant_algo,
                   "kv_cache_quant_algo": QUANT_ALGO[self.kv_cache] if self.kv_cache else None}
        if "nvfp4" in self.quant_formats:
            q["group_size"] = NVFP4_GROUP
        q["exclude_modules"] = self.exclude_modules()
        if self.quant_algo == "MIXED_PRECISION":
            q["quantized_layers"] = self.quantized_layers()
        return {"producer": producer or {"name": "omniq"}, "quantization": q}

    # ----- sizes ------------------------------------------------------------------------------------
    @cached_property
    def bytes_by_format(self) -> dict[str, int]:
        """Bytes on disk of the language model by format: linear weights (with their scales) per format,
        and `other` for everything that is not a linear weight (embeddings, norms, Mamba parameters,
        router, biases, KV scales)."""
        out = {f: 0 for f in FORMATS}
        linear_weights = set()
        for lin in self.arch.linears:
            fmt = self.formats[lin.name]
            out[fmt] += weight_bytes(fmt, lin.out_features, lin.in_features)
            linear_weights.add(f"{lin.name}.weight")
        other = sum(tensor_bytes(t.dtype, t.numel) for t in self.arch.tensors if t.name not in linear_weights)
        out["other"] = other + _SCALAR * len(self.kv_scale_tensors)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_format.values())

    @property
    def params(self) -> int:
        return self.arch.num_params

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params


def make_plan(arch: Arch, recipe: Recipe) -> LayerPlan:
    recipe.check_against(arch)
    return LayerPlan(arch, recipe)
