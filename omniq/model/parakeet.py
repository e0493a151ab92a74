"""The real Omni's audio path: transformers' Parakeet encoder + the `sound_projection` projector.

What comes from where:
- The encoder is transformers' own `ParakeetEncoder` (transformers 5.14, `models/parakeet`: FastConformer with
  relative-position attention, `relative_k_proj`, `bias_u`, `bias_v`), built from `sound_config` the way vLLM
  does it (`vllm/model_executor/models/parakeet.py` `ProjectedParakeet`, `ParakeetConfig.from_hf_config`):
  the sound_config's keys as a `ParakeetEncoderConfig` with `scale_input=False` and `attention_bias=False`
  (so the attention and feed-forward linears have no bias). omniq runs it with the checkpoint's tensors through
  `torch.func.functional_call` (no copy, no checkpoint code).
- Tensor names, from vLLM's `ProjectedParakeet.load_weights`: `sound_encoder.encoder.<name>` is
  `ParakeetEncoder`'s own parameter / buffer `<name>` (no renaming), `sound_encoder.encoder.feature_extractor.*`
  are the extractor's buffers and are not read (the features are computed here), `sound_projection.<name>` is
  the projector (`norm` RMSNorm with `projection_eps`, `linear1`, ReLU^2, `linear2`, biases when
  `projection_bias`). BatchNorm's `num_batches_tracked` is accepted when present (eval mode never reads it).
- Features, from vLLM's `ParakeetExtractor`: audio resampled to `sampling_rate`, cut into clips of 30 s
  (`ExtractorConfig.clip_duration_s`; vLLM does not read it from the config) with a last clip of the remainder
  (at least 0.1 s), pre-emphasis, centred STFT (Hann window of `win_length`, `n_fft`, `hop_length`), power,
  Slaney mel filters (transformers' `audio_utils.mel_filter_bank`), log(mel + 2^-24), then per-feature
  normalisation over the clip's valid frames (mean, std with n-1, +1e-5). vLLM keeps the padded trailing frame
  and masks it; omniq drops it (one clip per forward, so no mask is needed), and the token count is vLLM's:
  `ParakeetEncoder._get_subsampling_output_length(samples // hop_length)` per clip.
- Widths of the real model (shared/reference/omni-layout.md): 24 layers, width 1024, 128 mel bins,
  `projection_hidden_size` 4096.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from omniq.model import tower_parts as parts
from omniq.model.tower_parts import AudioSpec

ENCODER = parts.SOUND
PROJECTOR = parts.SOUND_PROJECTOR
NOT_READ = (f"{ENCODER}feature_extractor.",)
OPTIONAL = (".num_batches_tracked",)
CLIP_SECONDS = 30.0          # vLLM ExtractorConfig.clip_duration_s
CLIP_MIN_SECONDS = 0.1       # vLLM ExtractorConfig.clip_min_duration_s
LOG_GUARD = 2.0 ** -24
NORM_EPS = 1e-5


@dataclass(frozen=True)
class ParakeetSpec(AudioSpec):
    """The real FastConformer (clips of 30 s, the last one of the remainder)."""

    convolution_bias: bool
    subsampling_kernel: int
    subsampling_stride: int
    projection_eps: float
    preemphasis: float
    clip_min_samples: int
    hidden_act: str = "silu"

    def frames(self, samples: int) -> int:
        """Valid feature frames of a clip (vLLM's count; the centred STFT's extra frame is dropped)."""
        return samples // self.hop_length

    def tokens(self, frames: int) -> int:
        """Encoder outputs for `frames` feature frames (ParakeetEncoder._get_subsampling_output_length)."""
        pad = (self.subsampling_kernel - 1) // 2 * 2 - self.subsampling_kernel
        for _ in range(self.stages):
            frames = math.floor((frames + pad) / self.subsampling_stride + 1.0)
        return int(frames)

    def clip_sizes(self, samples: int) -> list[int]:
        """vLLM's ParakeetExtractor._clip_sizes: full clips, then the remainder (at least the minimum)."""
        samples = max(samples, self.clip_min_samples)
        full, rest = divmod(samples, self.clip_samples)
        return [self.clip_samples] * full + ([max(rest, self.clip_min_samples)] if rest else [])


def is_parakeet(cfg: dict) -> bool:
    """The config describes the real Parakeet encoder, not omniq's simplified conformer (whose sound_config
    records `"position_encoding": "none"`)."""
    s = cfg.get("sound_config")
    return isinstance(s, dict) and s.get("position_encoding") != "none"


def spec(cfg: dict) -> ParakeetSpec:
    s = cfg["sound_config"]
    rate = int(s.get("sampling_rate", 16000))
    return ParakeetSpec(
        mel_bins=int(s["num_mel_bins"]), width=int(s["hidden_size"]), layers=int(s["num_hidden_layers"]),
        heads=int(s["num_attention_heads"]), ff_width=int(s["intermediate_size"]),
        conv_kernel=int(s.get("conv_kernel_size", 9)), convolution_bias=bool(s.get("convolution_bias", True)),
        subsampling_factor=int(s.get("subsampling_factor", 8)),
        subsampling_channels=int(s["subsampling_conv_channels"]),
        subsampling_kernel=int(s.get("subsampling_conv_kernel_size", 3)),
        subsampling_stride=int(s.get("subsampling_conv_stride", 2)),
        projector_width=int(s["projection_hidden_size"]), projection_bias=bool(s.get("projection_bias", True)),
        projection_eps=float(s.get("projection_eps", 1e-5)), llm_hidden=int(cfg["llm_config"]["hidden_size"]),
        sampling_rate=rate, n_fft=int(s.get("n_fft", 512)), win_length=int(s.get("win_length", 400)),
        hop_length=int(s.get("hop_length", 160)), preemphasis=float(s.get("preemphasis", 0.97)),
        clip_samples=int(round(CLIP_SECONDS * rate)), clip_min_samples=int(round(CLIP_MIN_SECONDS * rate)),
        hidden_act=str(s.get("hidden_act", "silu")))


def encoder_config(s: ParakeetSpec):
    """The `ParakeetEncoderConfig` vLLM builds (scale_input False, attention_bias False)."""
    from transformers import ParakeetEncoderConfig

    return ParakeetEncoderConfig(
        hidden_size=s.width, num_hidden_layers=s.layers, num_attention_heads=s.heads, intermediate_size=s.ff_width,
        hidden_act=s.hidden_act, attention_bias=False, convolution_bias=s.convolution_bias,
        conv_kernel_size=s.conv_kernel, subsampling_factor=s.subsampling_factor,
        subsampling_conv_channels=s.subsampling_channels, num_mel_bins=s.mel_bins,
        subsampling_conv_kernel_size=s.subsampling_kernel, subsampling_conv_stride=s.subsampling_stride,
        scale_input=False, dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0,
        attention_dropout=0.0)


def build(s: ParakeetSpec, device: str = "meta"):
    """transformers' ParakeetEncoder for this spec (weights uninitialised on `meta`), eval mode."""
    from transformers import ParakeetEncoder

    return parts.hf_module(ParakeetEncoder, encoder_config(s), device)


@functools.lru_cache(maxsize=4)
def _module(s: ParakeetSpec):
    return build(s, "meta")


@functools.lru_cache(maxsize=4)
def _encoder_names(s: ParakeetSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    enc = _module(s)
    names = [(n, tuple(p.shape)) for n, p in enc.state_dict().items()]
    return tuple(names)


def checkpoint_tensors(s: ParakeetSpec) -> dict[str, tuple[int, ...]]:
    """Every audio encoder and projector tensor of the real layout (checkpoint names), name -> shape:
    the encoder's state dict under `sound_encoder.encoder.`, then `sound_projection.`."""
    t = {f"{ENCODER}{n}": shape for n, shape in _encoder_names(s)}
    t.update(parts.sound_projector_tensors(s))
    return t


def hf_name(name: str) -> str | None:
    """The ParakeetEncoder parameter / buffer a checkpoint tensor loads into ('' for one never read, None for
    a name that is not the audio encoder's)."""
    if name.startswith(NOT_READ):
        return ""
    if name.startswith(ENCODER):
        return name[len(ENCODER):]
    return None


def encoder_states(s: ParakeetSpec, w, features):
    """Normalised log-mel (n, frames, mel_bins) -> encoder states (n, tokens, width)."""
    import torch
    from torch.func import functional_call
    from transformers.models.parakeet.modeling_parakeet import ParakeetEncoderRelPositionalEncoding

    enc = _module(s)
    tensors = {}
    for name in enc.state_dict():
        key = f"{ENCODER}{name}"
        if key in w:
            t = w[key]
            tensors[name] = t.long() if name.endswith(OPTIONAL) else t.float()
        elif name.endswith(OPTIONAL):
            tensors[name] = torch.zeros((), dtype=torch.long)
        else:
            raise KeyError(key)
    tensors["encode_positions.inv_freq"] = ParakeetEncoderRelPositionalEncoding.\
        compute_default_relative_positional_parameters(enc.config)
    return functional_call(enc, tensors, (features.float(),), strict=True).last_hidden_state


def audio_embeds(s: ParakeetSpec, w, features):
    """Clips' features -> (n_clips, tokens, llm_hidden), or for a list of clips of different lengths the
    embeddings of all clips one after another (total_tokens, llm_hidden)."""
    import torch

    if isinstance(features, (list, tuple)):
        return torch.cat([audio_embeds(s, w, f).reshape(-1, s.llm_hidden) for f in features])
    return parts.sound_projector(s, w, encoder_states(s, w, features))


@functools.lru_cache(maxsize=4)
def _mel_filters(n_fft: int, mel_bins: int, rate: int):
    import torch
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=mel_bins, min_frequency=0.0,
                         max_frequency=rate / 2, sampling_rate=rate, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(fb.T).float()


def log_mel(clip, s: ParakeetSpec):
    """One clip (samples,) at the tower's rate -> normalised log-mel features (valid frames, mel_bins)."""
    import numpy as np
    import torch

    y = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    y = torch.cat([y[:1], y[1:] - s.preemphasis * y[:-1]])
    stft = torch.stft(y, s.n_fft, hop_length=s.hop_length, win_length=s.win_length,
                      window=torch.hann_window(s.win_length, periodic=False), center=True, pad_mode="constant",
                      return_complex=True)
    mel = torch.log(_mel_filters(s.n_fft, s.mel_bins, s.sampling_rate) @ stft.abs().square() + LOG_GUARD).T
    n = (len(y) + s.n_fft // 2 * 2 - s.n_fft) // s.hop_length
    mel = mel[:n]
    mean = mel.mean(0, keepdim=True)
    std = ((mel - mean).square().sum(0, keepdim=True) / max(n - 1, 1)).sqrt()
    return ((mel - mean) / (std + NORM_EPS)).contiguous()
