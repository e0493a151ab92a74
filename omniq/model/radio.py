"""The real Omni's vision path: C-RADIO (transformers' `RadioModel`) + pixel shuffle + the `mlp1` projector.

What comes from where:
- The tower is transformers' own `RadioModel` (transformers 5.14, `models/radio`; its docs name
  `nvidia/C-RADIOv4-H`). omniq builds it from the Omni config and runs it with the checkpoint's tensors
  (`torch.func.functional_call`, no copy of the weights, no checkpoint code).
- The checkpoint's tensor names (`vision_model.radio_model.*`) are the original RADIO names. Their mapping onto
  `RadioModel`'s modules is transformers' own conversion table for `radio` (`conversion_mapping.py`:
  `patch_generator.embedder` -> `embeddings.patch_projection`, `pos_embed` -> `embeddings.position_embedding`,
  `cls_token.token` -> `embeddings.cls_register_token`, `blocks` -> `encoder.layer`, `attn.proj` ->
  `attention.output.dense`, fused `attn.qkv` chunked into `attention.attention.{query,key,value}`,
  `input_conditioner`, `summary_idxs`); `video_embedder` (video tubelets) has no module in `RadioModel` and is
  not read for images. omniq re-expresses that table in `hf_name` below because transformers applies it only
  inside `from_pretrained` on a directory of RADIO weights, not to an Omni checkpoint's prefixed names.
- Which config keys give the tower's shape is vLLM's loader (`vllm/model_executor/models/nano_nemotron_vl.py`
  `get_vit_model_from_radio_config`, `vllm/transformers_utils/configs/radio.py`): `vision_config.args.model` is a
  timm name whose (width, layers, heads, mlp) come from a fixed table (`vit_huge_patch16_224` = 1280, 32, 16,
  5120: C-RADIOv4-H's ViT-H/16, as in shared/reference/omni-layout.md); `args.cpe_max_size` sizes the position
  table; class tokens are one per teacher when `args.cls_token_per_teacher`, plus registers up to
  `args.register_multiple`; `norm_mean` / `norm_std` are top-level keys. A config may give `hidden_size`,
  `num_hidden_layers`, `num_attention_heads`, `intermediate_size` inside `args` (the bundled tiny Omni does:
  its ViT is not a timm size); they win over the table, as PretrainedConfig's extra kwargs do in vLLM's class.
- The glue after the tower is vLLM's `NemotronH_Nano_VL_V2.extract_feature`: features (tiles, grid, grid,
  width) -> `pixel_shuffle` (`downsample_ratio`, `ps_version` v2 swaps back) -> `mlp1` = RMSNorm (eps 1e-5),
  Linear (no bias), ReLU^2, Linear (no bias), tensor names `mlp1.0`, `mlp1.1`, `mlp1.3`.
- Tiles: `force_image_size` square tiles (InternVL dynamic tiling, `omniq.calib.media.image_tiles`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from omniq.model import tower_parts as parts
from omniq.model.tower_parts import PROJECTOR, VISION  # noqa: F401

# vLLM's VIT_TIMM_DIM_BY_NAME: timm name -> (width, layers, heads, mlp width)
TIMM_DIMS = {
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class RadioSpec(parts.TileGeometry):
    image_size: int             # one tile, square (force_image_size)
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    cls_tokens: int
    registers: int
    cpe_max_size: int
    video_temporal_patch_size: int
    downsample_ratio: float
    ps_version: str
    projector_width: int
    llm_hidden: int
    norm_mean: tuple
    norm_std: tuple
    eps: float = 1e-6
    max_tiles: int = 12
    use_thumbnail: bool = True

    @property
    def positions(self) -> int:
        side = int(round(self.cpe_max_size / self.patch_size))
        return side * side


def is_radio(cfg: dict) -> bool:
    """The config describes the real C-RADIO tower (vLLM's `vision_config.args`), not omniq's simplified one."""
    v = cfg.get("vision_config")
    return isinstance(v, dict) and isinstance(v.get("args"), dict)


def spec(cfg: dict) -> RadioSpec:
    v = cfg["vision_config"]
    args = v["args"]
    name = args.get("model")
    if name not in TIMM_DIMS and "hidden_size" not in args:
        raise ValueError(f"vision_config.args.model {name!r} (known: {', '.join(TIMM_DIMS)})")
    width, layers, heads, mlp = TIMM_DIMS.get(name, (None, None, None, None))
    width = int(args.get("hidden_size", width))
    teachers = args.get("teachers") or []
    cls = len({t["name"] for t in teachers}) if args.get("cls_token_per_teacher") and teachers else 1
    multiple = args.get("register_multiple")
    registers = int(args.get("num_registers") or (multiple - cls % multiple if multiple else 0))
    pref = v.get("preferred_resolution")
    return RadioSpec(
        image_size=int(cfg.get("force_image_size") or (pref[0] if pref else 224)),
        patch_size=int(cfg.get("patch_size") or v.get("patch_size", 16)),
        width=width, layers=int(args.get("num_hidden_layers", layers)),
        heads=int(args.get("num_attention_heads", heads)), mlp_width=int(args.get("intermediate_size", mlp)),
        cls_tokens=cls, registers=registers, cpe_max_size=int(args.get("cpe_max_size", 2048)),
        video_temporal_patch_size=int(v.get("video_temporal_patch_size", 1)),
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)), ps_version=str(cfg.get("ps_version", "v2")),
        projector_width=int(cfg["projector_hidden_size"]), llm_hidden=int(cfg["llm_config"]["hidden_size"]),
        norm_mean=tuple(float(x) for x in cfg.get("norm_mean", OPENAI_CLIP_MEAN)),
        norm_std=tuple(float(x) for x in cfg.get("norm_std", OPENAI_CLIP_STD)),
        eps=float(args.get("layer_norm_eps", 1e-6)),
        max_tiles=int(cfg.get("max_dynamic_patch", cfg.get("max_num_tiles", 12))),
        use_thumbnail=bool(cfg.get("use_thumbnail", True)))


# ----- the checkpoint's names -----------------------------------------------------------------------------
def checkpoint_tensors(s: RadioSpec) -> dict[str, tuple[int, ...]]:
    """Every vision tower and projector tensor of the real layout (checkpoint names), name -> shape."""
    c, p = s.width, s.patch_size
    m = f"{VISION}model."
    t = {f"{VISION}input_conditioner.norm_mean": (3, 1, 1), f"{VISION}input_conditioner.norm_std": (3, 1, 1),
         f"{VISION}summary_idxs": (min(2, s.cls_tokens),),
         f"{m}patch_generator.embedder.weight": (c, 3 * p * p),
         f"{m}patch_generator.pos_embed": (1, s.positions, c),
         f"{m}patch_generator.cls_token.token": (s.cls_tokens + s.registers, c)}
    if s.video_temporal_patch_size > 1:
        t[f"{m}patch_generator.video_embedder.weight"] = (c, 3 * s.video_temporal_patch_size * p * p)
    for i in range(s.layers):
        t.update(parts.vit_block_tensors(f"{m}blocks.{i}.", c, s.mlp_width))
    t.update(parts.projector_tensors(c * s.shuffle ** 2, s.projector_width, s.llm_hidden))
    return t


# transformers' conversion table for `radio`, applied to the names after `vision_model.`
_RENAMES = (("radio_model.model.patch_generator.embedder", "embeddings.patch_projection"),
            ("radio_model.model.patch_generator.pos_embed", "embeddings.position_embedding"),
            ("radio_model.model.patch_generator.cls_token.token", "embeddings.cls_register_token"),
            ("radio_model.model.blocks", "encoder.layer"),
            ("attn.proj", "attention.output.dense"),
            ("radio_model.input_conditioner", "input_conditioner"),
            ("radio_model.summary_idxs", "summary_idxs"))
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
NOT_READ = ("patch_generator.video_embedder.",)       # video tubelets only; RadioModel has no such module


def hf_names(name: str) -> list[str] | None:
    """The `RadioModel` parameter(s) a checkpoint tensor loads into (three for a fused qkv, chunked in that
    order along dim 0); [] for a tensor images never read; None when the name is not the vision tower's."""
    if not name.startswith(VISION):
        return None
    if any(k in name for k in NOT_READ):
        return []
    n = name[len("vision_model."):]
    for old, new in _RENAMES:
        n = n.replace(old, new)
    if ".attn.qkv." in n:
        return [n.replace("attn.qkv", q) for q in QKV]
    return [n]


def radio_config(s: RadioSpec):
    from transformers import RadioConfig

    return RadioConfig(hidden_size=s.width, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                       mlp_ratio=s.mlp_width / s.width, layer_norm_eps=s.eps, patch_size=s.patch_size,
                       image_size=s.image_size, max_img_size=s.cpe_max_size, num_cls_tokens=s.cls_tokens,
                       num_registers=s.registers, summary_idxs=list(range(min(2, s.cls_tokens))),
                       norm_mean=list(s.norm_mean), norm_std=list(s.norm_std), qkv_bias=True)


def build(s: RadioSpec, device: str = "meta"):
    """transformers' RadioModel for this spec (weights uninitialised on `meta`), eval mode, SDPA attention."""
    from transformers import RadioModel

    return parts.hf_module(RadioModel, radio_config(s), device)


@functools.lru_cache(maxsize=4)
def _module(s: RadioSpec):
    return build(s, "meta")


def module_tensors(w, s: RadioSpec) -> dict:
    """RadioModel parameter / buffer name -> tensor, from the checkpoint's tensors (`w`, checkpoint names)."""
    out = {}
    for name in checkpoint_tensors(s):
        targets = hf_names(name)
        if not targets:
            continue
        t = w[name]
        parts = t.chunk(3, dim=0) if len(targets) == 3 else (t,)
        for hf, part in zip(targets, parts):
            out[hf] = part.long() if hf == "summary_idxs" else part.float()       # callers may upcast all
    for i in range(s.layers):               # C-RADIO has no LayerScale: RadioModel's identity scale (ones)
        for k in (1, 2):
            out[f"encoder.layer.{i}.layer_scale{k}.lambda1"] = None
    return out


def vision_features(s: RadioSpec, w, pixels):
    """Tiles (n, 3, S, S) in [0, 1] -> patch features (n, grid^2, width), cls and register tokens dropped."""
    import torch
    from torch.func import functional_call

    if tuple(pixels.shape[-2:]) != (s.image_size, s.image_size):
        raise ValueError(f"vision tower expects {s.image_size}x{s.image_size} tiles, got {tuple(pixels.shape[-2:])}")
    tensors = module_tensors(w, s)
    ones = torch.ones(s.width, dtype=torch.float32, device=pixels.device)
    tensors = {k: (ones if v is None else v) for k, v in tensors.items()}
    return functional_call(_module(s), tensors, (pixels.float(),), strict=True).features


def image_embeds(s: RadioSpec, w, pixels):
    """(n, 3, S, S) tiles -> (n, tokens_per_tile, llm_hidden): what replaces the image context tokens."""
    return parts.vision_projector(s, w, vision_features(s, w, pixels))          # pixel shuffle + mlp1


def tile_grid(width: int, height: int, max_tiles: int, size: int) -> tuple[int, int]:
    """InternVL's dynamic tiling: the (columns, rows) grid with at most `max_tiles` tiles whose aspect ratio is
    closest to the image's (ties go to the larger grid when the image has the pixels for it)."""
    ratios = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if i * j <= max_tiles}, key=lambda r: r[0] * r[1])
    aspect, best, best_diff = width / height, (1, 1), math.inf
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * cols * rows * size * size:
            best = (cols, rows)
    return best
