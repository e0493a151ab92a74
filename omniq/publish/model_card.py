"""The model card (README.md) of a published artifact, written from what the artifact says about itself.

Sections: the recipe as resolved, what was kept in BF16 (the recipe's rules and the concrete modules,
grouped), the measured deltas against the source with their gates, task accuracy when the artifact carries
an eval.json (`omniq eval`), source and provenance (file hashes,
calibration, versions), and how to serve it with TensorRT-LLM (PyTorch backend) and vLLM. Nothing in it is
made up: a number that was not measured is shown as "not measured".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omniq import __version__
from omniq.publish import release as rel

DELTA_ROWS = (   # key, label, gate key, "max" or "min"
    ("kl_mean", "KL divergence, mean (nats/token)", "max_kl", "max"),
    ("kl_p95", "KL divergence, p95 (nats/token)", None, None),
    ("top1_agreement", "top-1 agreement", "min_top1", "min"),
    ("ppl_reference", "perplexity, source", None, None),
    ("ppl_candidate", "perplexity, quantized", None, None),
    ("ppl_ratio", "perplexity ratio", "max_ppl_ratio", "max"),
    ("tokens", "evaluated tokens", None, None),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "not measured" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def group_modules(names) -> list[tuple[str, int, str]]:
    """Module names with their numeric indices folded: [(pattern with `*`, count, indices of the first `*`)]."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        pattern = _INDEX.sub("*", name)
        idx = _INDEX.search(name)
        groups.setdefault(pattern, []).append(idx.group(0) if idx else "")
    out = []
    for pattern, idxs in sorted(groups.items()):
        uniq = sorted({int(i) for i in idxs if i}, key=int)
        out.append((pattern, len(idxs), ", ".join(map(str, uniq))))
    return out


def data_format(ident: dict | None) -> str | None:
    """How calibration or evaluation text was made, from its recorded identity (omniq.json `calibration`,
    an Omni mix's `calibration.text`, validation.json `eval`): chat conversations with their reasoning share,
    or plain text; None when the identity records no format (artifacts from before chat data)."""
    if not isinstance(ident, dict):
        return None
    if isinstance(ident.get("text"), dict):          # an Omni calibration mix: its text part
        ident = ident["text"]
    fmt = ident.get("format")
    if fmt == "chat":
        share, conv = ident.get("reasoning_share"), ident.get("conversations") or {}
        counts = (f" ({_fmt(conv.get('reasoning_on'))} on, {_fmt(conv.get('reasoning_off'))} off)"
                  if conv else "")
        return (f"chat: conversations (column `{ident.get('column', 'messages')}`) rendered through the "
                f"checkpoint's chat template, reasoning on for a share of {_fmt(share)}{counts}")
    return "text" if fmt == "text" else None


def quant_flags(formats: dict[str, int]) -> tuple[str, str]:
    """(vLLM --quantization, short format label) from the per-format layer counts."""
    quantized = {f for f in formats if f != "bf16"}
    if quantized == {"fp8"}:
        return "modelopt", "FP8"
    if "nvfp4" in quantized:
        return "modelopt_fp4", "NVFP4" if quantized == {"nvfp4"} else "NVFP4 + FP8 (mixed)"
    return "", "BF16"


def render(release: rel.Release, repo_id: str | None = None) -> str:
    meta = rel.metadata(release)
    recipe, formats, deltas, gates = meta["recipe"], meta["formats"], meta["deltas"], meta["gates"]
    src = meta["source"]
    source_name = src["model"]
    hub_id = source_name if _HUB_ID.match(source_name) and not Path(source_name).exists() else None
    vllm_q, label = quant_flags(formats)
    model = repo_id or "PATH_TO_THIS_CHECKPOINT"
    kv = meta["kv_cache"] if meta["kv_cache"] not in (None, "none") else None
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [omniq, modelopt, nemotron-h, quantized"
             + (f", {label.split()[0].lower()}" if label != "BF16" else "") + "]"]
    if hub_id:
        lines += [f"base_model: {hub_id}", "base_model_relation: quantized"]
    lines += ["---", "", f"# {Path(source_name).name} — {label} ({rel.recipe_name(release)})", "",
              f"{Path(source_name).name} quantized to {label} with omniq {__version__} "
              "(NVIDIA ModelOpt), validated from its files against the source checkpoint.", ""]

    # recipe
    lines += ["## Recipe", "", f"- name: `{rel.recipe_name(release)}`",
              f"- default format of linear layers: `{recipe.get('default', 'unknown')}`",
              f"- KV cache: `{kv or 'not quantized (BF16)'}`"]
    if recipe.get("description"):
        lines.append(f"- {recipe['description']}")
    rules = recipe.get("rules") or []
    if rules:
        lines += ["", "| rule | selects | format |", "| --- | --- | --- |"]
        for i, r in enumerate(rules):
            sel = ", ".join([*(f"`{s}`" for s in r.get("select", [])), *(f"`{m}`" for m in r.get("modules", []))])
            lines.append(f"| {i + 1} | {sel} | {r.get('format')} |")
    if formats:
        lines += ["", "Linear layers by format: " + ", ".join(f"{k}: {v}" for k, v in formats.items()) + "."]

    # kept in BF16
    lines += ["", "## Kept in BF16", "",
              "`lm_head` always; the router, Mamba `conv1d`, norms and embeddings are not quantized."]
    bf16_rules = [r for r in rules if r.get("format") == "bf16"]
    if bf16_rules:
        sel = sorted({s for r in bf16_rules for s in [*r.get("select", []), *r.get("modules", [])]})
        lines.append("By the recipe: " + ", ".join(f"`{s}`" for s in sel) + ".")
    bf16 = [m for m, f in rel.declared_formats(release).items() if f == "bf16"]
    if bf16:
        lines += ["", "| modules | count | layers |", "| --- | --- | --- |"]
        lines += [f"| `{p}` | {n} | {idx or '-'} |" for p, n, idx in group_modules(bf16)]

    # deltas
    lines += ["", "## Measured deltas", ""]
    if not deltas:
        lines.append("Not measured: the artifact carries no validation report.")
    else:
        ev = gates.get("eval") or {}
        if ev:
            how = data_format(ev)
            lines.append(f"Against the source on `{ev.get('set')}` ({_fmt(ev.get('rows'))} rows of "
                         f"{_fmt(ev.get('seq_len'))} tokens{'; ' + how if how and how != 'text' else ''}), "
                         "next-token distributions from the files:")
            lines.append("")
        thresholds = gates.get("thresholds") or {}
        lines += ["| metric | value | gate |", "| --- | --- | --- |"]
        for key, label_, gate_key, kind in DELTA_ROWS:
            if key not in deltas:
                continue
            gate = "-"
            if gate_key and thresholds.get(gate_key) is not None:
                gate = f"{'≤' if kind == 'max' else '≥'} {_fmt(thresholds[gate_key])}"
            lines.append(f"| {label_} | {_fmt(deltas[key])} | {gate} |")
        lines += ["", "Gates: " + ("passed." if gates["passed"] else
                                   "**not passed** — " + "; ".join(gates["problems"]) + ".")]

    # task accuracy (eval.json, optional)
    tasks = meta.get("task_accuracy")
    if tasks:
        ev = release.eval
        lines += ["", "## Task accuracy (lm-eval-harness)", "",
                  f"Both checkpoints evaluated from their files by lm-eval {ev.get('lm_eval', '')} "
                  f"(`omniq eval`{', ' + str(ev['limit']) + ' examples per task' if ev.get('limit') else ''}); "
                  "delta ± its standard error, recovery = quantized / source:", "",
                  "| task | metric | examples | source | quantized | delta | recovery | gate |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, t in tasks.items():
            delta = _fmt(t["delta"]) + (f" ± {_fmt(t['delta_stderr'])}" if t.get("delta_stderr") is not None else "")
            lines.append(f"| {name} | {t['metric']} | {_fmt(t.get('samples'))} | {_fmt(t['reference'])} | "
                         f"{_fmt(t['candidate'])} | {delta} | {_fmt(t.get('recovery'))} | "
                         f"≥ {_fmt(t['min_recovery'])}: {'passed' if t['passed'] else '**failed**'} |")

    # provenance
    lines += ["", "## Source and provenance", "", f"- source: `{source_name}`"]
    for k, v in src.items():
        if k not in ("model", "id", "name") and v not in (None, "", {}) and str(v) != source_name:
            lines.append(f"- source {k}: `{v if not isinstance(v, (dict, list)) else json.dumps(v)}`")
    if meta["calibration"]:
        how = data_format(meta["calibration"])
        if how:
            lines.append(f"- calibration format: {how}")
        lines.append(f"- calibration: `{json.dumps(meta['calibration'], sort_keys=True)}`")
    if meta["versions"]:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())))
    lines.append(f"- `omniq.json` sha256: `{rel.sha256_file(release.path / rel.MANIFEST)}` "
                 "(lists the sha256 of every file)")
    hashes = meta["source_hashes"]
    if hashes:
        lines += ["", "| source file | sha256 |", "| --- | --- |"]
        lines += [f"| `{f}` | `{h}` |" for f, h in sorted(hashes.items())]

    # serving
    trust = _needs_remote_code(release)
    lines += ["", "## Serving", "", "### TensorRT-LLM (PyTorch backend)", "",
              "NemotronH runs on TensorRT-LLM's PyTorch backend only. Mamba layers need block reuse off and a "
              "float32 SSM cache:", "", "```bash", "cat > extra_llm_api_options.yaml <<'EOF'",
              "kv_cache_config:", "  enable_block_reuse: false", "  mamba_ssm_cache_dtype: float32", "EOF",
              f"trtllm-serve {model} --backend pytorch --tp_size 1 --extra_llm_api_options extra_llm_api_options.yaml",
              "```", ""]
    if "nvfp4" in formats:
        lines += ["NVFP4 needs a Blackwell GPU (sm100 and later); on Hopper only TensorRT-LLM releases after "
                  "1.2.1 run it, as a W4A16 fallback.", ""]
    vllm = [f"vllm serve {model}"]
    if vllm_q:
        vllm.append(f"--quantization {vllm_q}")
    if kv:
        vllm.append("--kv-cache-dtype fp8")
    vllm.append("--mamba-ssm-cache-dtype float32")
    if trust:
        vllm.append("--trust-remote-code")
    lines += ["### vLLM", "", "```bash", " ".join(vllm), "```", ""]
    return "\n".join(lines)


def _needs_remote_code(release: rel.Release) -> bool:
    cfg = release.path / "config.json"
    try:
        return "auto_map" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
