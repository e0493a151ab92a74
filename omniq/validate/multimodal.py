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
from omniq.validate.artifact import bf16_compute_hooks
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
def compare_modality(reference, candidate, modality: str, samples: int, *, progress=None,
                     noise_floor: bool = False) -> dict:
    """Metrics of the candidate against the reference on `samples` bundled eval samples of one modality
    (with `noise_floor`, also the reference run as a BF16 engine runs it, as `noise_floor`)."""
    cfg = reference.checkpoint.config
    tokens = omni.context_tokens(cfg, reference.tokenizer)
    linear, kv = candidate.linear(), candidate.kv()
    floor_hooks = bf16_compute_hooks(reference.weights) if noise_floor else None
    cmp, floor_cmp = Comparison(), Comparison()
    for k, sample in enumerate(media.bundled(modality, "eval", samples)):
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
        targets = x.input_ids[:, x.target_start:]
        cmp.add(ref[:, sel], cand[:, sel], targets)
        if floor_hooks is not None:
            fl = forward.logits(reference.arch, reference.weights, inputs_embeds=e_ref, linear=floor_hooks[0],
                                kv=floor_hooks[1])
            floor_cmp.add(ref[:, sel], fl[:, sel], targets)
        if progress is not None:
            progress(k + 1, samples)
    out = cmp.summary()
    if floor_hooks is not None:
        out["noise_floor"] = {k: v for k, v in floor_cmp.summary().items() if k in gates_mod.FLOOR_KEYS}
    return out


def evaluate(reference, candidate, *, samples: int = DEFAULT_MEDIA_SAMPLES, gate_of=None, noise_floor: bool = True,
             progress=None) -> tuple[dict, list[str]]:
    """{modality: metrics + noise floor + gates + failures + passed} for every media modality of an Omni
    checkpoint, and warnings (e.g. towers omniq cannot run: then only the text set is evaluated, said so).
    `gate_of(modality, floor) -> Gates` (default: the candidate format's gates from this modality's floor)."""
    ckpt = reference.checkpoint
    if not ckpt.is_omni or samples <= 0:
        return {}, []
    if gate_of is None:
        fmt = gates_mod.gate_format(candidate)
        gate_of = lambda m, floor: gates_mod.from_floor(floor, fmt)  # noqa: E731
    wanted, why = available(ckpt.config, ckpt.headers)
    warnings = [f"image / audio evaluation skipped: {why}"] if why else []
    out = {}
    for m in wanted:
        metrics = compare_modality(reference, candidate, m, samples, progress=progress, noise_floor=noise_floor)
        floor = metrics.get("noise_floor")
        gate = gate_of(m, floor)
        failures = [f"{m}: {f}" for f in gates_mod.check(metrics, gate)]
        out[m] = {**{k: metrics[k] for k in ("kl_mean", "kl_p95", "top1_agreement", "ppl_reference",
                                              "ppl_candidate", "ppl_ratio", "tokens")},
                  "passed": not failures, "gates": gate.as_dict(), "noise_floor": floor,
                  "gate_table": gates_mod.side_by_side(metrics, floor, gate), "failures": failures,
                  "eval": {"set": f"bundled-{m}:eval", "samples": samples, "scored": "caption tokens",
                           **media.identity(m, "eval")}}
    return out, warnings
