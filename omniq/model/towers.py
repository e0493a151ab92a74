"""The towers and projectors of an Omni checkpoint, as plain torch functions over its tensors.

omniq never runs a checkpoint's own modeling code to get image or audio embeddings: calibration and
validation call these functions on the tensors read from the safetensors files (float32 arithmetic, BF16
weights upcast). They mirror the layout of Nemotron 3 Nano Omni at any width:

- vision tower (`vision_model.radio_model.`): a RADIO-style ViT. Input conditioner (mean / std), linear patch
  embedder over `(c, y, x)`-ordered patches, learned position embedding for the one tile size
  (`force_image_size`; RADIO interpolates its position table for other sizes, omniq resizes images to the
  tile instead), class tokens, pre-norm blocks (LayerNorm, fused `qkv` attention, GELU MLP), no final norm;
  the class tokens are dropped.
- vision projector (`mlp1.`): pixel shuffle (`downsample_ratio` 0.5, `ps_version` v2, as vLLM's
  `NemotronH_Nano_VL_V2.pixel_shuffle`), then `mlp1.0` RMSNorm, `mlp1.1` linear, ReLU^2, `mlp1.3` linear.
- audio encoder (`sound_encoder.encoder.`): Parakeet-style conformer over log-mel features. Conv2d
  subsampling (stride-2 stages: a full conv, then depthwise + pointwise pairs) and a linear to the width;
  blocks of half-step feed-forward, self-attention, convolution module (pointwise, GLU, depthwise,
  batch norm with stored running statistics, SiLU, pointwise), half-step feed-forward, LayerNorm.
  Simplification against Parakeet: attention has no relative position encoding (the subsampling and the
  depthwise convolutions carry position); recorded in the checkpoint's config as `"position_encoding": "none"`.
- audio projector (`sound_projection.`): RMSNorm, linear, ReLU^2, linear (vLLM maps it to
  `sound_encoder.projection`).

`tower_tensors(cfg)` lists every tensor these functions read, with its shape, so the bundled checkpoint's
builder and the layout checks share one description.

Two layouts, one API. The functions above are the simplified layout of omniq's first bundled `tiny-omni`
(kept while tests and goldens use it). The real Nemotron 3 Nano Omni layout (C-RADIO with register tokens and
a CPE position table; Parakeet with relative-position attention and per-feature normalised mel) is run by
transformers' own `RadioModel` and `ParakeetEncoder` (`omniq.model.radio`, `omniq.model.parakeet`, which say
where each fact comes from). A config with `vision_config.args` (vLLM's RADIO config) is the real vision
layout; a `sound_config` without `"position_encoding": "none"` is the real audio layout. `vision_spec`,
`sound_spec`, `image_embeds`, `audio_embeds`, `vision_tensors`, `sound_tensors`, `tower_tensors` and
`check_supported` pick the layout from the config / spec, so calibration, validation and deployment call the
same functions for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniq.model import parakeet, radio
# the pieces both layouts share; re-exported here, where callers have always found them
from omniq.model.tower_parts import (PROJECTOR, SOUND, SOUND_PROJECTOR, VISION, AudioSpec,  # noqa: F401
                                     TileGeometry, hf_module, pixel_shuffle, projector_tensors, relu2,
                                     sound_projector, sound_projector_tensors, vision_projector, vit_block_tensors)
from omniq.model.tower_parts import attention as _attention, f32 as _f, layer_norm as _layer_norm, linear as _linear

VIT = VISION + "model."


@dataclass(frozen=True)
class VisionSpec(TileGeometry):
    image_size: int             # one tile, square (force_image_size)
    patch_size: int
    width: int                  # vit_hidden_size
    layers: int
    heads: int
    mlp_width: int
    cls_tokens: int
    eps: float
    downsample_ratio: float
    ps_version: str
    projector_width: int        # projector_hidden_size
    llm_hidden: int


@dataclass(frozen=True)
class SoundSpec(AudioSpec):
    """The simplified conformer (clips zero-padded to `clip_samples`)."""

    eps: float = 1e-5
    projection_eps: float = 1e-5

    def frames(self, samples: int) -> int:
        """Feature frames of a clip (centred STFT)."""
        return 1 + samples // self.hop_length

    def tokens(self, frames: int) -> int:
        """Encoder outputs for `frames` feature frames (each stride-2 stage: kernel 3, padding 1)."""
        for _ in range(self.stages):
            frames = (frames - 1) // 2 + 1
        return frames


def _unsupported(part: str, detail: str):
    from omniq.errors import OmniqError

    return OmniqError(f"{part}: {detail}; omniq runs the real Omni towers (transformers' RadioModel and "
                      "ParakeetEncoder) and the simplified layout of its first tiny-omni, and this checkpoint "
                      "matches neither, so its image / audio embeddings cannot be computed here; calibrate on "
                      "text only (--calib-mix text:1)")


def vision_spec(cfg: dict):
    """The vision tower's spec: `radio.RadioSpec` for the real layout, `VisionSpec` for the simplified one."""
    try:
        return radio.spec(cfg) if radio.is_radio(cfg) else _vision_spec(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise _unsupported("vision_config", f"no usable {e}") from None


def sound_spec(cfg: dict):
    """The audio encoder's spec: `parakeet.ParakeetSpec` for the real layout, `SoundSpec` for the simplified one."""
    try:
        return parakeet.spec(cfg) if parakeet.is_parakeet(cfg) else _sound_spec(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise _unsupported("sound_config", f"no usable {e}") from None


def check_supported(cfg: dict, names) -> None:
    """The checkpoint's tower and projector tensors are exactly the ones these functions read."""
    want = tower_tensors(cfg)
    have = {n for n in names if n.startswith((VISION, PROJECTOR, "sound_encoder.", SOUND_PROJECTOR))}
    have -= {n for n in have if n.startswith(parakeet.NOT_READ)}          # extractor buffers, never read
    optional = {n for n in want if n.endswith(parakeet.OPTIONAL)}
    extra, missing = sorted(have - set(want)), sorted(set(want) - have - optional)
    if extra or missing:
        name = extra[0] if extra else missing[0]
        raise _unsupported("towers", f"tensor {name} is {'not expected' if extra else 'missing'}")


def _vision_spec(cfg: dict) -> VisionSpec:
    v = cfg["vision_config"]
    return VisionSpec(
        image_size=int(cfg.get("force_image_size") or v["image_size"]),
        patch_size=int(cfg.get("patch_size") or v["patch_size"]),
        width=int(cfg.get("vit_hidden_size") or v["hidden_size"]),
        layers=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
        mlp_width=int(v["intermediate_size"]), cls_tokens=int(v.get("num_cls_tokens", 1)),
        eps=float(v.get("layer_norm_eps", 1e-6)), downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        ps_version=str(cfg.get("ps_version", "v2")), projector_width=int(cfg["projector_hidden_size"]),
        llm_hidden=int(cfg["llm_config"]["hidden_size"]))


def _sound_spec(cfg: dict) -> SoundSpec:
    s = cfg["sound_config"]
    return SoundSpec(
        mel_bins=int(s["num_mel_bins"]), width=int(s["hidden_size"]), layers=int(s["num_hidden_layers"]),
        heads=int(s["num_attention_heads"]), ff_width=int(s["intermediate_size"]),
        conv_kernel=int(s["conv_kernel_size"]), subsampling_factor=int(s["subsampling_factor"]),
        subsampling_channels=int(s["subsampling_conv_channels"]),
        projector_width=int(s["projection_hidden_size"]), projection_bias=bool(s.get("projection_bias", True)),
        llm_hidden=int(cfg["llm_config"]["hidden_size"]), sampling_rate=int(s["sampling_rate"]),
        n_fft=int(s["n_fft"]), win_length=int(s["win_length"]), hop_length=int(s["hop_length"]),
        clip_samples=int(round(float(s["clip_duration_s"]) * int(s["sampling_rate"]))))


# ----- tensor inventory ---------------------------------------------------------------------------------
def vision_tensors(v) -> dict[str, tuple[int, ...]]:
    if isinstance(v, radio.RadioSpec):
        return radio.checkpoint_tensors(v)
    c, p = v.width, v.patch_size
    t = {f"{VISION}input_conditioner.norm_mean": (3, 1, 1), f"{VISION}input_conditioner.norm_std": (3, 1, 1),
         f"{VIT}patch_generator.embedder.weight": (c, 3 * p * p),
         f"{VIT}patch_generator.pos_embed": (1, v.grid * v.grid, c),
         f"{VIT}patch_generator.cls_token.token": (v.cls_tokens, c)}
    for i in range(v.layers):
        t.update(vit_block_tensors(f"{VIT}blocks.{i}.", c, v.mlp_width))
    t.update(projector_tensors(c * v.shuffle ** 2, v.projector_width, v.llm_hidden))
    return t


def sound_tensors(s) -> dict[str, tuple[int, ...]]:
    if isinstance(s, parakeet.ParakeetSpec):
        return parakeet.checkpoint_tensors(s)
    c, ch = s.width, s.subsampling_channels
    t = {f"{SOUND}subsampling.layers.0.weight": (ch, 1, 3, 3), f"{SOUND}subsampling.layers.0.bias": (ch,)}
    for k in range(1, s.stages):
        dw, pw = 3 * k - 1, 3 * k          # layers: conv, relu, [dw, pw, relu] * (stages - 1)
        t.update({f"{SOUND}subsampling.layers.{dw}.weight": (ch, 1, 3, 3), f"{SOUND}subsampling.layers.{dw}.bias": (ch,),
                  f"{SOUND}subsampling.layers.{pw}.weight": (ch, ch, 1, 1), f"{SOUND}subsampling.layers.{pw}.bias": (ch,)})
    freq = s.mel_bins
    for _ in range(s.stages):
        freq = (freq - 1) // 2 + 1
    t.update({f"{SOUND}subsampling.linear.weight": (c, ch * freq), f"{SOUND}subsampling.linear.bias": (c,)})
    for i in range(s.layers):
        b = f"{SOUND}layers.{i}."
        for ff in ("feed_forward1", "feed_forward2"):
            t.update({f"{b}{ff}.linear1.weight": (s.ff_width, c), f"{b}{ff}.linear1.bias": (s.ff_width,),
                      f"{b}{ff}.linear2.weight": (c, s.ff_width), f"{b}{ff}.linear2.bias": (c,)})
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.update({f"{b}self_attn.{proj}.weight": (c, c), f"{b}self_attn.{proj}.bias": (c,)})
        t.update({f"{b}conv.pointwise_conv1.weight": (2 * c, c, 1), f"{b}conv.pointwise_conv1.bias": (2 * c,),
                  f"{b}conv.depthwise_conv.weight": (c, 1, s.conv_kernel), f"{b}conv.depthwise_conv.bias": (c,),
                  f"{b}conv.norm.weight": (c,), f"{b}conv.norm.bias": (c,),
                  f"{b}conv.norm.running_mean": (c,), f"{b}conv.norm.running_var": (c,),
                  f"{b}conv.pointwise_conv2.weight": (c, c, 1), f"{b}conv.pointwise_conv2.bias": (c,)})
        for norm in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            t.update({f"{b}{norm}.weight": (c,), f"{b}{norm}.bias": (c,)})
    t.update(sound_projector_tensors(s))
    return t


def tower_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tower and projector tensor of an Omni config (this module's layout), name -> shape."""
    out = {}
    if cfg.get("vision_config"):
        out.update(vision_tensors(vision_spec(cfg)))
    if cfg.get("sound_config"):
        out.update(sound_tensors(sound_spec(cfg)))
    return out


# ----- vision -------------------------------------------------------------------------------------------
def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, 3, H, W) -> (n, H/p * W/p, 3 * p * p), patches in row-major order, each flattened as (c, y, x)."""
    n, c, H, W = pixels.shape
    x = pixels.reshape(n, c, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (H // patch) * (W // patch), c * patch * patch)


def vision_tower(v: VisionSpec, w, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1], (n, 3, S, S) with S = image_size -> patch features (n, grid^2, width)."""
    if pixels.shape[-2:] != (v.image_size, v.image_size):
        raise ValueError(f"vision tower expects {v.image_size}x{v.image_size} tiles, got {tuple(pixels.shape[-2:])}")
    x = (pixels.float() - _f(w, f"{VISION}input_conditioner.norm_mean")) / _f(w, f"{VISION}input_conditioner.norm_std")
    x = F.linear(patchify(x, v.patch_size), _f(w, f"{VIT}patch_generator.embedder.weight"))
    x = x + _f(w, f"{VIT}patch_generator.pos_embed")
    cls = _f(w, f"{VIT}patch_generator.cls_token.token").expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(v.layers):
        b = f"{VIT}blocks.{i}"
        q, k, val = _linear(w, f"{b}.attn.qkv", _layer_norm(w, f"{b}.norm1", x, v.eps)).chunk(3, dim=-1)
        x = x + _linear(w, f"{b}.attn.proj", _attention(q, k, val, v.heads))
        h = _layer_norm(w, f"{b}.norm2", x, v.eps)
        x = x + _linear(w, f"{b}.mlp.fc2", F.gelu(_linear(w, f"{b}.mlp.fc1", h)))
    return x[:, v.cls_tokens:]


def image_embeds(v, w, pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) tiles -> (n, tokens_per_tile, llm_hidden): what replaces the image context tokens."""
    if isinstance(v, radio.RadioSpec):
        return radio.image_embeds(v, w, pixels)
    return vision_projector(v, w, vision_tower(v, w, pixels))


# ----- audio --------------------------------------------------------------------------------------------
def _batch_norm(w, name, x, eps):
    """Eval-mode batch norm over channels of (n, c, t), from the stored running statistics."""
    mean, var = _f(w, f"{name}.running_mean"), _f(w, f"{name}.running_var")
    scale = _f(w, f"{name}.weight") * torch.rsqrt(var + eps)
    return (x - mean[:, None]) * scale[:, None] + _f(w, f"{name}.bias")[:, None]


def sound_subsampling(s: SoundSpec, w, features: torch.Tensor) -> torch.Tensor:
    """Log-mel (n, frames, mel_bins) -> (n, tokens, width)."""
    p = f"{SOUND}subsampling.layers"
    x = features.float().unsqueeze(1)
    x = torch.relu(F.conv2d(x, _f(w, f"{p}.0.weight"), _f(w, f"{p}.0.bias"), stride=2, padding=1))
    for k in range(1, s.stages):
        x = F.conv2d(x, _f(w, f"{p}.{3 * k - 1}.weight"), _f(w, f"{p}.{3 * k - 1}.bias"), stride=2, padding=1,
                     groups=x.shape[1])
        x = torch.relu(F.conv2d(x, _f(w, f"{p}.{3 * k}.weight"), _f(w, f"{p}.{3 * k}.bias")))
    n, ch, t, f = x.shape
    return _linear(w, f"{SOUND}subsampling.linear", x.transpose(1, 2).reshape(n, t, ch * f))


def conformer_block(s: SoundSpec, w, i: int, x: torch.Tensor) -> torch.Tensor:
    b = f"{SOUND}layers.{i}"

    def ff(name, h):
        return _linear(w, f"{b}.{name}.linear2", F.silu(_linear(w, f"{b}.{name}.linear1", h)))

    x = x + 0.5 * ff("feed_forward1", _layer_norm(w, f"{b}.norm_feed_forward1", x, s.eps))
    h = _layer_norm(w, f"{b}.norm_self_att", x, s.eps)
    a = _attention(_linear(w, f"{b}.self_attn.q_proj", h), _linear(w, f"{b}.self_attn.k_proj", h),
                   _linear(w, f"{b}.self_attn.v_proj", h), s.heads)
    x = x + _linear(w, f"{b}.self_attn.o_proj", a)
    h = _layer_norm(w, f"{b}.norm_conv", x, s.eps).transpose(1, 2)            # (n, c, t)
    h = F.glu(F.conv1d(h, _f(w, f"{b}.conv.pointwise_conv1.weight"), _f(w, f"{b}.conv.pointwise_conv1.bias")), dim=1)
    h = F.conv1d(h, _f(w, f"{b}.conv.depthwise_conv.weight"), _f(w, f"{b}.conv.depthwise_conv.bias"),
                 padding=(s.conv_kernel - 1) // 2, groups=h.shape[1])
    h = F.silu(_batch_norm(w, f"{b}.conv.norm", h, s.eps))
    h = F.conv1d(h, _f(w, f"{b}.conv.pointwise_conv2.weight"), _f(w, f"{b}.conv.pointwise_conv2.bias"))
    x = x + h.transpose(1, 2)
    x = x + 0.5 * ff("feed_forward2", _layer_norm(w, f"{b}.norm_feed_forward2", x, s.eps))
    return _layer_norm(w, f"{b}.norm_out", x, s.eps)


def sound_tower(s: SoundSpec, w, features: torch.Tensor) -> torch.Tensor:
    """Log-mel features (n, frames, mel_bins) -> encoder states (n, tokens, width)."""
    x = sound_subsampling(s, w, features)
    for i in range(s.layers):
        x = conformer_block(s, w, i, x)
    return x


def audio_embeds(s, w, features) -> torch.Tensor:
    """(n_clips, frames, mel_bins) -> (n_clips, tokens, llm_hidden): what replaces the sound context tokens
    (real layout: also a list of clips of different lengths, see `parakeet.audio_embeds`)."""
    if isinstance(s, parakeet.ParakeetSpec):
        return parakeet.audio_embeds(s, w, features)
    return sound_projector(s, w, sound_tower(s, w, features))
