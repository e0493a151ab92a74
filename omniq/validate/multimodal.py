"""`omniq validate` on an Omni checkpoint: image+text and audio+text evaluation next to the text evaluation.

Samples: the bundled generated `eval` split (`omniq.calib.media`; calibration uses the `calib` split, drawn from
a different seed, so no evaluation sample was seen while calibrating). Each sample is a prompt with the media
placeholder and its caption; both checkpoints embed the media with their own towers and projectors (omniq's
torch functions, `omni.multimodal_embeds`; an artifact's towers are the source's byte for byte, so this also
covers a tower changed by mistake), splice the embeddings at the context tokens and run the same float32
forward as the text evaluation (`omniq.model.forward`, the candidate dequantized with its activations and KV
cache quantized as an engine would).

Metrics per modality (KL(reference || candidate), top-1 agreement, perplexity of both and their ratio) are
taken over the caption: the predictions of the text tokens after the media, the tokens a user reads. Each
modality has its own gates (the candidate format's defaults and the user's overrides, like the text set) and
its own pass / fail; the run passes only when every modality does.
"""

from __future__ import annotations

import torch

from omniq.calib import media
from omniq.errors import OmniqError
from omniq.model import forward, omni, towers
from omniq.validate import gates as gates_mod
from omniq.validate.metrics import Comparison

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


@torch.inference_mode()
def compare_modality(reference, candidate, modality: str, samples: int, *, progress=None, source=None) -> dict:
    """Metrics of the candidate against the reference on `samples` eval samples of one modality: the bundled
    eval split, or the user's (`source`, a `user_media.MediaSource` from --eval-media)."""
    cfg = reference.checkpoint.config
    tokens = omni.context_tokens(cfg, reference.tokenizer)
    linear, kv = candidate.linear(), candidate.kv()
    cmp = Comparison()
    chosen = source.samples[modality][:samples] if source is not None else media.bundled(modality, "eval", samples)
    for k, sample in enumerate(chosen):
        x = media.model_inputs(sample, cfg, reference.tokenizer, tokens)
        L = x.num_tokens
        if x.target_start >= L:
            raise OmniqError(f"{x.source}: the sample has no caption to evaluate")
        kw = {"pixels": x.pixels, "features": x.features, "tokens": tokens}
        e_ref = omni.multimodal_embeds(cfg, reference.arch, reference.weights, x.input_ids, **kw)
        e_cand = omni.multimodal_embeds(cfg, candidate.arch, candidate.weights, x.input_ids, **kw)
        ref = forward.logits(reference.arch, reference.weights, inputs_embeds=e_ref)
        cand = forward.logits(candidate.arch, candidate.weights, inputs_embeds=e_cand, linear=linear, kv=kv)
        sel = slice(x.target_start - 1, L - 1)            # predictions of the caption tokens
        cmp.add(ref[:, sel], cand[:, sel], x.input_ids[:, x.target_start:])
        if progress is not None:
            progress(k + 1, samples)
    return cmp.summary()


def evaluate(reference, candidate, *, samples: int = DEFAULT_MEDIA_SAMPLES, max_kl=None, min_top1=None,
             max_ppl_ratio=None, progress=None, eval_media: str | None = None,
             bad_media: str = "skip") -> tuple[dict, list[str]]:
    """{modality: metrics + gates + failures + passed} for every media modality of an Omni checkpoint, and
    warnings (e.g. towers omniq cannot run: then only the text set is evaluated, said so). `eval_media`: the
    user's captioned media (a folder or dataset, `omniq.calib.user_media`) instead of the bundled eval split,
    for the modalities it has."""
    ckpt = reference.checkpoint
    if eval_media is not None and not ckpt.is_omni:
        raise OmniqError("--eval-media: this checkpoint is a text-only NemotronH; image / audio evaluation needs "
                         "an Omni checkpoint")
    if not ckpt.is_omni or samples <= 0:
        return {}, []
    wanted, why = available(ckpt.config, ckpt.headers)
    warnings = [f"image / audio evaluation skipped: {why}"] if why else []
    source = None
    if eval_media is not None:
        from omniq.calib import user_media

        source = user_media.load(eval_media, bad=bad_media, need_target=True, limit=samples, what="--eval-media")
        warnings += [f"--eval-media skipped {line}" for line in source.skipped]
    out = {}
    for m in wanted:
        own = source if source is not None and source.samples.get(m) else None       # else the bundled split
        metrics = compare_modality(reference, candidate, m, samples, progress=progress, source=own)
        gate = gates_mod.gates_for(candidate.format, max_kl=max_kl, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio)
        failures = [f"{m}: {f}" for f in gates_mod.check(metrics, gate)]
        out[m] = {**{k: metrics[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference",
                                              "ppl_candidate", "ppl_ratio", "tokens")},
                  "passed": not failures, "gates": gate.as_dict(), "failures": failures,
                  "eval": ({"set": eval_media, "samples": len(own.samples[m]), "scored": "caption tokens",
                            **own.identity(m)} if own is not None else
                           {"set": f"bundled-{m}:eval", "samples": samples, "scored": "caption tokens",
                            **media.identity(m, "eval")})}
    return out, warnings
