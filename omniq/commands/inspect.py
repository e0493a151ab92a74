"""What `omniq inspect` shows: a checkpoint's architecture and, with a recipe, what each module becomes.

Architecture: layer pattern and kinds, parameters by component (Mamba, attention, routed experts, shared
experts, router, embeddings, lm_head, norms, dense MLP), the declared quantization of an already-quantized
checkpoint, and the tensors outside the language model (an Omni checkpoint's towers, from the safetensors
headers). With a recipe: the layer plan's modules grouped compactly per format (the same grouping as
`omniq plan`) and the estimated output size from `LayerPlan.total_bytes`. No tensor is loaded; torch is not
imported. MODEL is a checkpoint directory, a config.json, a bundled name, or a hub id (only its config.json
is downloaded).
"""

from __future__ import annotations

from omniq.model.arch import ATTENTION, KIND_NAMES, MAMBA, MLP, MOE

GiB = 1024 ** 3
COMPONENTS = ("mamba", "attention", "routed_experts", "shared_experts", "router", "mlp", "embeddings", "lm_head",
              "norms")


def inspect_model(model: str, recipe: str | None = None, kv_cache: str | None = None) -> dict:
    from omniq.quant import plan_report
    from omniq.quant import recipe as recipes
    from omniq.quant.plan import make_plan

    source = plan_report.open_source(_hub_config(model) or model)
    arch = source.arch
    by_comp = arch.params_by_component()
    out: dict = {
        "model": {"input": model, "path": str(source.path), "kind": source.kind, "omni": source.is_omni,
                  "layers": arch.num_layers, "pattern": arch.pattern,
                  "kinds": {KIND_NAMES[k]: arch.layers_of(k) for k in (MAMBA, MOE, ATTENTION, MLP)
                            if arch.layers_of(k)},
                  "mamba_feeding_attention": arch.mamba_feeding_attention,
                  "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size,
                  "routed_experts": arch.n_routed_experts, "experts_per_token": arch.num_experts_per_tok,
                  "params": arch.num_params,
                  "params_by_component": {c: by_comp[c] for c in COMPONENTS if by_comp.get(c)}},
        "stored_bytes": source.stored_bytes,
        "passthrough_bytes": source.passthrough_bytes,
        "quantization": None,
    }
    ckpt = source.checkpoint
    if ckpt is not None and ckpt.is_quantized:
        q = ckpt.quantization or {}
        q = q.get("quantization", q)
        out["quantization"] = {"quant_algo": q.get("quant_algo"),
                               "kv_cache_quant_algo": q.get("kv_cache_quant_algo")}
    if recipe is None:
        return out
    rec = recipes.load(recipe).with_kv_cache(kv_cache)
    plan = make_plan(arch, rec)
    groups = {}
    for fmt in ("nvfp4", "fp8", "bf16"):
        names = [m for m, f in plan.formats.items() if f == fmt]
        if names:
            groups[fmt] = [{"modules": p, "count": n} for p, n in plan_report.group_names(names)]
    extra = sum((source.passthrough_bytes or {}).values())
    out["plan"] = {"recipe": rec.name, "quant_algo": plan.quant_algo, "kv_cache": plan.kv_cache,
                   "layers": plan.counts, "groups": groups, "never_quantized": ["router (mixer.gate)", "Mamba conv1d", "embeddings", "norms", "lm_head"],
                   "estimated_bytes": plan.total_bytes + extra, "language_model_bytes": plan.total_bytes,
                   "bytes_by_format": dict(plan.bytes_by_format),
                   "bits_per_weight": round(plan.bits_per_weight, 3), "warnings": plan.warnings}
    return out


def _hub_config(model: str) -> str | None:
    """For a hub id (org/name) that is not a local path or bundled name: its config.json, downloaded alone
    (inspecting needs no weights)."""
    from pathlib import Path

    from omniq.errors import OmniqError
    from omniq.model.checkpoint import bundled_names

    if Path(model).expanduser().exists() or model in bundled_names() or model.count("/") != 1 \
            or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model, "config.json")
    except Exception as e:  # noqa: BLE001 - network / auth / not found: all fixable by the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmniqError(f"{model}: could not download its config.json from the hub ({type(e).__name__}: "
                         f"{first}); check the id, your network and HF_TOKEN, or pass a local directory") from None


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.3f} GiB"


def render(s: dict) -> list:
    from rich.table import Table
    from rich.text import Text

    m = s["model"]
    head = Text()
    head.append(m["input"], style="bold")
    head.append(f"  ({m['kind']}{', Omni' if m['omni'] else ''})\n")
    kinds = ", ".join(f"{len(v)} {k}" for k, v in m["kinds"].items())
    head.append(f"{m['layers']} layers ({kinds}), pattern {m['pattern']}\n")
    head.append(f"hidden {m['hidden_size']}, vocab {m['vocab_size']}, {m['routed_experts']} routed experts "
                f"(top-{m['experts_per_token']}); Mamba layers feeding attention: {m['mamba_feeding_attention']}")
    if s["quantization"]:
        q = s["quantization"]
        head.append(f"\nalready quantized: {q['quant_algo']}, KV cache {q['kv_cache_quant_algo'] or 'none'}",
                    style="yellow")
    out = [head]
    t = Table(title="parameters by component", title_justify="left")
    t.add_column("component")
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    total = m["params"]
    for comp, n in m["params_by_component"].items():
        t.add_row(comp.replace("_", " "), f"{n:,}", f"{100 * n / total:.1f} %")
    t.add_row("total", f"{total:,}", "", style="bold")
    out.append(t)
    if s["passthrough_bytes"]:
        out.append(Text("outside the language model: " + ", ".join(
            f"{k} {_gib(v)}" for k, v in s["passthrough_bytes"].items())))
    if s["stored_bytes"] is not None:
        out.append(Text(f"stored: {_gib(s['stored_bytes'])}"))
    p = s.get("plan")
    if p:
        t = Table(title=f"recipe {p['recipe']}: quant_algo {p['quant_algo'] or 'none'}, KV cache "
                        f"{(p['kv_cache'] or 'none').upper()}", title_justify="left")
        t.add_column("format")
        t.add_column("modules", overflow="fold")
        t.add_column("n", justify="right")
        for fmt, rows in p["groups"].items():
            for k, row in enumerate(rows):
                t.add_row(fmt if k == 0 else "", row["modules"], str(row["count"]))
        out.append(t)
        out.append(Text(f"never quantized: {', '.join(p['never_quantized'])}"))
        out.append(Text(f"estimated output: {_gib(p['estimated_bytes'])} ({p['bits_per_weight']} bits per "
                        f"language-model weight)", style="bold"))
        for w in p["warnings"]:
            out.append(Text(f"warning: {w}", style="yellow"))
    return out
