"""The Nemotron 3 Nano Omni layout: a NemotronH language model fed by a vision tower and an audio encoder.

Top-level config with `llm_config`, `vision_config`, `sound_config`; tensors under the prefixes below
(reference: shared/reference/omni-layout.md). Only the language model is ever quantized; every tower and
projector tensor passes through untouched.

Omni checkpoints ship their own modeling code (`auto_map` in config.json pointing at `*.py` files next to the
weights). omniq does not need it: the towers run as plain torch functions (`omniq.model.towers`) and their
embeddings are spliced into the language model's input here (`splice`). Loading the checkpoint's own code is
only done on request (`load_remote_model`), and only with `--trust-remote-code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omniq.model import names

OMNI_ARCHS = {"NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Nano_VL_V2"}
LLM_PREFIX = names.LLM_PREFIX
# component -> tensor-name prefix
TOWER_PREFIXES = {
    "vision_tower": "vision_model.",
    "vision_projector": "mlp1.",
    "audio_encoder": "sound_encoder.",
    "audio_projector": "sound_projection.",
}


def is_omni(cfg: dict) -> bool:
    archs = set(cfg.get("architectures") or [])
    return bool(archs & OMNI_ARCHS) or cfg.get("model_type") in OMNI_ARCHS or "llm_config" in cfg


def llm_config(cfg: dict) -> dict:
    llm = cfg.get("llm_config")
    if not isinstance(llm, dict):
        from omniq.errors import OmniqError

        raise OmniqError("Omni config.json has no llm_config object; the checkpoint is incomplete")
    return llm


def component_of(name: str) -> str:
    """Which part of an Omni checkpoint a tensor belongs to: language_model or a tower/projector."""
    if name.startswith(LLM_PREFIX):
        return "language_model"
    for comp, prefix in TOWER_PREFIXES.items():
        if name.startswith(prefix):
            return comp
    return "other"


# ----- context tokens and splicing --------------------------------------------------------------------
@dataclass(frozen=True)
class ContextTokens:
    """The token ids whose embeddings are replaced by image / audio embeddings, and their wrappers."""

    image: int
    sound: int | None = None
    image_start: int | None = None    # <img>
    image_end: int | None = None      # </img>
    sound_start: int | None = None    # <audio>
    sound_end: int | None = None      # </audio>


def context_tokens(cfg: dict, tokenizer=None) -> ContextTokens:
    """Context token ids from an Omni config; the wrapper tokens from the tokenizer when it has them."""
    from omniq.errors import OmniqError

    image = cfg.get("img_context_token_id")
    if image is None:
        raise OmniqError("Omni config.json has no img_context_token_id; cannot place image embeddings")

    def tid(text):
        if tokenizer is None:
            return None
        i = tokenizer.convert_tokens_to_ids(text)
        return None if i is None or i == tokenizer.unk_token_id else int(i)

    return ContextTokens(image=int(image), sound=cfg.get("sound_context_token_id"),
                         image_start=tid(cfg.get("img_start_token", "<img>")),
                         image_end=tid(cfg.get("img_end_token", "</img>")),
                         sound_start=tid(cfg.get("sound_start_token", "<audio>")),
                         sound_end=tid(cfg.get("sound_end_token", "</audio>")))


def splice(arch, weights, input_ids, image_embeds=None, audio_embeds=None, *, tokens: ContextTokens):
    """The language model's input embeddings (b, L, hidden) float32, with the image / sound context tokens'
    rows replaced, in reading order over the batch, by `image_embeds` / `audio_embeds` ((..., hidden), any
    leading shape; their row count must equal the number of context tokens). Differentiable in the embeds."""
    import torch
    import torch.nn.functional as F

    from omniq.errors import OmniqError

    x = F.embedding(input_ids, weights[arch.embedding_weight]).float()
    for name, tid, emb in (("image", tokens.image, image_embeds), ("audio", tokens.sound, audio_embeds)):
        mask = input_ids == tid if tid is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        rows = 0 if emb is None else emb.reshape(-1, emb.shape[-1]).shape[0]
        # the count is a host read; on PyTorch's `meta` device (the device tests) there are no values to count
        n = rows if mask.is_meta else int(mask.sum())
        if n != rows:
            raise OmniqError(f"{name}: the prompt has {n} context tokens but the {name} gives {rows} embeddings; "
                             f"each {name} needs exactly its own number of context tokens (id {tid})")
        if n:
            emb = emb.reshape(-1, emb.shape[-1]).float()
            if emb.shape[-1] != x.shape[-1]:
                raise OmniqError(f"{name} embeddings have width {emb.shape[-1]}, the language model "
                                 f"{x.shape[-1]}; the projector does not match this language model")
            x = x.masked_scatter(mask[..., None].expand_as(x), emb.to(x.dtype))
    return x


def multimodal_embeds(cfg: dict, arch, weights, input_ids, *, pixels=None, features=None,
                      tokens: ContextTokens | None = None):
    """Run the checkpoint's towers (omniq's own functions) on image tiles (n, 3, S, S) and/or audio clips'
    log-mel features (n, frames, bins) and splice the embeddings into `input_ids`' embeddings."""
    from omniq.model import towers

    tokens = tokens or context_tokens(cfg)
    img = towers.image_embeds(towers.vision_spec(cfg), weights, pixels) if pixels is not None else None
    snd = towers.audio_embeds(towers.sound_spec(cfg), weights, features) if features is not None else None
    return splice(arch, weights, input_ids, img, snd, tokens=tokens)


def token_modalities(input_ids, tokens: ContextTokens):
    """Per position: 0 text, 1 image, 2 audio (the positions whose embeddings come from a tower)."""
    import torch

    out = torch.zeros_like(input_ids)
    out[input_ids == tokens.image] = 1
    if tokens.sound is not None:
        out[input_ids == tokens.sound] = 2
    return out


MODALITY_NAMES = ("text", "image", "audio")


# ----- the checkpoint's own modeling code -------------------------------------------------------------
def remote_code_files(path: Path, cfg: dict) -> list[str]:
    """The Python files the checkpoint's `auto_map` points at (present or not)."""
    files = []
    for ref in (cfg.get("auto_map") or {}).values():
        for r in ref if isinstance(ref, (list, tuple)) else [ref]:
            if not isinstance(r, str) or not r:
                continue
            module = r.split("--")[-1].rsplit(".", 1)[0]
            name = module.replace(".", "/") + ".py"
            if name not in files:
                files.append(name)
    return files


def require_trust(path: Path, cfg: dict, trust_remote_code: bool) -> list[str]:
    """Refuse (exit 2) to run a checkpoint's own code unless the user said they trust it."""
    from omniq.errors import OmniqError

    files = remote_code_files(Path(path), cfg)
    if not files:
        raise OmniqError(f"{path}: config.json has no auto_map; this checkpoint ships no modeling code to load")
    if not trust_remote_code:
        shown = ", ".join(files)
        raise OmniqError(f"this checkpoint ships its own modeling code ({shown} via auto_map); loading it runs "
                         "that code: pass --trust-remote-code if you trust it")
    missing = [f for f in files if not (Path(path) / f).is_file()]
    if missing:
        raise OmniqError(f"{path}: auto_map names {missing[0]}, which is not in the checkpoint directory")
    return files


def load_remote_model(path, cfg: dict, *, trust_remote_code: bool, dtype=None):
    """The checkpoint's own model class, loaded by transformers with its shipped code (eval mode)."""
    from transformers import AutoModelForCausalLM

    require_trust(Path(path), cfg, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype)
    return model.eval()
