"""Build the bundled tiny Nemotron 3 Nano Omni (`omniq/bundled/tiny-omni`) reproducibly on CPU.

    python scripts/make_tiny_omni.py [--steps 300] [--out omniq/bundled/tiny-omni]
    python scripts/make_tiny_omni.py --layout real [--steps 120]      # -> omniq/bundled/tiny-omni-real

`--layout real` builds `tiny-omni-real` instead: the real Omni's layout and config shape with no modeling
code at all (no `auto_map`): a tiny C-RADIO (`vision_config.args` as vLLM's RADIO config reads it, CPE
position table, class and register tokens, `norm_mean` / `norm_std` top-level) and a tiny Parakeet encoder
(relative-position attention, no attention / feed-forward biases, a `sound_config` that loads as a
`ParakeetEncoderConfig`), both run through transformers' own `RadioModel` / `ParakeetEncoder`
(`omniq.model.radio`, `omniq.model.parakeet`), `template` and `image_tag_type` top-level as vLLM's
`NemotronH_Nano_VL_V2` reads them. Training is the same as below.

The layout of `nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16` at tiny sizes: a top-level config.json
(`NemotronH_Nano_Omni_Reasoning_V3`, `llm_config`, `vision_config`, `sound_config`, context token ids,
`auto_map` to the modeling code shipped in the directory), tensors under `language_model.` (the bundled
trained tiny NemotronH, byte-identical), `vision_model.radio_model.` (ViT), `mlp1.` (projector),
`sound_encoder.encoder.` (conformer) and `sound_projection.` (projector), in two BF16 safetensors shards
with an index, and the tiny model's tokenizer.

The towers and projectors are trained with the language model frozen: generated images (coloured shapes)
and sounds (tones, chirps, beeps, a formant-synthesised voice) from `omniq.calib.media`'s `train` split,
next-token loss on their captions after the spliced embeddings, through omniq's own forward
(`omniq.model.towers`, `omniq.model.forward`). `training.json` records the caption loss before and after,
and how much the media change the language model's predictions on the `eval` split: the mean KL between
the next-token distributions over the caption with the real embeddings and with the context embeddings
set to zero (or with no context tokens at all), and how often the right attribute word wins.
The modeling code files are not generated: they live in omniq/bundled/tiny-omni and are copied when
`--out` is elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omniq.calib import media  # noqa: E402
from omniq.model import forward, omni, towers  # noqa: E402
from omniq.model.arch import from_config  # noqa: E402

TINY = ROOT / "omniq" / "bundled" / "tiny"
CODE_DIR = ROOT / "omniq" / "bundled" / "tiny-omni"
REAL_DIR = ROOT / "omniq" / "bundled" / "tiny-omni-real"
CODE_FILES = ("configuration_tiny_omni.py", "modeling_tiny_omni.py")
CARRIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
LM_SHARD, TOWER_SHARD = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

IMAGE_SIZE, PATCH = 128, 16
VISION_CONFIG = {
    "model_type": "radio", "image_size": IMAGE_SIZE, "patch_size": PATCH, "preferred_resolution": [IMAGE_SIZE, IMAGE_SIZE],
    "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 384,
    "num_cls_tokens": 1, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
    "norm_mean": [0.485, 0.456, 0.406], "norm_std": [0.229, 0.224, 0.225],
    "position_embedding": "learned, one tile size (force_image_size)",
}
SOUND_CONFIG = {
    "model_type": "parakeet", "num_mel_bins": 64, "hidden_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 384, "hidden_act": "silu", "conv_kernel_size": 9,
    "subsampling_factor": 8, "subsampling_conv_channels": 32, "subsampling_conv_kernel_size": 3,
    "projection_hidden_size": 256, "projection_bias": True, "position_encoding": "none",
    "sampling_rate": media.AUDIO_RATE, "n_fft": 512, "win_length": 400, "hop_length": 160, "preemphasis": 0.97,
    "clip_duration_s": media.AUDIO_SECONDS,
    "log_mel": {"floor": media.LOG_MEL_FLOOR, "shift": media.LOG_MEL_SHIFT, "scale": media.LOG_MEL_SCALE},
}


REAL_VISION_CONFIG = {
    "model_type": "radio", "patch_size": PATCH, "preferred_resolution": [IMAGE_SIZE, IMAGE_SIZE],
    "video_temporal_patch_size": 1, "separate_video_embedder": True,
    # vLLM reads `model` (a timm name) for the widths; a tiny ViT is no timm size, so the widths are given too
    "args": {"model": "vit_small_patch16_224", "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
             "intermediate_size": 384, "cpe_max_size": 2 * IMAGE_SIZE, "cls_token_per_teacher": True,
             "teachers": [{"name": "teacher-0"}, {"name": "teacher-1"}], "register_multiple": 4},
}
REAL_SOUND_CONFIG = {
    "model_type": "parakeet", "num_mel_bins": 64, "hidden_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 384, "hidden_act": "silu", "conv_kernel_size": 9,
    "convolution_bias": True, "subsampling_factor": 8, "subsampling_conv_channels": 32,
    "subsampling_conv_kernel_size": 3, "subsampling_conv_stride": 2, "projection_hidden_size": 256,
    "projection_bias": True, "sampling_rate": media.AUDIO_RATE, "n_fft": 512, "win_length": 400, "hop_length": 160,
    "preemphasis": 0.97,
}
NORM_MEAN, NORM_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def real_omni_config(llm: dict) -> dict:
    """NVIDIA's Omni config shape (shared/reference/omni-layout.md; the keys vLLM's NemotronH_Nano_VL_V2
    reads), tiny widths, no auto_map."""
    cfg = omni_config(llm)
    del cfg["auto_map"]
    cfg.update({"vision_config": REAL_VISION_CONFIG, "sound_config": REAL_SOUND_CONFIG,
                "template": "nemotron-h-omni", "image_tag_type": "internvl", "norm_mean": NORM_MEAN,
                "norm_std": NORM_STD, "use_thumbnail": True, "max_dynamic_patch": 12,
                "vit_hidden_size": REAL_VISION_CONFIG["args"]["hidden_size"]})
    return cfg


def omni_config(llm: dict) -> dict:
    auto = {"AutoConfig": "configuration_tiny_omni.NemotronH_Nano_Omni_Reasoning_V3_Config",
            "AutoModel": "modeling_tiny_omni.NemotronH_Nano_Omni_Reasoning_V3",
            "AutoModelForCausalLM": "modeling_tiny_omni.NemotronH_Nano_Omni_Reasoning_V3"}
    return {
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"], "model_type": "NemotronH_Nano_Omni_Reasoning_V3",
        "auto_map": auto, "llm_config": llm, "vision_config": VISION_CONFIG, "sound_config": SOUND_CONFIG,
        "force_image_size": IMAGE_SIZE, "patch_size": PATCH, "downsample_ratio": 0.5, "ps_version": "v2",
        "vit_hidden_size": VISION_CONFIG["hidden_size"], "projector_hidden_size": 256,
        "img_context_token_id": 4, "img_context_token": "<image>", "img_start_token": "<img>", "img_end_token": "</img>",
        "sound_context_token_id": 5, "sound_context_token": "<sound>", "sound_start_token": "<audio>",
        "sound_end_token": "</audio>", "max_sequence_length": llm.get("max_position_embeddings", 4096),
        "video_pruning_rate": 0.0, "video_temporal_patch_size": 1, "torch_dtype": "bfloat16",
    }


OUTPUT_LAYERS = ("attn.proj.weight", "mlp.fc2.weight", "o_proj.weight", "linear2.weight", "pointwise_conv2.weight",
                 "mlp1.3.weight")
NOT_TRAINED = ("running_mean", "running_var", "norm_mean", "norm_std", "summary_idxs", "num_batches_tracked")


def init_towers(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = cfg["vision_config"]
    mean, std = cfg.get("norm_mean") or v["norm_mean"], cfg.get("norm_std") or v["norm_std"]
    out = {}
    for name, shape in towers.tower_tensors(cfg).items():
        if name.endswith(("summary_idxs", "num_batches_tracked")):
            n = math.prod(shape)                # summary_idxs: 0, 1, ...; num_batches_tracked: 0
            out[name] = (torch.arange(n) if name.endswith("summary_idxs") else torch.zeros(n)).long().reshape(shape)
            continue
        if name.endswith("norm_mean"):
            t = torch.tensor(mean).view(3, 1, 1)
        elif name.endswith("norm_std"):
            t = torch.tensor(std).view(3, 1, 1)
        elif name.endswith("running_var"):
            t = torch.ones(shape)
        elif name.endswith(("running_mean", ".bias")):
            t = torch.zeros(shape)
        elif len(shape) == 1 or "norm" in name.rsplit(".", 2)[-2] or name.endswith("mlp1.0.weight"):
            t = torch.ones(shape)                                  # LayerNorm / RMSNorm / batch-norm scales
        elif name.endswith(("pos_embed", "cls_token.token", "bias_u", "bias_v")):
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if name.endswith(OUTPUT_LAYERS):
                t = t * 0.25
        out[name] = t.float()
    return out


def encode_batch(samples, cfg, tokenizer, tokens, targets=None):
    """Right-padded ids (b, L), the pixels / features, and per row (target start, target end)."""
    rows, spans, pixels, feats = [], [], [], []
    for k, s in enumerate(samples):
        if targets is not None:
            s = media.MediaSample(s.modality, s.prompt, targets[k], s.image, s.wave, s.rate, s.source, s.labels)
        x = media.model_inputs(s, cfg, tokenizer, tokens)
        rows.append(x.input_ids[0])
        spans.append((x.target_start, x.num_tokens))
        if x.pixels is not None:
            pixels.append(x.pixels)
        if x.features is not None:
            feats.append(x.features)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), int(tokenizer.pad_token_id or 0), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, (torch.cat(pixels) if pixels else None), (torch.cat(feats) if feats else None), spans


def media_embeds(cfg, tw, modality, pixels, feats):
    if modality == "image":
        return towers.image_embeds(towers.vision_spec(cfg), tw, pixels)
    return towers.audio_embeds(towers.sound_spec(cfg), tw, feats)


def run_lm(arch, lm, tw, cfg, tokens, ids, modality, emb):
    w = {**lm, **tw}
    if modality == "image":
        x = omni.splice(arch, w, ids, image_embeds=emb, tokens=tokens)
    else:
        x = omni.splice(arch, w, ids, audio_embeds=emb, tokens=tokens)
    return forward.logits(arch, w, inputs_embeds=x)


def target_rows(logits, ids, spans):
    """(positions, vocab) logits predicting each target token, and those tokens."""
    lg, tg = [], []
    for i, (a, b) in enumerate(spans):
        lg.append(logits[i, a - 1:b - 1])
        tg.append(ids[i, a:b])
    return torch.cat(lg), torch.cat(tg)


def caption_loss(arch, lm, tw, cfg, tokens, tokenizer, samples, modality):
    """Next-token loss on the captions; the LM head runs only where a caption token is predicted."""
    ids, px, ft, spans = encode_batch(samples, cfg, tokenizer, tokens)
    emb = media_embeds(cfg, tw, modality, px, ft)
    w = {**lm, **tw}
    kw = {"image_embeds": emb} if modality == "image" else {"audio_embeds": emb}
    h = forward.hidden_states(arch, w, inputs_embeds=omni.splice(arch, w, ids, tokens=tokens, **kw))
    hs, tg = target_rows(h, ids, spans)
    return F.cross_entropy(F.linear(hs, lm[f"{arch.prefix}lm_head.weight"]), tg)


@torch.no_grad()
def effect(arch, lm, tw, cfg, tokens, tokenizer, samples, modality) -> dict:
    """How much the media change the predictions over the caption (teacher-forced)."""
    ids, px, ft, spans = encode_batch(samples, cfg, tokenizer, tokens)
    emb = media_embeds(cfg, tw, modality, px, ft)
    real = target_rows(run_lm(arch, lm, tw, cfg, tokens, ids, modality, emb), ids, spans)
    zero = target_rows(run_lm(arch, lm, tw, cfg, tokens, ids, modality, torch.zeros_like(emb)), ids, spans)
    # no context tokens at all: drop them from every row
    ctx = tokens.image if modality == "image" else tokens.sound
    n_ctx = int((ids[0] == ctx).sum())
    short = torch.stack([r[r != ctx] for r in ids])
    absent = target_rows(forward.logits(arch, lm, short), short, [(a - n_ctx, b - n_ctx) for a, b in spans])

    def kl(p_logits, q_logits):
        lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean().item()

    tg = real[1]
    return {
        "caption_loss": round(F.cross_entropy(real[0], tg).item(), 4),
        "caption_loss_zero_embeds": round(F.cross_entropy(zero[0], tg).item(), 4),
        "caption_loss_no_context": round(F.cross_entropy(absent[0], absent[1]).item(), 4),
        "kl_vs_zero_embeds": round(kl(real[0], zero[0]), 4),
        "kl_vs_no_context": round(kl(real[0], absent[0]), 4),
        "top1_agreement_vs_zero_embeds": round((real[0].argmax(-1) == zero[0].argmax(-1)).float().mean().item(), 4),
    }


ATTRIBUTES = {"image": {"colour": list(media.COLOURS), "shape": list(media.SHAPES), "position": list(media.POSITIONS)},
              "audio": {"pitch": list(media.PITCHES), "kind": list(media.SOUNDS)}}


def caption_of(modality, labels) -> str:
    if modality == "image":
        colour, shape, position = labels
        return f" a {colour} {shape} {media.POSITIONS[position][1]}."
    pitch, kind = labels
    return f" a {pitch} {kind}."


@torch.no_grad()
def attribute_accuracy(arch, lm, tw, cfg, tokens, tokenizer, samples, modality) -> dict:
    """For each attribute: how often the true caption has the lowest loss among captions that differ only in
    that attribute (chance = 1 / number of values)."""
    out = {}
    for a, (attr, values) in enumerate(ATTRIBUTES[modality].items()):
        right = 0
        for s in samples:
            caps = [caption_of(modality, tuple(v if j == a else lab for j, lab in enumerate(s.labels)))
                    for v in values]
            ids, px, ft, spans = encode_batch([s] * len(caps), cfg, tokenizer, tokens, targets=caps)
            emb = media_embeds(cfg, tw, modality, px, ft)
            logits = run_lm(arch, lm, tw, cfg, tokens, ids, modality, emb)
            nll = [F.cross_entropy(logits[i, p - 1:q - 1], ids[i, p:q], reduction="sum").item()
                   for i, (p, q) in enumerate(spans)]
            right += int(values[min(range(len(nll)), key=nll.__getitem__)] == s.labels[a])
        out[attr] = {"accuracy": round(right / len(samples), 4), "chance": round(1 / len(values), 4)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("simplified", "real"), default="simplified",
                    help="real: the real Omni's towers and config shape, no modeling code (tiny-omni-real)")
    ap.add_argument("--out", default=None, help="default omniq/bundled/tiny-omni (-real)")
    ap.add_argument("--tiny", default=str(TINY), help="the trained tiny NemotronH to use as language model")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps, each on an image and an audio batch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--eval-samples", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    real = args.layout == "real"
    out = Path(args.out or (REAL_DIR if real else CODE_DIR))
    tiny = Path(args.tiny)
    out.mkdir(parents=True, exist_ok=True)

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    llm_cfg = json.loads((tiny / "config.json").read_text())
    cfg = real_omni_config(llm_cfg) if real else omni_config(llm_cfg)
    arch = from_config(llm_cfg, prefix=omni.LLM_PREFIX)
    lm_raw = {}
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            lm_raw[omni.LLM_PREFIX + name] = f.get_tensor(name)
    lm = {k: v.float() for k, v in lm_raw.items()}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    tokens = omni.context_tokens(cfg, tokenizer)
    assert (tokens.image_start, tokens.image_end, tokens.sound_start, tokens.sound_end) == (6, 7, 8, 9), tokens

    tw = init_towers(cfg, args.seed)
    params = {k: torch.nn.Parameter(v) for k, v in tw.items() if not k.endswith(NOT_TRAINED)}
    fixed = {k: v for k, v in tw.items() if k not in params}
    decay = [p for k, p in params.items() if p.ndim >= 2 and not k.endswith(("pos_embed", "cls_token.token"))]
    no_decay = [p for k, p in params.items() if not (p.ndim >= 2 and not k.endswith(("pos_embed", "cls_token.token")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warm = max(1, args.steps // 15)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    n_eval = args.eval_samples
    evals = {m: list(media.bundled(m, "eval", n_eval)) for m in ("image", "audio")}
    before = {m: effect(arch, lm, tw, cfg, tokens, tokenizer, evals[m], m) for m in evals}
    print(f"before: {json.dumps(before)}", flush=True)

    all_tw = {**params, **fixed}
    history = {"image": [], "audio": []}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        for modality in history:
            samples = list(media.bundled(modality, "train", args.batch, start=step * args.batch))
            loss = caption_loss(arch, lm, all_tw, cfg, tokens, tokenizer, samples, modality)
            (loss / len(history)).backward()
            history[modality].append(loss.item())
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            losses = "  ".join(f"{m} {v[-1]:.3f}" for m, v in history.items())
            print(f"step {step:4d}  loss {losses}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)

    # What is saved is BF16: evaluate that.
    trained = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in all_tw.items()}
    tw_eval = {k: (v.float() if v.is_floating_point() else v) for k, v in trained.items()}
    after = {m: effect(arch, lm, tw_eval, cfg, tokens, tokenizer, evals[m], m) for m in evals}
    print(f"after: {json.dumps(after)}", flush=True)
    acc = {m: attribute_accuracy(arch, lm, tw_eval, cfg, tokens, tokenizer, evals[m][:32], m) for m in evals}
    print(f"attribute accuracy: {json.dumps(acc)}", flush=True)

    save_file(lm_raw, str(out / LM_SHARD), metadata={"format": "pt"})
    save_file(trained, str(out / TOWER_SHARD), metadata={"format": "pt"})
    for shard in (LM_SHARD, TOWER_SHARD):
        (out / shard).chmod(0o644)
    weight_map = {**{k: LM_SHARD for k in lm_raw}, **{k: TOWER_SHARD for k in trained}}
    total = sum(v.numel() * v.element_size() for v in (*lm_raw.values(), *trained.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in CARRIED:
        shutil.copyfile(tiny / name, out / name)
    if not real and out.resolve() != CODE_DIR.resolve():
        for name in CODE_FILES:
            shutil.copyfile(CODE_DIR / name, out / name)
    tiny_training = json.loads((tiny / "training.json").read_text()) if (tiny / "training.json").is_file() else {}
    tower_params = sum(v.numel() for v in trained.values())
    (out / "training.json").write_text(json.dumps({
        "script": "scripts/make_tiny_omni.py", "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "lr": args.lr, "layout": args.layout, "language_model": "omniq/bundled/tiny (frozen, byte-identical)",
        "language_model_training": tiny_training, "trained": "vision tower, mlp1, sound encoder, sound projection",
        "train_data": {m: media.identity(m, "train") for m in ("image", "audio")},
        "eval_data": {m: dict(media.identity(m, "eval"), samples=n_eval) for m in ("image", "audio")},
        "tower_params": tower_params, "tower_bytes_bf16": sum(v.numel() * 2 for v in trained.values()),
        "train_loss_first_last_10_steps": {m: [round(sum(v[:10]) / 10, 4), round(sum(v[-10:]) / 10, 4)]
                                           for m, v in history.items()},
        "before": before, "after": after, "attribute_accuracy": acc,
        "notes": "kl_* = mean KL(p_media || p_other) of the next-token distributions over the caption tokens "
                 "(teacher-forced), p_other with the context embeddings set to zero or with no context tokens; "
                 "measured on the eval split with the saved BF16 weights.",
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"saved to {out} in {time.time() - t0:.0f}s: {tower_params} tower parameters, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
