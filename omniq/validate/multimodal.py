"""`omniq validate` on an Omni checkpoint: image+text and audio+text evaluation next to the text evaluation.

Samples: the bundled generated `eval` split (`omniq.calib.media`; calibration uses the `calib` split, drawn from
a different seed, so no evaluation sample was seen while calibrating). Each sample is a prompt with the media
placeholder and its caption; both checkpoints embed the media with their own towers and projectors (omniq's
torch functions, `omni.multimodal_embeds`; an artifact's towers are the source's byte for byte, so this also
covers a tower changed by mistake; the towers run first, one artifact's at a time, `items`), splice the
embeddings at the context tokens and go through the same layer stream as the text rows
(`omniq.validate.stream`, the candidate dequantized with its activations and KV cache quantized as an engine
would, beside the reference's BF16-engine noise floor).

Metrics per modality (KL(reference || candidate), top-1 agreement, perplexity of both and their ratio) are
taken over the caption: the predictions of the text tokens after the media, the tokens a user reads. Each
modality has its own gates (the candidate format's defaults and the user's overrides, like the text set) and
its own pass / fail; the run passes only when every modality does.
"""

from __future__ import annotations

import torch

from omniq.calib import media
from omniq.errors import OmniqError
from omniq.model import omni, towers
from omniq.validate import gates as gates_mod

DEFAULT_MEDIA_SAMPLES = 32
MEDIA_MODALITIES = ("image", "audio")


def available(cfg: dict, headers) -> tuple[list[str], str | None]:
    """The media modalities omniq can evaluate on this checkpoint, and why not when it cannot."""
    wanted = [m for m, key in (("image", "vision_config"), ("audio", "sound_config")) if cfg.get(key)]
    if not wanted:
        return [], None
    try:
        towers.check_supported(cfg, headers)
    except OmniqError as e:
        return [], str(e)
    return wanted, None


def sample_inputs(reference, modality: str, samples: int, source=None) -> list:
    """The eval samples of one modality as model inputs (token ids, tiles or features; no tower run): the
    bundled eval split, or the user's (`source`, a `user_media.MediaSource` from --eval-media)."""
    cfg = reference.checkpoint.config
    tokens = omni.context_tokens(cfg, reference.tokenizer)
    chosen = source.samples[modality][:samples] if source is not None else media.bundled(modality, "eval", samples)
    out = []
    for sample in chosen:
        x = media.model_inputs(sample, cfg, reference.tokenizer, tokens)
        if x.target_start >= x.num_tokens:
            raise OmniqError(f"{x.source}: the sample has no caption to evaluate")
        out.append(x)
    return out


def user_source(reference, eval_media: str | None, samples: int, bad_media: str = "skip"):
    """(source, warnings): the user's captioned media from --eval-media (`omniq.calib.user_media`), or None."""
    if eval_media is None:
        return None, []
    if not reference.checkpoint.is_omni:
        raise OmniqError("--eval-media: this checkpoint is a text-only NemotronH; image / audio evaluation needs "
                         "an Omni checkpoint")
    from omniq.calib import user_media

    source = user_media.load(eval_media, bad=bad_media, need_target=True, limit=samples, what="--eval-media")
    return source, [f"--eval-media skipped {line}" for line in source.skipped]


def own_source(source, modality: str):
    """The user's source for this modality when it has samples of it, else None (the bundled split)."""
    return source if source is not None and source.samples.get(modality) else None


def tower_names(artifact, modality: str) -> list[str]:
    comps = {"image": ("vision_tower", "vision_projector"), "audio": ("audio_encoder", "audio_projector")}[modality]
    return [n for n in artifact.base_names if omni.component_of(n) in comps]


@torch.inference_mode()
def embeds(reference, candidate, modality: str, inputs: list, device="cpu") -> dict[str, list]:
    """{"reference": [...], "candidate": [...]}: each artifact's towers (read as one unit, then released) embed
    every sample (the projected embeddings, one tensor per sample)."""
    from omniq.validate.stream import KEEP_FLOAT32_BYTES

    cfg = reference.checkpoint.config
    out: dict[str, list] = {}
    for stream, art in (("reference", reference), ("candidate", candidate)):
        u = art.unit(tower_names(art, modality), device, KEEP_FLOAT32_BYTES)
        if modality == "image":
            out[stream] = [towers.image_embeds(towers.vision_spec(cfg), u, x.pixels.to(device)) for x in inputs]
        else:
            out[stream] = [towers.audio_embeds(towers.sound_spec(cfg), u, x.features.to(device)) for x in inputs]
        del u
    return out


def items(reference, candidate, modality: str, inputs: list, device="cpu") -> list:
    """Stream items (`omniq.validate.stream.Item`) of one modality: the samples embedded by each artifact's
    towers (`embeds`); the language model then runs in the layer stream."""
    from omniq.validate.stream import Item

    embeds_ = embeds(reference, candidate, modality, inputs, device)
    return [Item(modality, x.input_ids, x.input_ids[:, x.target_start:], slice(x.target_start - 1, x.num_tokens - 1),
                 {s: {modality: embeds_[s][k]} for s in embeds_})
            for k, x in enumerate(inputs)]


def modality_report(modality: str, metrics: dict, gate, samples: int, *, noise_floor: dict | None = None,
                    source=None, eval_media: str | None = None) -> dict:
    """The report entry of one media modality: metrics, this run's floor, its gates (`gate`, from that floor:
    `gates.from_floor`) side by side, failures, what was evaluated."""
    evaluated = ({"set": eval_media, "samples": len(source.samples[modality]), "scored": "caption tokens",
                  **source.identity(modality)} if source is not None else
                 {"set": f"bundled-{modality}:eval", "samples": samples, "scored": "caption tokens",
                  **media.identity(modality, "eval")})
    return {**gates_mod.section(modality, metrics, noise_floor, gate), "eval": evaluated}


def wanted(reference, samples: int) -> tuple[list[str], list[str]]:
    """The media modalities to evaluate on this checkpoint, and warnings (e.g. towers omniq cannot run: then
    only the text set is evaluated, said so)."""
    ckpt = reference.checkpoint
    if not ckpt.is_omni or samples <= 0:
        return [], []
    modalities, why = available(ckpt.config, ckpt.headers)
    return modalities, [f"image / audio evaluation skipped: {why}"] if why else []
