"""What both tower layouts share (omniq's simplified `tiny-omni` layout in `towers`, the real Nemotron 3 Nano
Omni layout in `radio` / `parakeet`): the tensor prefixes, the tile and clip geometry of the specs, the
inventory of the projectors and of a RADIO ViT block, the projectors themselves, and the plain-torch pieces
they are made of. It sits below all three so that `towers` can pick a layout (and import `radio` /
`parakeet`) while those build on the same pieces, with imports running one way."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

VISION = "vision_model.radio_model."
PROJECTOR = "mlp1."
SOUND = "sound_encoder.encoder."
SOUND_PROJECTOR = "sound_projection."


# ----- geometry -----------------------------------------------------------------------------------------
class TileGeometry:
    """Patch grid and tokens of one square tile (both vision layouts): `image_size`, `patch_size`,
    `downsample_ratio` come from the spec."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle(self) -> int:
        return int(round(1 / self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        return (self.grid // self.shuffle) ** 2


@dataclass(frozen=True)
class AudioSpec:
    """The fields both audio layouts have (`towers.SoundSpec`, `parakeet.ParakeetSpec`); each layout says how
    many feature frames a clip gives (`frames`) and how many encoder outputs those give (`tokens`)."""

    mel_bins: int
    width: int
    layers: int
    heads: int
    ff_width: int
    conv_kernel: int
    subsampling_factor: int
    subsampling_channels: int
    projector_width: int
    projection_bias: bool
    llm_hidden: int
    sampling_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    clip_samples: int           # audio is cut into clips of this many samples

    @property
    def stages(self) -> int:
        return int(math.log2(self.subsampling_factor))

    def frames(self, samples: int) -> int:
        raise NotImplementedError

    def tokens(self, frames: int) -> int:
        raise NotImplementedError

    @property
    def tokens_per_clip(self) -> int:
        return self.tokens(self.frames(self.clip_samples))


# ----- tensor inventory ---------------------------------------------------------------------------------
def vit_block_tensors(b: str, c: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """One RADIO ViT block's tensors under prefix `b` (the original RADIO / timm names, both layouts)."""
    return {f"{b}norm1.weight": (c,), f"{b}norm1.bias": (c,),
            f"{b}attn.qkv.weight": (3 * c, c), f"{b}attn.qkv.bias": (3 * c,),
            f"{b}attn.proj.weight": (c, c), f"{b}attn.proj.bias": (c,),
            f"{b}norm2.weight": (c,), f"{b}norm2.bias": (c,),
            f"{b}mlp.fc1.weight": (mlp, c), f"{b}mlp.fc1.bias": (mlp,),
            f"{b}mlp.fc2.weight": (c, mlp), f"{b}mlp.fc2.bias": (c,)}


def projector_tensors(shuffled: int, width: int, llm_hidden: int) -> dict[str, tuple[int, ...]]:
    """`mlp1`: RMSNorm over the pixel-shuffled width, two linears without bias (vLLM's nn.Sequential indices)."""
    return {f"{PROJECTOR}0.weight": (shuffled,), f"{PROJECTOR}1.weight": (width, shuffled),
            f"{PROJECTOR}3.weight": (llm_hidden, width)}


def sound_projector_tensors(s: AudioSpec) -> dict[str, tuple[int, ...]]:
    """`sound_projection`: RMSNorm over the encoder width, two linears (biases when `projection_bias`)."""
    t = {f"{SOUND_PROJECTOR}norm.weight": (s.width,),
         f"{SOUND_PROJECTOR}linear1.weight": (s.projector_width, s.width),
         f"{SOUND_PROJECTOR}linear2.weight": (s.llm_hidden, s.projector_width)}
    if s.projection_bias:
        t[f"{SOUND_PROJECTOR}linear1.bias"] = (s.projector_width,)
        t[f"{SOUND_PROJECTOR}linear2.bias"] = (s.llm_hidden,)
    return t


def hf_module(model_cls, config, device: str = "meta"):
    """A transformers model built from `config` on `device` (`meta`: shapes only, no memory), eval mode, SDPA."""
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return model_cls(config).eval()


# ----- plain-torch pieces -------------------------------------------------------------------------------
def f32(w: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return w[name].float()


def linear(w, name, x, bias=True):
    return F.linear(x, f32(w, f"{name}.weight"), f32(w, f"{name}.bias") if bias else None)


def layer_norm(w, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), f32(w, f"{name}.weight"), f32(w, f"{name}.bias"), eps)


def rms_norm(w, name, x, eps):
    return f32(w, f"{name}.weight") * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def attention(q, k, v, heads):
    b, L, c = q.shape
    q, k, v = (t.reshape(b, L, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=(c // heads) ** -0.5)
    return o.transpose(1, 2).reshape(b, L, c)


def relu2(x):
    return torch.relu(x).square()


# ----- projectors ---------------------------------------------------------------------------------------
def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """(n, w, h, c) -> (n, h*scale, w*scale, c/scale^2), as InternVL / Nemotron VL do it."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def vision_projector(v: TileGeometry, w, features: torch.Tensor) -> torch.Tensor:
    """Tower features (n, grid^2, width) -> language-model embeddings (n, tokens_per_tile, llm_hidden)."""
    n = features.shape[0]
    x = pixel_shuffle(features.reshape(n, v.grid, v.grid, -1), v.downsample_ratio, v.ps_version)
    x = x.reshape(n, -1, x.shape[-1])
    x = rms_norm(w, f"{PROJECTOR}0", x, 1e-5)
    x = relu2(F.linear(x, f32(w, f"{PROJECTOR}1.weight")))
    return F.linear(x, f32(w, f"{PROJECTOR}3.weight"))


def sound_projector(s: AudioSpec, w, states: torch.Tensor) -> torch.Tensor:
    x = rms_norm(w, f"{SOUND_PROJECTOR}norm", states, s.projection_eps)
    x = relu2(linear(w, f"{SOUND_PROJECTOR}linear1", x, s.projection_bias))
    return linear(w, f"{SOUND_PROJECTOR}linear2", x, s.projection_bias)
