"""The layer plan as a ModelOpt 0.47 quantization config, on transformers 5's native module names.

One mapping, `modelopt_config(plan)`: every quantizer is first disabled, then exactly the quantizers of the
plan's quantized linear layers (and the KV-cache quantizers when the plan asks for an FP8 KV cache) are
enabled with their format. Nothing else can be quantized by accident: the router (not an `nn.Linear` in
transformers' NemotronH), Mamba `conv1d`, `lm_head`, embeddings and any tower stay disabled because no entry
names them. The config is ModelOpt 0.47's ordered list form (`{"quantizer_name", "cfg", "enable"}`; later
entries win); its legacy dict form is deprecated.

Quantizer names ModelOpt 0.47 gives NemotronH (learnt from `mtq.quantize` on the bundled model):
    plain linear    model.layers.{i}.mixer.in_proj.weight_quantizer / .input_quantizer (.output_quantizer
                    unused); the same under q_proj, k_proj, v_proj, o_proj, out_proj,
                    shared_experts.{up,down}_proj, and the dense `-` layers' up_proj / down_proj
    routed experts  `NemotronHExperts` (fused 3-D `up_proj` (E, I, H) / `down_proj` (E, H, I)) becomes
                    `_QuantNonGatedFusedExperts`: one weight quantizer per expert,
                    model.layers.{i}.mixer.experts.up_proj_weight_quantizers.{e} (and down_proj_...), and ONE
                    input quantizer per projection shared by all experts of the layer,
                    model.layers.{i}.mixer.experts.up_proj_input_quantizer (and down_proj_...)
    KV cache        `NemotronHAttention` becomes `_QuantAttention`: model.layers.{i}.mixer.k_bmm_quantizer and
                    v_bmm_quantizer; export turns their amax into k_proj.k_scale / v_proj.v_scale
                    (amax / 448). q_bmm_quantizer and p_bmm_quantizer stay off.

Because the experts of one layer share their input quantizer, a plan must give all routed experts of a
layer the same format per projection (`make_plan` refuses anything else; checked again here).
"""

from __future__ import annotations

from dataclasses import dataclass

from omniq.model.arch import ATTENTION, Linear, native_name
from omniq.quant import formats as qformats
from omniq.quant.plan import LayerPlan, check_experts_share_formats

FP8 = qformats.FP8.modelopt_quantizer
NVFP4 = qformats.NVFP4.modelopt_quantizer
QUANTIZER_CFG = {name: f.modelopt_quantizer for name, f in qformats.FORMATS.items()}
KV_CFG = {"fp8": FP8}
ALGORITHM = "max"


@dataclass(frozen=True)
class Quantizers:
    """The ModelOpt quantizer names that quantize one linear layer of the plan."""

    weight: str
    input: str


def quantizers_of(lin: Linear, prefix: str = "") -> Quantizers:
    """Weight and input quantizer names of one hub-layout linear layer in transformers' native model."""
    module = native_name(lin.name, prefix)
    if lin.expert is not None:
        proj = lin.name.rsplit(".", 1)[1]                   # up_proj | down_proj
        return Quantizers(f"{module}.{proj}_weight_quantizers.{lin.expert}", f"{module}.{proj}_input_quantizer")
    return Quantizers(f"{module}.weight_quantizer", f"{module}.input_quantizer")


def kv_quantizers(plan: LayerPlan) -> list[str]:
    arch = plan.arch
    out = []
    for i in arch.layers_of(ATTENTION):
        module = native_name(f"{arch.layer_prefix(i)}.mixer", arch.prefix)
        out += [f"{module}.k_bmm_quantizer", f"{module}.v_bmm_quantizer"]
    return out


def enabled_quantizers(plan: LayerPlan) -> dict[str, str]:
    """Every quantizer the plan enables -> its format (fp8 | nvfp4), in a stable order."""
    check_experts_share_formats(plan)
    out: dict[str, str] = {}
    for lin in plan.quantized:
        fmt = plan.formats[lin.name]
        q = quantizers_of(lin, plan.arch.prefix)
        out[q.weight] = fmt
        out[q.input] = fmt
    if plan.kv_cache:
        for name in kv_quantizers(plan):
            out[name] = plan.kv_cache
    return out


def modelopt_config(plan: LayerPlan) -> dict:
    """The ModelOpt quantize config (`mtq.quantize(model, config, forward_loop)`) of a layer plan."""
    kv = set(kv_quantizers(plan)) if plan.kv_cache else set()
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    expert_weights_done: set[tuple[str, str]] = set()
    for name, fmt in enabled_quantizers(plan).items():
        cfg = KV_CFG[fmt] if name in kv else QUANTIZER_CFG[fmt]
        module, _, leaf = name.rpartition(".")
        if leaf.isdigit():
            # Per-expert weight quantizers of one layer share a format (checked above): one wildcard entry
            # per layer and projection instead of one entry per expert keeps the config (and ModelOpt's
            # O(entries x modules) matching) small on 128-expert models.
            if (module, fmt) in expert_weights_done:
                continue
            expert_weights_done.add((module, fmt))
            name = f"{module}.*"
        entries.append({"quantizer_name": name, "cfg": _copy(cfg), "enable": True})
    return {"quant_cfg": entries, "algorithm": ALGORITHM}


def _copy(cfg: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
