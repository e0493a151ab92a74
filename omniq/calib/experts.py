"""Expert coverage during calibration: count the tokens each routed expert sees, and make every expert count.

What ModelOpt calibrates for routed experts (transformers' fused `NemotronHExperts`, ModelOpt's
`_QuantNonGatedFusedExperts`; see `omniq.quant.modelopt_config`):
- one **weight** quantizer per expert and projection. With `max` calibration its amax is `max |W|` of that
  expert's own weight, independent of the calibration data; ModelOpt computes it for every expert, routed or
  not (checked on the bundled model with experts the router never picks). Weight scales are never the problem.
- ONE **input** quantizer per projection, shared by all experts of the layer (the export writes the same
  `input_scale` for every expert). `up_proj`'s sees the layer input; `down_proj`'s sees only the intermediate
  activations of the experts that actually processed tokens. An expert that receives no tokens contributes
  nothing to the layer's `down_proj` input scale: if it is routed at serving time its activations are
  quantized with a scale that never saw them (clipping, or for NVFP4 a badly placed global scale).

So in omniq an expert is **calibrated** when at least `min_tokens` calibration tokens went through it while
the shared input quantizers were observing (its activations are part of the layer's input scales), and
**uncalibrated** otherwise. Counts per expert, per MoE layer, are written to omniq.json:
- `routed`: tokens the model's real top-k routing sent to the expert (what a serving engine would do);
- `calibrated`: tokens whose activations reached the quantizers through the expert (routed + forced below).

Policies (`--expert-calibration`):
- `all` (default): real top-k routing still produces every MoE layer's output (later layers see true
  activations), and in addition, for statistics only, each expert with fewer than `min_tokens` tokens so far
  processes tokens of the current batch that were not routed to it, until it has `min_tokens` (its output is
  discarded). Cost: at most `min_tokens` extra tokens per expert per layer over the whole calibration; the
  forced tokens are the first eligible ones of the earliest batches. Trade-off (same as llm-compressor's
  all-experts calibration): a token an expert would never get can widen the shared `down_proj` input scale.
- `routed`: real routing only (`calibrated == routed`); experts below `min_tokens` are uncalibrated.

Experts still uncalibrated after the policy fail the run (exit 1, naming them) unless either
- a fill rule covers them (`--expert-fill layer-max`): the expert is exported with its layer's shared input
  scales, i.e. the maximum over the input statistics of the experts of that layer that were observed (the
  peers' "fill missing scales from the layer's maximum"); with ModelOpt's shared input quantizers this is
  exactly what the exported files hold, so the rule changes no number: it is the documented, recorded
  decision that those experts' activations are assumed to lie within the observed experts' range. The filled
  experts are listed in omniq.json (`experts.filled`).
- or the user passes `--allow-uncalibrated-experts`: the run proceeds and omniq.json lists them under
  `experts.uncalibrated` with `allow_uncalibrated: true`.
A layer whose shared input quantizers observed nothing at all cannot be filled (no statistic exists); that is
caught by the calibration check (`omniq.quant.calibrate.check_calibrated`).

`ExpertCoverage.installed(model)` registers forward hooks on the experts modules (hooks survive ModelOpt's
in-place class conversion); the hooks read `top_k_index` from the experts call, so counting does not depend
on the router's implementation.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field

from omniq.errors import GateFailed, OmniqError
from omniq.model import names

POLICIES = ("all", "routed")
FILLS = ("none", "layer-max")
DEFAULT_MIN_TOKENS = 64


@dataclass(frozen=True)
class ExpertPolicy:
    mode: str = "all"                   # all | routed
    min_tokens: int = DEFAULT_MIN_TOKENS
    fill: str = "none"                  # none | layer-max
    allow_uncalibrated: bool = False

    def __post_init__(self):
        if self.mode not in POLICIES:
            raise OmniqError(f"--expert-calibration {self.mode!r}: choose one of {', '.join(POLICIES)}")
        if self.fill not in FILLS:
            raise OmniqError(f"--expert-fill {self.fill!r}: choose one of {', '.join(FILLS)}")
        if self.min_tokens < 1:
            raise OmniqError(f"--min-expert-tokens {self.min_tokens}: must be at least 1")


@dataclass
class LayerCounts:
    name: str                          # hub-layout module name, e.g. backbone.layers.1.mixer.experts
    routed: list[int]
    forced: list[int]

    @property
    def calibrated(self) -> list[int]:
        return [r + f for r, f in zip(self.routed, self.forced)]


@dataclass
class ExpertCoverage:
    policy: ExpertPolicy
    arch: object                       # omniq.model.arch.Arch of the model
    layers: dict[int, LayerCounts] = field(default_factory=dict)
    _busy: bool = False

    # ----- hooks ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, model):
        """Count (and under `all`, top up) expert tokens while the block runs on `model`."""
        from omniq.model.arch import MOE

        arch = self.arch
        modules = dict(model.named_modules())
        handles = []
        try:
            for i in arch.layers_of(MOE):
                native = _find(modules, i)
                experts = modules[native]
                n = int(experts.num_experts)
                self.layers.setdefault(i, LayerCounts(f"{arch.layer_prefix(i)}.mixer.experts", [0] * n, [0] * n))
                handles.append(experts.register_forward_hook(self._hook(i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
        if self.layers and not any(sum(c.routed) for c in self.layers.values()):
            raise RuntimeError("expert coverage hooks counted no tokens: the experts modules were replaced or "
                               "never called during calibration")

    def _hook(self, layer: int):
        import torch

        def hook(module, args, kwargs, output):
            if self._busy:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            counts = self.layers[layer]
            n = len(counts.routed)
            routed = torch.bincount(index.reshape(-1).long(), minlength=n).tolist()
            for e in range(n):
                counts.routed[e] += int(routed[e])
            if self.policy.mode != "all":
                return None
            tokens, experts = [], []
            for e in range(n):
                need = self.policy.min_tokens - counts.routed[e] - counts.forced[e]
                if need <= 0:
                    continue
                free = (~(index == e).any(dim=-1)).nonzero().flatten()[:need]
                if free.numel():
                    tokens.append(free)
                    experts.append(torch.full_like(free, e))
                    counts.forced[e] += int(free.numel())
            if tokens:
                tok = torch.cat(tokens)
                idx = torch.cat(experts).view(-1, 1).to(index.dtype)
                w = torch.zeros(idx.shape, dtype=weights.dtype, device=weights.device)
                self._busy = True
                try:
                    with torch.no_grad():
                        module(hidden[tok], idx, w)       # statistics only: output discarded
                finally:
                    self._busy = False
            return None

        return hook

    # ----- results ----------------------------------------------------------------------------------------
    def below(self, which: str = "calibrated") -> dict[str, list[int]]:
        """{layer module name: [expert indices]} with fewer than min_tokens `which` tokens."""
        out = {}
        for c in self.layers.values():
            counts = getattr(c, which)
            low = [e for e, k in enumerate(counts) if k < self.policy.min_tokens]
            if low:
                out[c.name] = low
        return out

    def enforce(self) -> None:
        """Fail (exit 1, naming the experts) when experts stay uncalibrated and neither a fill rule nor
        --allow-uncalibrated-experts covers them."""
        low = self.below()
        if not low or self.policy.fill != "none" or self.policy.allow_uncalibrated:
            return
        names = [f"{layer}.{e} ({self.layers_by_name()[layer].calibrated[e]} tokens)"
                 for layer, es in low.items() for e in es]
        more = f" (and {len(names) - 8} more)" if len(names) > 8 else ""
        raise GateFailed(
            f"{len(names)} routed experts got fewer than {self.policy.min_tokens} calibration tokens under "
            f"--expert-calibration {self.policy.mode}: {', '.join(names[:8])}{more}; their activations never "
            "reached the layer's shared input scales. Use --expert-calibration all, --expert-fill layer-max, "
            "more calibration data, or --allow-uncalibrated-experts")

    def layers_by_name(self) -> dict[str, LayerCounts]:
        return {c.name: c for c in self.layers.values()}

    def manifest(self) -> dict:
        low = self.below()
        filled = low if self.policy.fill != "none" else {}
        return {
            "policy": self.policy.mode,
            "min_tokens": self.policy.min_tokens,
            "fill": self.policy.fill,
            "allow_uncalibrated": self.policy.allow_uncalibrated,
            "layers": {c.name: {"routed": list(c.routed), "calibrated": c.calibrated}
                       for c in self.layers.values()},
            "below_min_routed": self.below("routed"),
            "filled": filled,
            "uncalibrated": {} if filled else low,
        }

    def summary(self) -> list[str]:
        """One compact line per MoE layer: min / median of routed (and calibrated) tokens, count below min."""
        m = self.policy.min_tokens
        lines = []
        for c in self.layers.values():
            r, k = c.routed, c.calibrated
            low_r = sum(1 for x in r if x < m)
            text = f"{c.name}: routed min {min(r)} / median {statistics.median(r):g}, {low_r}/{len(r)} below {m}"
            if self.policy.mode == "all":
                low_k = sum(1 for x in k if x < m)
                text += f"; calibrated min {min(k)} / median {statistics.median(k):g}, {low_k} below {m}"
            lines.append(text)
        return lines


def _find(modules: dict, layer: int) -> str:
    pat = names.experts_module_pattern(layer)
    hits = [n for n in modules if pat.search(n)]
    if len(hits) != 1:
        raise RuntimeError(f"expected one experts module of MoE layer {layer}, found {hits or 'none'}")
    return hits[0]
