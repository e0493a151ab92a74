"""Train the bundled tiny NemotronH (`omniq/bundled/tiny`) reproducibly on CPU.

    python scripts/train_tiny.py [--steps 500] [--out omniq/bundled/tiny]

Real NemotronH structure at small width: Mamba-2, MoE (16 routed ReLU^2 experts, top-4, a shared expert,
sigmoid router with `e_score_correction_bias`) and attention layers each preceded by a Mamba layer; a
byte-level BPE tokenizer trained with `tokenizers`; the text is the Python standard library's docstrings
(`omniq.calib.docstrings`, `train` split only). Routing is kept balanced with the loss-free bias update of
DeepSeek-V3 (bias += u * sign(mean_load - load), u = 1e-2: at 1e-3 routing collapsed here); transformers' NemotronH has no balancing loss of its own.
Saved in NVIDIA's hub layout (`backbone.*`, one tensor per expert) as BF16 safetensors, with the router in
fp32. Writes `training.json` with the held-out perplexity next to a unigram model's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omniq.calib import docstrings  # noqa: E402
from omniq.model import forward  # noqa: E402
from omniq.model.arch import from_config  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<sound>", "<img>", "</img>", "<audio>", "</audio>"]

CONFIG = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "hybrid_override_pattern": "MEM*EMEM*E",
    "num_hidden_layers": 10,
    "hidden_size": 256,
    "vocab_size": 4096,
    "tie_word_embeddings": False,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "attention_bias": False,
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "ssm_state_size": 32,
    "n_groups": 2,
    "conv_kernel": 4,
    "expand": 1,
    "chunk_size": 64,
    "use_conv_bias": True,
    "mamba_proj_bias": False,
    "mamba_hidden_act": "silu",
    "mamba_ssm_cache_dtype": "float32",
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 0.0001,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 256,
    "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 512,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "intermediate_size": 256,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "max_position_embeddings": 4096,
    "layer_norm_epsilon": 1e-05,
    "residual_in_fp32": False,
    "rescale_prenorm_residual": True,
    "use_bias": False,
    "use_mamba_kernels": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, texts):
    ids = []
    for enc in tok.encode_batch(list(texts)):
        ids += [1] + enc.ids + [2]
    return torch.tensor(ids, dtype=torch.long)


def init_weights(arch, seed: int):
    g = torch.Generator().manual_seed(seed)
    std = CONFIG["initializer_range"]
    w = {}
    for t in arch.tensors:
        name = t.name
        if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
            w[name] = torch.ones(t.shape)
        elif name.endswith("A_log"):
            w[name] = torch.log(torch.arange(1, t.shape[0] + 1, dtype=torch.float32))
        elif name.endswith("dt_bias"):
            lo, hi = math.log(CONFIG["time_step_min"]), math.log(CONFIG["time_step_max"])
            dt = torch.exp(torch.rand(t.shape, generator=g) * (hi - lo) + lo).clamp(min=CONFIG["time_step_floor"])
            w[name] = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(t.shape[-1])
            w[name] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        elif name.endswith("conv1d.bias") or name.endswith("e_score_correction_bias"):
            w[name] = torch.zeros(t.shape)
        else:
            w[name] = torch.randn(t.shape, generator=g) * std
            if name.endswith(("out_proj.weight", "down_proj.weight", "o_proj.weight")):
                w[name] /= math.sqrt(2 * arch.num_layers)
    return w


def batches(ids: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    n = (len(ids) - 1) // seq
    order = []
    for step in range(steps):
        if len(order) < batch:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        pick, order = order[:batch], order[batch:]
        x = torch.stack([ids[i * seq: i * seq + seq + 1] for i in pick])
        yield step, x[:, :-1], x[:, 1:]


@torch.no_grad()
def perplexity(arch, weights, ids: torch.Tensor, seq: int) -> float:
    n = (len(ids) - 1) // seq
    nll, count = 0.0, 0
    for s in range(0, n, 8):
        rows = torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(s, min(n, s + 8))])
        logits = forward.logits(arch, weights, rows[:, :-1])
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
        count += rows[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[eval_ids[1:]].mean().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "omniq" / "bundled" / "tiny"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias-rate", type=float, default=1e-2, help="router bias update per step (loss-free balancing)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_texts = docstrings.texts("train")
    tok = train_tokenizer(train_texts, CONFIG["vocab_size"])
    train_ids = encode_docs(tok, train_texts)
    eval_ids = encode_docs(tok, docstrings.texts("eval"))
    print(f"corpus: {len(train_texts)} docstrings, {len(train_ids)} training tokens, "
          f"{sum(map(len, train_texts)) / len(train_ids):.2f} chars/token", flush=True)

    arch = from_config(CONFIG)
    weights = init_weights(arch, args.seed)
    params = {k: torch.nn.Parameter(v) for k, v in weights.items() if not k.endswith("e_score_correction_bias")}
    biases = {k: v for k, v in weights.items() if k.endswith("e_score_correction_bias")}
    decay = [p for k, p in params.items() if p.ndim >= 2 and "conv1d" not in k]
    no_decay = [p for k, p in params.items() if not (p.ndim >= 2 and "conv1d" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        frac = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    all_w = {**params, **biases}
    moe_layers = arch.layers_of("E")
    for step, x, y in batches(train_ids, args.seq, args.batch, args.steps, args.seed):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        stats: dict = {}
        logits = forward.logits(arch, all_w, x, route_stats=stats)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        with torch.no_grad():  # loss-free load balancing
            imbalance = []
            for i in moe_layers:
                load = stats[i].float()
                biases[f"backbone.layers.{i}.mixer.gate.e_score_correction_bias"] += args.bias_rate * torch.sign(load.mean() - load)
                imbalance.append((load.max() / load.mean()).item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"expert load max/mean {max(imbalance):.2f}  {time.time() - t0:.0f}s", flush=True)

    final = {k: v.detach() for k, v in all_w.items()}
    ppl = perplexity(arch, final, eval_ids, args.seq)
    bf16 = {k: (v.float() if ".gate." in k else v.to(torch.bfloat16)).contiguous() for k, v in final.items()}
    ppl_bf16 = perplexity(arch, bf16, eval_ids, args.seq)
    uni = unigram_perplexity(train_ids, eval_ids, CONFIG["vocab_size"])
    print(f"held-out perplexity: model {ppl:.2f} (bf16 {ppl_bf16:.2f}), unigram {uni:.2f}", flush=True)

    from safetensors.torch import save_file
    save_file(bf16, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": CONFIG["max_position_embeddings"],
        "extra_special_tokens": {"image_token": "<image>", "sound_token": "<sound>"},
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({
        "script": "scripts/train_tiny.py", "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq, "lr": args.lr, "bias_rate": args.bias_rate, "text": docstrings.identity(), "train_tokens": len(train_ids),
        "eval_tokens": len(eval_ids), "eval_perplexity_fp32": round(ppl, 3), "eval_perplexity_bf16": round(ppl_bf16, 3),
        "unigram_perplexity": round(uni, 3), "params": arch.num_params,
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"saved to {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
