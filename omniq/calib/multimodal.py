"""Calibration batches for an Omni checkpoint's language model: text, image+text and audio+text samples.

`--calib-mix text:0.5,image:0.25,audio:0.25` splits the calibration token budget (`--calib-samples` x
`--calib-seq-len`) between modalities (`media.mix_budget`); the default for an Omni checkpoint is
`DEFAULT_OMNI_MIX`, for a text-only NemotronH `text:1` (the plain text path, untouched).

- text: rows of `--calib-seq-len` tokens from the text calibration source (`omniq.calib.data`), enough rows
  to cover the text budget, fed as `input_ids` (the model's own embedding), up to `BATCH_SIZE` per forward.
- image / audio: the bundled generated `calib` split (`omniq.calib.media`, disjoint from the `eval` split
  `omniq validate` uses), samples taken in order until their tokens reach the budget (`media.take`). Their
  embeddings come from the checkpoint's own towers and projectors, run by omniq's torch functions
  (`omni.multimodal_embeds`), spliced at the context tokens and fed as bf16 `inputs_embeds`, one sample per
  forward (the calibration Mamba mixer refuses padding).

Token accounting (`ModalityCounter`): every token passes through every Mamba, attention and shared-expert
layer, so those layers see the per-modality totals; `lm_head` sees the last position of each forward
(`logits_to_keep=1`); a forward hook on each MoE router counts, per routed expert, the tokens of each
modality the router sent to it. The result is written per quantized layer into omniq.json.
"""

from __future__ import annotations

import contextlib

import hashlib
import math
from dataclasses import dataclass, field

from omniq.calib import data as calib_data
from omniq.calib import media
from omniq.errors import OmniqError
from omniq.model import names

DEFAULT_OMNI_MIX = "text:0.5,image:0.25,audio:0.25"
TEXT_BATCH = 4
MODALITIES = media.MODALITIES     # ("text", "image", "audio"); index = omni.token_modalities' code


def default_mix(is_omni: bool, cfg: dict | None = None, media_source=None) -> str:
    """The mix used without --calib-mix: text for a text-only model; for an Omni checkpoint text plus every
    modality it has a tower for (with --calib-media: every such modality the user's media has)."""
    if not is_omni:
        return "text:1"
    cfg = cfg or {}
    parts = ["text:0.5"]
    has = [m for m, key in (("image", "vision_config"), ("audio", "sound_config")) if cfg.get(key)
           and (media_source is None or media_source.samples.get(m))]
    parts += [f"{m}:{0.5 / len(has):g}" for m in has]
    return ",".join(parts) if has else "text:1"


@dataclass
class Batch:
    """One calibration forward: model keyword arguments and the modality code of every position."""
    kwargs: dict
    modality: "object"         # (b, L) int64: 0 text, 1 image, 2 audio
    sha256: str

    @property
    def tokens(self) -> dict[str, int]:
        return {m: int((self.modality == k).sum()) for k, m in enumerate(MODALITIES)}


@dataclass
class MultimodalSet:
    batches: list[Batch]
    mix: dict[str, float]
    budget: dict[str, int]
    identity: dict
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> dict[str, int]:
        out = dict.fromkeys(MODALITIES, 0)
        for b in self.batches:
            for m, n in b.tokens.items():
                out[m] += n
        return out


def _sha(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def build(ckpt, mix: dict[str, float], *, calib: str = calib_data.DEFAULT, calib_column: str = "text",
          calib_split: str = "train", samples: int = 64, seq_len: int = 256, weights=None,
          dtype: str = "bfloat16", media_source=None, calib_format: str = "text",
          reasoning_share: float | None = None) -> MultimodalSet:
    """The calibration batches of an Omni checkpoint for `mix` (shares of modalities). `media_source`
    (`omniq.calib.user_media.MediaSource`, from --calib-media): the user's samples instead of the bundled
    calib split, for every modality it has."""
    import torch

    from omniq.model import omni, towers

    media.check_mix(mix, ckpt.config, ckpt.is_omni)
    wanted = [m for m in ("image", "audio") if mix.get(m)]
    if wanted:            # before any work: can omniq run this checkpoint's towers at all?
        towers.check_supported(ckpt.config, ckpt.headers)
    budget = media.mix_budget(mix, samples * seq_len)
    tok = ckpt.tokenizer
    batches: list[Batch] = []
    identity: dict = {"mix": dict(mix), "budget_tokens": dict(budget)}
    counts: dict[str, int] = {}
    if budget.get("text"):
        rows_needed = max(1, math.ceil(budget["text"] / seq_len))
        text = calib_data.load(calib, tok, samples=rows_needed, seq_len=seq_len, column=calib_column,
                               split=calib_split, fmt=calib_format, reasoning_share=reasoning_share)
        top = int(text.rows.max())
        if top >= ckpt.arch.vocab_size:
            raise OmniqError(f"{ckpt.path}: the tokenizer produced token id {top} but the model's vocab_size is "
                             f"{ckpt.arch.vocab_size}; tokenizer and model do not match")
        for i in range(0, text.rows.shape[0], TEXT_BATCH):
            rows = text.rows[i:i + TEXT_BATCH]
            batches.append(Batch({"input_ids": rows}, torch.zeros_like(rows), _sha(rows)))
        identity["text"] = dict(text.identity)
        counts["text"] = int(text.rows.shape[0])
    wanted = [m for m in ("image", "audio") if budget.get(m)]
    if wanted:
        tokens = omni.context_tokens(ckpt.config, tok)
        if weights is None:
            names = [n for n in ckpt.headers if omni.component_of(n) != "language_model"]
            names.append(f"{ckpt.arch.prefix}backbone.embeddings.weight")
            weights = {k: v.float() for k, v in ckpt.read(names).items()}
        for m in wanted:
            own = media_source.samples.get(m) if media_source is not None else None
            where = f"{media_source.spec} ({m})" if own else f"bundled-{m} (calib split)"
            inputs = (media.model_inputs(s, ckpt.config, tok, tokens) for s in (own or media.bundled(m, "calib")))
            chosen = media.take(inputs, budget[m], where)
            for x in chosen:
                with torch.no_grad():
                    emb = omni.multimodal_embeds(ckpt.config, ckpt.arch, weights, x.input_ids, pixels=x.pixels,
                                                 features=x.features, tokens=tokens)
                emb = emb.to(getattr(torch, dtype))
                batches.append(Batch({"inputs_embeds": emb}, omni.token_modalities(x.input_ids, tokens),
                                     _sha(x.input_ids)))
            identity[m] = media_source.identity(m) if own else media.identity(m, "calib")
            counts[m] = len(chosen)
    return MultimodalSet(batches=batches, mix=dict(mix), budget=budget, identity=identity, samples=counts)


# ----- calibration forwards and per-modality token counts ----------------------------------------------
class ModalityCounter:
    """Counts calibration tokens per modality: in total, at lm_head, and per routed expert of each MoE layer
    (a forward hook on each router reads its top-k choice)."""

    def __init__(self, model):
        self.total = dict.fromkeys(MODALITIES, 0)
        self.last = dict.fromkeys(MODALITIES, 0)       # positions lm_head computes (logits_to_keep=1)
        self.experts: dict[int, "object"] = {}         # layer -> (E, 3) int64
        self._current = None
        self._handles = []
        for i, block in enumerate(model.model.layers):
            gate = getattr(block.mixer, "gate", None)
            n = getattr(gate, "num_experts", None) or getattr(gate, "n_routed_experts", None)
            if gate is not None and n:
                self._handles.append(gate.register_forward_hook(self._hook(i, int(n))))

    def _hook(self, layer: int, n_experts: int):
        import torch

        def hook(module, args, output):
            if self._current is None:
                return
            idx = output[-1]                                   # (tokens, top_k)
            mod = self._current.reshape(-1).to(idx.device)
            if mod.numel() != idx.shape[0]:
                return
            table = self.experts.setdefault(layer, torch.zeros(n_experts, len(MODALITIES), dtype=torch.int64))
            flat = idx.reshape(-1).long() * len(MODALITIES) + mod[:, None].expand_as(idx).reshape(-1)
            table += torch.bincount(flat.cpu(), minlength=n_experts * len(MODALITIES)).reshape(
                n_experts, len(MODALITIES))
        return hook

    def forward(self, model, batch: Batch) -> None:
        """One calibration forward of `batch`, counted."""
        device = next(model.parameters()).device
        with self.observing(batch):
            model(**{k: v.to(device) for k, v in batch.kwargs.items()}, use_cache=False, logits_to_keep=1)
        self.count(batch)

    @contextlib.contextmanager
    def observing(self, batch: Batch):
        """Router hooks attribute the tokens they see to `batch`'s modalities while the block runs (the
        layer-streamed quantize runs one layer of one batch at a time)."""
        self._current = batch.modality
        try:
            yield
        finally:
            self._current = None

    def count(self, batch: Batch) -> None:
        """Add `batch` to the per-modality totals (once per batch)."""
        for k, m in enumerate(MODALITIES):
            self.total[m] += int((batch.modality == k).sum())
            self.last[m] += int((batch.modality[:, -1] == k).sum())

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def per_layer(self, plan) -> dict[str, dict[str, int]]:
        """Quantized layer (hub name) -> tokens of each modality it saw during calibration."""
        out = {}
        for lin in plan.quantized:
            if lin.name.endswith("lm_head"):
                counts = dict(self.last)
            else:
                m = names.expert_of(lin.name)
                if m and m[0] in self.experts:
                    row = self.experts[m[0]][m[1]]
                    counts = {mod: int(row[k]) for k, mod in enumerate(MODALITIES)}
                else:
                    counts = dict(self.total)
            out[lin.name] = counts
        return out


def summary(per_layer: dict[str, dict[str, int]]) -> dict:
    """Compact facts for the CLI: totals, and for each modality how many quantized layers saw none of it."""
    mods = [m for m in MODALITIES if any(c[m] for c in per_layer.values())]
    return {"layers": len(per_layer),
            "min": {m: min((c[m] for c in per_layer.values()), default=0) for m in mods},
            "max": {m: max((c[m] for c in per_layer.values()), default=0) for m in mods},
            "layers_without": {m: sum(1 for c in per_layer.values() if not c[m]) for m in mods}}
