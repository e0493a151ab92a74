"""The name codec: how NemotronH tensors and modules are spelled, in one place (next to arch.py, which says
which ones exist). Every stage asks here instead of spelling a pattern itself.

Spellings of one tensor:
- hub layout (NVIDIA's checkpoints, omniq's exports): `backbone.layers.{i}.mixer.experts.{e}.up_proj.weight`,
  `backbone.embeddings.weight`; inside a Nemotron 3 Nano Omni checkpoint with the `language_model.` prefix;
- transformers 5 (`NemotronHForCausalLM` parameters and modules): `model.` for `backbone.`, routed experts
  fused into 3-D `model.layers.{i}.mixer.experts.up_proj` / `down_proj`; its `save_pretrained` (and ModelOpt's
  export through it) writes the embedding as `backbone.embedding.weight`;
- engines: TensorRT-LLM matches exclude names with `backbone.` rewritten to `model.`, Omni names with or
  without `language_model.`.
Per layer: the router is `mixer.gate` (`weight`, `e_score_correction_bias`), the FP8 KV-cache scales are
`mixer.k_proj.k_scale` / `mixer.v_proj.v_scale` of an attention layer.
"""

from __future__ import annotations

import re

LLM_PREFIX = "language_model."      # an Omni checkpoint's language model tensors
HUB = "backbone."
NATIVE = "model."
# the spellings some writers use for a hub-layout tensor -> the hub name
ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}
EXPERT_PROJS = ("up_proj", "down_proj")
ROUTER = "mixer.gate"               # a MoE layer's router module, relative to its decoder layer
NATIVE_EMBEDDINGS = NATIVE + "embeddings"      # transformers' embedding module (hub: `backbone.embeddings`)
QKV = ("q_proj", "k_proj", "v_proj")            # an attention mixer's input projections
_FUSED_EXPERT = re.compile(r"^(?P<base>.*\.mixer\.experts)\.(?P<proj>up_proj|down_proj)(?:\.weight)?$")
_EXPERT = re.compile(r"\.layers\.(\d+)\.mixer\.experts\.(\d+)\.")


def without_prefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def hub_local(native: str) -> str:
    """A transformers / ModelOpt name without any Omni prefix -> its hub spelling (`model.` -> `backbone.`,
    the embedding alias resolved)."""
    name = HUB + native[len(NATIVE):] if native.startswith(NATIVE) else native
    return ALIASES.get(name, name)


def hub_from_native(native: str, prefix: str = "", expert: int | None = None) -> str:
    """transformers' parameter name -> the checkpoint's tensor name; `expert` picks one routed expert out of
    a fused `experts.up_proj` / `experts.down_proj` parameter."""
    name = hub_local(without_prefix(native, prefix))
    if expert is not None and name.endswith(tuple(f"experts.{p}" for p in EXPERT_PROJS)):
        base, proj = name.rsplit(".", 1)
        name = expert_weight(base, expert, proj)
    return prefix + name


def native_module(hub_name: str, prefix: str = "") -> str:
    """Hub-layout module name -> transformers 5 module name (`backbone.` -> `model.`, experts fused)."""
    name = without_prefix(hub_name, prefix)
    if name.startswith(HUB):
        name = NATIVE + name[len(HUB):]
    parts = name.split(".")
    if "experts" in parts:
        k = parts.index("experts")
        if k + 1 < len(parts) and parts[k + 1].isdigit():
            # model.layers.i.mixer.experts.{e}.up_proj -> model.layers.i.mixer.experts (up_proj[e])
            name = ".".join(parts[: k + 1])
    return name


def native_layer(i: int) -> str:
    """transformers' module name of decoder layer `i` (hub: `backbone.layers.{i}`)."""
    return f"{NATIVE}layers.{i}"


def is_router_weight(name: str) -> bool:
    """The router's weight (`....mixer.gate.weight`), in any spelling."""
    return name.endswith(f"{ROUTER}.weight")


def is_router(module: str) -> bool:
    return module == ROUTER or module.endswith(f".{ROUTER}")


def qkv(attention_mixer: str) -> list[str]:
    """An attention layer's mixer module -> its q / k / v projection modules (one fused GEMM in the engines)."""
    return [f"{attention_mixer}.{p}" for p in QKV]


def experts_glob(expert_module: str) -> str:
    """A routed expert's module (`....mixer.experts.{e}.up_proj`) -> the glob of its layer's experts."""
    return expert_module.rsplit(".experts.", 1)[0] + ".experts.*"


def fused_expert(local: str) -> tuple[str, str] | None:
    """`....mixer.experts.up_proj[.weight]` (a fused 3-D tensor's name) -> (`....mixer.experts`, `up_proj`)."""
    m = _FUSED_EXPERT.match(local)
    return (m["base"], m["proj"]) if m else None


def expert_weight(experts_module: str, e: int, proj: str) -> str:
    return f"{experts_module}.{e}.{proj}.weight"


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed expert's module or tensor name, else None."""
    m = _EXPERT.search(name + ".")
    return (int(m[1]), int(m[2])) if m else None


def experts_module_pattern(layer: int) -> re.Pattern:
    """The (native or hub) name of MoE layer `layer`'s experts container module."""
    return re.compile(rf"(^|\.)layers\.{layer}\.mixer\.experts$")


KV_SCALE_SUFFIXES = {"k": "k_scale", "v": "v_scale"}     # on `mixer.k_proj` / `mixer.v_proj`


def kv_scales(attention_mixer: str) -> dict[str, str]:
    """An attention layer's mixer module -> {"k": its K-cache scale tensor, "v": its V-cache scale tensor}."""
    return {w: f"{attention_mixer}.{w}_proj.{s}" for w, s in KV_SCALE_SUFFIXES.items()}


def hub_spellings(declared: str, is_omni: bool, component_of) -> list[str]:
    """The spellings of a name declared in a quantization config, in the hub layout: `model.` -> `backbone.`
    (TensorRT-LLM's rewrite), and inside an Omni checkpoint the language model's names with and without
    `language_model.` (`component_of(name) == "other"` marks a language-model name)."""
    out = [declared]
    for a, b in ((NATIVE, HUB), (LLM_PREFIX + NATIVE, LLM_PREFIX + HUB)):
        if declared.startswith(a):
            out.append(b + declared[len(a):])
    if is_omni:
        for v in list(out):
            if not v.startswith(LLM_PREFIX) and component_of(v) == "other" and not v.startswith("*"):
                out.append(LLM_PREFIX + v)
    return out


def engine_spellings(name: str, prefix: str) -> list[str]:
    """How an engine may spell a module it matches exclude names against: with or without the Omni prefix,
    and with `backbone.` rewritten to `model.` (TensorRT-LLM)."""
    out = [name]
    if prefix and name.startswith(prefix):
        out.append(name[len(prefix):])
    out += [n.replace(HUB, NATIVE, 1) for n in list(out) if HUB in n]
    return out
