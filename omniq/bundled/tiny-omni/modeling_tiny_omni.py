"""Modeling code of omniq's bundled tiny Nemotron 3 Nano Omni (`omniq/bundled/tiny-omni`).

Shipped inside the checkpoint directory and named in config.json's `auto_map`, as NVIDIA's Omni checkpoints
ship theirs; load it with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
Self-contained (imports only torch and transformers). Module names equal the checkpoint's tensor names:

- `vision_model.radio_model`: a RADIO-style ViT (input conditioner, linear patch embedder, position
  embedding for the one tile size `force_image_size`, class tokens, pre-norm blocks), class tokens dropped;
- `mlp1`: pixel shuffle (`downsample_ratio`, `ps_version` v2) then RMSNorm, linear, ReLU^2, linear;
- `sound_encoder.encoder`: a Parakeet-style conformer over log-mel features (conv2d subsampling, blocks of
  half feed-forward, self-attention without relative positions, convolution module, half feed-forward);
- `sound_projection`: RMSNorm, linear, ReLU^2, linear;
- `language_model`: transformers' native `NemotronHForCausalLM` built from `llm_config`.

The image / sound embeddings replace the embeddings of the context tokens (`img_context_token_id`,
`sound_context_token_id`) in reading order. `forward` only (no generation cache: `use_cache=False` always).

Known limitation, inherited from transformers: without the CUDA kernels NemotronH's Mamba-2 layers use
`torch_forward`, which carries the state between chunks over the wrong axis, so logits are wrong for
sequences longer than `llm_config.chunk_size` (64 here; transformers issue #47246). omniq itself never uses
this file: it runs the towers and the language model with its own functions (`omniq.model.towers`,
`omniq.model.forward`), which are right at any length. Use this code on sequences of at most 64 tokens.
That CPU path also clamps the Mamba step `dt` at `time_step_min` where the CUDA kernels use `time_step_limit`
(0, inf): a small difference (KL about 1e-4 on short samples) that omniq's own forward does not have.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import NemotronHForCausalLM, PreTrainedModel

from .configuration_tiny_omni import NemotronH_Nano_Omni_Reasoning_V3_Config


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (self.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class ReLUSquared(nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


def _attend(q, k, v, heads):
    b, L, c = q.shape
    q, k, v = (t.reshape(b, L, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=(c // heads) ** -0.5)
    return o.transpose(1, 2).reshape(b, L, c)


# ----- vision tower ---------------------------------------------------------------------------------------
class InputConditioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("norm_mean", torch.zeros(3, 1, 1))
        self.register_buffer("norm_std", torch.ones(3, 1, 1))

    def forward(self, x):
        return (x - self.norm_mean) / self.norm_std


class ClsToken(nn.Module):
    def __init__(self, n, width):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(n, width))


class PatchGenerator(nn.Module):
    def __init__(self, patch, grid, width, cls_tokens):
        super().__init__()
        self.patch = patch
        self.embedder = nn.Linear(3 * patch * patch, width, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.cls_token = ClsToken(cls_tokens, width)

    def forward(self, x):
        n, c, H, W = x.shape
        p = self.patch
        x = x.reshape(n, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (H // p) * (W // p), c * p * p)
        x = self.embedder(x) + self.pos_embed
        return torch.cat([self.cls_token.token.expand(n, -1, -1), x], dim=1)


class ViTAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class ViTMlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width, heads, mlp, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ViTMlp(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        v = config.vision_config
        width = config.vit_hidden_size
        grid = config.force_image_size // config.patch_size
        self.cls_tokens = v.get("num_cls_tokens", 1)
        self.patch_generator = PatchGenerator(config.patch_size, grid, width, self.cls_tokens)
        self.blocks = nn.ModuleList(ViTBlock(width, v["num_attention_heads"], v["intermediate_size"],
                                             v.get("layer_norm_eps", 1e-6)) for _ in range(v["num_hidden_layers"]))

    def forward(self, x):
        x = self.patch_generator(x)
        for block in self.blocks:
            x = block(x)
        return x[:, self.cls_tokens:]


class RadioModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_conditioner = InputConditioner()
        self.model = ViT(config)

    def forward(self, pixel_values):
        return self.model(self.input_conditioner(pixel_values))


class VisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.radio_model = RadioModel(config)

    def forward(self, pixel_values):
        return self.radio_model(pixel_values)


# ----- audio encoder --------------------------------------------------------------------------------------
class FrozenBatchNorm1d(nn.Module):
    """Batch norm in inference form, from the stored running statistics."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return (x - self.running_mean[:, None]) * scale[:, None] + self.bias[:, None]


class Subsampling(nn.Module):
    def __init__(self, s):
        super().__init__()
        ch, stages = s["subsampling_conv_channels"], int(math.log2(s["subsampling_factor"]))
        layers = [nn.Conv2d(1, ch, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.Conv2d(ch, ch, 3, stride=2, padding=1, groups=ch), nn.Conv2d(ch, ch, 1), nn.ReLU()]
        self.layers = nn.ModuleList(layers)
        freq = s["num_mel_bins"]
        for _ in range(stages):
            freq = (freq - 1) // 2 + 1
        self.linear = nn.Linear(ch * freq, s["hidden_size"])

    def forward(self, features):
        x = features.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        n, ch, t, f = x.shape
        return self.linear(x.transpose(1, 2).reshape(n, t, ch * f))


class FeedForward(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.linear2(F.silu(self.linear1(x)))


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x):
        return self.o_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class ConvModule(nn.Module):
    def __init__(self, width, kernel):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(width, 2 * width, 1)
        self.depthwise_conv = nn.Conv1d(width, width, kernel, padding=(kernel - 1) // 2, groups=width)
        self.norm = FrozenBatchNorm1d(width)
        self.pointwise_conv2 = nn.Conv1d(width, width, 1)

    def forward(self, x):
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = F.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, s):
        super().__init__()
        c = s["hidden_size"]
        self.feed_forward1 = FeedForward(c, s["intermediate_size"])
        self.self_attn = SelfAttention(c, s["num_attention_heads"])
        self.conv = ConvModule(c, s["conv_kernel_size"])
        self.feed_forward2 = FeedForward(c, s["intermediate_size"])
        for name in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            setattr(self, name, nn.LayerNorm(c))

    def forward(self, x):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x))
        x = x + self.conv(self.norm_conv(x))
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.subsampling = Subsampling(s)
        self.layers = nn.ModuleList(ConformerBlock(s) for _ in range(s["num_hidden_layers"]))

    def forward(self, features):
        x = self.subsampling(features)
        for layer in self.layers:
            x = layer(x)
        return x


class SoundEncoder(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.encoder = ConformerEncoder(s)

    def forward(self, features):
        return self.encoder(features)


class SoundProjection(nn.Module):
    def __init__(self, s, llm_hidden):
        super().__init__()
        bias = s.get("projection_bias", True)
        self.norm = RMSNorm(s["hidden_size"])
        self.linear1 = nn.Linear(s["hidden_size"], s["projection_hidden_size"], bias=bias)
        self.linear2 = nn.Linear(s["projection_hidden_size"], llm_hidden, bias=bias)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(self.norm(x))).square())


# ----- the whole model ------------------------------------------------------------------------------------
def pixel_shuffle(x, scale, ps_version):
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


class NemotronH_Nano_Omni_Reasoning_V3(PreTrainedModel):
    config_class = NemotronH_Nano_Omni_Reasoning_V3_Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["ViTBlock", "ConformerBlock"]

    def __init__(self, config):
        super().__init__(config)
        llm = config.llm_config
        llm.use_cache = False
        self.language_model = NemotronHForCausalLM(llm)
        self.vision_model = VisionModel(config)
        width = config.vit_hidden_size * int(round(1 / config.downsample_ratio)) ** 2
        self.mlp1 = nn.Sequential(RMSNorm(width), nn.Linear(width, config.projector_hidden_size, bias=False),
                                  ReLUSquared(), nn.Linear(config.projector_hidden_size, llm.hidden_size, bias=False))
        if config.sound_config:
            self.sound_encoder = SoundEncoder(config.sound_config)
            self.sound_projection = SoundProjection(config.sound_config, llm.hidden_size)
        else:
            self.sound_encoder = self.sound_projection = None
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm, FrozenBatchNorm1d)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def extract_feature(self, pixel_values):
        """Image tiles (n, 3, S, S) in [0, 1] -> (n, tokens per tile, llm hidden)."""
        vit = self.vision_model(pixel_values)
        n, patches, _ = vit.shape
        side = int(math.isqrt(patches))
        x = pixel_shuffle(vit.reshape(n, side, side, -1), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(x.reshape(n, -1, x.shape[-1]))

    def extract_sound_feature(self, input_features):
        """Log-mel clips (n, frames, mel bins) -> (n, tokens per clip, llm hidden)."""
        return self.sound_projection(self.sound_encoder(input_features))

    def _splice(self, embeds, input_ids, token_id, values):
        mask = (input_ids == token_id)[..., None].expand_as(embeds)
        values = values.reshape(-1, values.shape[-1]).to(embeds.dtype)
        if int(mask[..., 0].sum()) != values.shape[0]:
            raise ValueError(f"{int(mask[..., 0].sum())} context tokens (id {token_id}) for {values.shape[0]} embeddings")
        return embeds.masked_scatter(mask, values)

    def forward(self, input_ids=None, pixel_values=None, input_features=None, attention_mask=None,
                inputs_embeds=None, labels=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                image = self.extract_feature(pixel_values.to(inputs_embeds.dtype))
                inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.img_context_token_id, image)
            if input_features is not None:
                sound = self.extract_sound_feature(input_features.to(inputs_embeds.dtype))
                inputs_embeds = self._splice(inputs_embeds, input_ids, self.config.sound_context_token_id, sound)
        kwargs["use_cache"] = False
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
