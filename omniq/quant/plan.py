"""The layer plan: which linear layer of the model gets which format, decided in exactly one place.

`plan`, `quantize` (its ModelOpt config), the exported `hf_quant_config.json` (exclude_modules /
quantized_layers), the coverage assertion and `lint` all read a `LayerPlan`. Sizes are computed from
shapes, so a plan needs only a config, never weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from omniq.errors import OmniqError
from omniq.model import names, omni
from omniq.model.arch import ATTENTION, MAMBA, Arch, Linear
from omniq.quant import formats as qformats
from omniq.quant.recipe import FORMATS, Recipe

NVFP4_GROUP = qformats.NVFP4.group_size
QUANT_ALGO = {name: f.quant_algo for name, f in qformats.FORMATS.items()}
FORMAT_OF_ALGO = {v: k for k, v in QUANT_ALGO.items()}
_SCALAR = qformats.SCALAR_BYTES


def weight_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes on disk of one linear weight and its scale tensors in a format."""
    if fmt == "bf16":
        return 2 * out_features * in_features
    if fmt in qformats.FORMATS:
        return qformats.FORMATS[fmt].stored_bytes(out_features, in_features)
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

    @cached_property
    def decided_by(self) -> dict[str, int | None]:
        """Every linear layer -> index of the recipe rule that set its format (None: the default, or
        lm_head, which is always BF16)."""
        return {lin.name: self.recipe.decided_by(lin, self.arch) for lin in self.arch.linears}

    @cached_property
    def rule_counts(self) -> list[int]:
        """How many layers each recipe rule decides (first match wins, so a later rule can get none)."""
        counts = [0] * len(self.recipe.rules)
        for i in self.decided_by.values():
            if i is not None:
                counts[i] += 1
        return counts

    @property
    def warnings(self) -> list[str]:
        """Things the user probably did not mean, that are not errors (a recipe fits every layout)."""
        out = []
        for i, (rule, n) in enumerate(zip(self.recipe.rules, self.rule_counts)):
            if n == 0:
                what = ", ".join(list(rule.select) + list(rule.modules))
                out.append(f"recipe {self.recipe.name}: rules[{i}] ({what} -> {rule.format}) decides no layer "
                           f"of this model (nothing matches, or an earlier rule takes them)")
        return out

    @property
    def quant_formats(self) -> list[str]:
        return sorted({self.formats[lin.name] for lin in self.quantized})

    @property
    def quant_algo(self) -> str | None:
        return qformats.quant_algo_of(self.quant_formats)

    @property
    def conv1d_modules(self) -> list[str]:
        return [f"{self.arch.layer_prefix(i)}.mixer.conv1d" for i in self.arch.layers_of(MAMBA)]

    @property
    def kv_scale_tensors(self) -> list[str]:
        if not self.kv_cache:
            return []
        out = []
        for i in self.arch.layers_of(ATTENTION):
            out += list(names.kv_scales(f"{self.arch.layer_prefix(i)}.mixer").values())
        return out

    @property
    def tower_modules(self) -> list[str]:
        """Inside an Omni checkpoint: the vision/audio towers and projectors, as prefix wildcards (the form
        ModelOpt's own export summarises excluded subtrees into, matched with fnmatch by TensorRT-LLM)."""
        if self.arch.prefix != omni.LLM_PREFIX:
            return []
        return [f"{prefix}*" for prefix in omni.TOWER_PREFIXES.values()]

    def exclude_modules(self) -> list[str]:
        """Modules left unquantized, named as NVIDIA's checkpoints name them: every BF16 linear layer and
        every Mamba conv1d (the router is not a linear module in the checkpoint's code and is not listed);
        in an Omni checkpoint also the towers and projectors (`vision_model.*`, ...)."""
        names = [lin.name for lin in self.arch.linears if self.formats[lin.name] == "bf16"]
        return names + self.conv1d_modules + self.tower_modules

    def quantized_layers(self) -> dict[str, dict]:
        """Per-layer formats for MIXED_PRECISION exports, as TensorRT-LLM and vLLM read them."""
        return {lin.name: qformats.layer_declaration(self.formats[lin.name]) for lin in self.quantized}

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
    def original_bytes(self) -> int:
        """Bytes of the same language model unquantized (BF16, the router's fp32 tensors fp32)."""
        return sum(tensor_bytes(t.dtype, t.numel) for t in self.arch.tensors)

    @property
    def params(self) -> int:
        return self.arch.num_params

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params


def check_experts_share_formats(plan: LayerPlan) -> None:
    """All routed experts of one layer get one format per projection: ModelOpt quantizes transformers' fused
    experts with a single input quantizer per projection and layer (`omniq.quant.modelopt_config`), so
    `quantize` could not make anything else; refusing it here keeps `plan` from promising it."""
    by_proj: dict[tuple[int | None, str], set[str]] = {}
    for lin in plan.arch.linears:
        if lin.expert is not None:
            by_proj.setdefault((lin.layer, lin.role), set()).add(plan.formats[lin.name])
    for (layer, role), fmts in by_proj.items():
        if len(fmts) > 1:
            raise OmniqError(f"recipe {plan.recipe.name}: the routed experts of layer {layer} get different "
                             f"formats for {role} ({', '.join(sorted(fmts))}); all experts of a layer must "
                             "share a format per projection (one ModelOpt input quantizer serves them all)")


def make_plan(arch: Arch, recipe: Recipe) -> LayerPlan:
    """The one decision of what is quantized: the recipe checked against the model, then applied."""
    recipe.check_against(arch)
    plan = LayerPlan(arch, recipe)
    check_experts_share_formats(plan)
    return plan
