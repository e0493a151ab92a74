"""The `omniq` command line: parse, call one function per command, map errors to exit codes.

Keep this module light: torch, transformers and modelopt are imported inside the commands, so
`omniq --help` stays instant. User-fixable problems raise `OmniqError` and end here as one line on stderr
with exit code 2 (1 for a failed gate or check).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from omniq import __version__
from omniq.errors import OmniqError

app = typer.Typer(
    name="omniq",
    help="Quantize NemotronH / Nemotron 3 Nano Omni checkpoints to FP8 and NVFP4 with ModelOpt, "
         "validate the artifact from its files, and prepare TensorRT-LLM deployments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"omniq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command()
def validate(
    reference: str = typer.Argument(..., help="The BF16 checkpoint the candidate was made from (directory or bundled name)."),
    candidate: str = typer.Argument(..., help="The quantized checkpoint directory, read from its files."),
    eval_set: Optional[str] = typer.Option(None, "--eval", help="Evaluation text: bundled 'eval' / 'eval2', or a .txt / .jsonl file; with --eval-format chat a .jsonl / .json / .parquet file or hub dataset of conversations. [default: eval]"),
    eval_format: str = typer.Option("text", "--eval-format", help="text, or chat: --eval's conversations rendered through the reference's chat template, reasoning on for --reasoning-share of them; the report is split by reasoning on / off, each split gated on its own floor."),
    reasoning_share: Optional[float] = typer.Option(None, "--reasoning-share", help="With --eval-format chat: the share of conversations (and rows) with reasoning on (enable_thinking=True), 0-1. [default: 0.5]"),
    eval_column: Optional[str] = typer.Option(None, "--eval-column", help="With --eval-format chat: the column of conversations. [default: messages]"),
    eval_split: str = typer.Option("train", "--eval-split", help="With --eval-format chat and a hub dataset: its split."),
    samples: int = typer.Option(64, "--samples", min=1, help="Rows of evaluation text."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per row."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Gate: highest mean KL(reference || candidate) per token. [default: per format]"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Gate: lowest top-1 agreement, 0-1. [default: per format]"),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Gate: highest perplexity ratio candidate / reference. [default: per format]"),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the machine-readable JSON report here (never over an existing file without --force)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --report."),
    positions: bool = typer.Option(False, "--positions", help="Also break KL and top-1 down by position in the row."),
    media_samples: Optional[int] = typer.Option(None, "--media-samples", min=0, help="Omni checkpoints: image+text and audio+text evaluation samples per modality (bundled eval split; 0 skips them). [default: 32]"),
    device: str = typer.Option("cpu", "--device", help="Where the layer stream runs: cpu, cuda or cuda:N (the CUDA path is untested: no GPU in CI)."),
    eval_media: Optional[str] = typer.Option(None, "--eval-media", help="Omni: your own captioned evaluation media instead of the bundled eval split (a folder or datasets dataset, as quantize --calib-media); each sample needs a caption."),
    bad_media: str = typer.Option("skip", "--bad-media", help="Unreadable or uncaptioned --eval-media files or rows: skip (one warning line each) or fail."),
    gates_file: Optional[Path] = typer.Option(None, "--gates", help="YAML of your own gates per format and modality (max_kl, min_top1, max_ppl_ratio, multiplier, min_layer_sqnr_db); recorded in the report."),
    generate: int = typer.Option(0, "--generate", min=0, help="Also continue N held-out prompts greedily with both models: identical first 16 / 64 tokens, EOS rate, mean length ratio (gated). No cache: slow on real-width models."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Budget of generated tokens per prompt for --generate."),
    no_noise_floor: bool = typer.Option(False, "--no-noise-floor", help="Skip measuring this run's noise floor (the third stream, about a third less time); the gates then come from the bundled model's floor."),
    reference_cache: Optional[Path] = typer.Option(None, "--reference-cache", help="Directory keeping the reference's streams per reference, rows and code: the next candidate of the same reference runs only its own stream (same numbers)."),
):
    """Compare a quantized artifact with its BF16 reference from the files; gates from this run's noise floor; exit 1 when a gate fails."""
    from omniq.validate.run import summary_table, terminal_progress, validate as run_validate

    with terminal_progress(sys.stderr.isatty()) as progress:
        result = run_validate(reference, candidate, eval_set=eval_set, samples=samples, seq_len=seq_len,
                              max_kl=max_kl, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio,
                              report_path=report, positions=positions, progress=progress,
                              media_samples=media_samples, device=device, noise_floor=not no_noise_floor,
                              eval_media=eval_media, bad_media=bad_media, gates_file=gates_file,
                              generate=generate, max_new_tokens=max_new_tokens, eval_format=eval_format,
                              reasoning_share=reasoning_share, eval_column=eval_column, eval_split=eval_split,
                              force=force, reference_cache=reference_cache)
    _verdict("validate", summary_table(result), result, report)


def _verdict(command: str, table, result: dict, report: Optional[Path]) -> None:
    """The summary table, warnings and report path on stdout; exit 1 (one line) when a gate failed."""
    from rich.console import Console

    from omniq.errors import GateFailed

    console = Console()
    console.print(table)
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report is not None:
        console.print(f"report: {report}")
    if not result["passed"]:
        raise GateFailed(f"{command}: " + "; ".join(result["failures"]))
    console.print("[green]passed[/green]")


@app.command("eval")
def eval_tasks(
    reference: str = typer.Argument(..., help="The BF16 checkpoint the candidate was made from (directory or bundled name)."),
    candidate: str = typer.Argument(..., help="The quantized checkpoint directory, read from its files."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval tasks: omniq-docstring-cloze (bundled), a task YAML file, or any task lm-eval knows."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate at most N examples per task."),
    min_recovery: float = typer.Option(0.95, "--min-recovery", help="Gate per task: candidate score / reference score at least this."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON report here (ARTIFACT/eval.json is what `omniq publish` ships; never over an existing file without --force)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    device: str = typer.Option("cpu", "--device", help="Where the forward runs: cpu, cuda or cuda:N (the CUDA path is untested: no GPU in CI)."),
):
    """Task accuracy of both checkpoints through lm-eval-harness; exit 1 when a task's recovery is below the gate."""
    from omniq.validate.task_eval import evaluate, summary_table

    result = evaluate(reference, candidate, tasks, limit=limit, min_recovery=min_recovery, report_path=out,
                      force=force, device=device)
    _verdict("eval", summary_table(result), result, out)


@app.command()
def lint(
    artifact: str = typer.Argument(..., help="A quantized checkpoint directory (omniq's, or any ModelOpt unified HF checkpoint)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Also check what this engine loads: trtllm, vllm or sglang."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report here (ARTIFACT/lint.json is what `omniq publish` reads; quantize wrote one already, so replacing it takes --force)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --report."),
):
    """Check a quantized checkpoint from its files (headers, scales, declaration, checksums); exit 1 on errors."""
    import json

    from omniq.errors import GateFailed
    from omniq.validate import binding, findings as fnd
    from omniq.validate.lint import lint as run_lint, report as lint_report

    binding.check_target(report, artifact, force=force)
    found = run_lint(artifact, engine)
    doc = lint_report(found, artifact, engine)
    if report is not None:
        from omniq.atomic import write_atomic

        write_atomic(report, json.dumps(doc, indent=1) + "\n", replace=force)
    n = fnd.counts(found)
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
    else:
        from rich.console import Console

        console = Console()
        if found:
            console.print(fnd.table(found, title=f"omniq lint {artifact}" + (f" (engine {engine})" if engine else "")))
        console.print(f"{n['error']} errors, {n['warning']} warnings, {n['info']} notes")
    if n["error"]:
        raise GateFailed(f"lint: {n['error']} errors in {artifact}")


@app.command()
def plan(
    model: str = typer.Argument(..., help="A config.json file, a directory with only config.json, a checkpoint directory, or a bundled name (tiny)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="A built-in recipe (fp8, nvfp4, nano3-nvfp4, omni-fp8, omni-nvfp4, nvfp4-experts, ...) or a YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the full plan as JSON (every module name)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Override the recipe's KV cache: fp8 or none."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Calibration rows per forward pass, for the memory estimate. Default: as quantize."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Calibration tokens per row, for the memory estimate. Default: as quantize."),
    device: str = typer.Option("cpu", "--device", help="Where calibration runs: cpu (this machine's RAM), h100, h200, b200, a100, ..."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="The device's memory instead of the table's, e.g. 96GiB."),
    tower_bytes: Optional[str] = typer.Option(None, "--tower-bytes", help="Omni, config only: size of the towers and projectors (e.g. 2.7GiB); read from the headers for a checkpoint."),
    load_dtype: str = typer.Option("bf16", "--load-dtype", help="Dtype the weights are loaded in for calibration: bf16 or fp32."),
):
    """What a recipe quantizes on a model, the checkpoint size and the calibration memory, without weights."""
    import json

    from omniq.quant import plan_report

    source = plan_report.open_source(model)
    _, summary = plan_report.make(source, recipe, kv_cache=kv_cache, batch=batch, seq_len=seq_len, device=device,
                                  device_memory=device_memory, tower_bytes=tower_bytes, dtype=load_dtype)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    from rich.console import Console

    console = Console()
    for part in plan_report.render(summary):
        console.print(part)


@app.command()
def build(
    checkpoint: str = typer.Argument(..., help="The quantized checkpoint directory (omniq quantize output, or any ModelOpt unified HF checkpoint)."),
    gpu: str = typer.Option(..., "--gpu", help="Target: hopper, blackwell, sm90, sm100, sm103, sm120, sm121, or a GPU (h100, h200, b200, gb200, b300, rtx-pro-6000, ...)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create (never overwritten without --force)."),
    tp: int = typer.Option(1, "--tp", help="Tensor parallel size: 1, 2, 4 or 8."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert parallel size, dividing --tp and the routed experts (default: --tp; 1 on sm120 / sm121)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch served; CUDA graphs are captured up to it."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Longest sequence, prompt + output (default: 32768, or the model's limit if lower)."),
    trtllm_version: Optional[str] = typer.Option(None, "--trtllm-version", help="TensorRT-LLM release the bundle targets (default: 1.3.0rc27; with --execute: the installed one)."),
    execute: bool = typer.Option(False, "--execute", help="On a host with tensorrt_llm and the target GPU: load the bundle, smoke-generate, measure throughput (untested: no GPU in CI)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
):
    """A TensorRT-LLM deployment bundle (PyTorch backend) of a quantized checkpoint for one GPU target."""
    from omniq.deploy.bundle import build as build_bundle

    result = build_bundle(checkpoint, gpu, out, tp=tp, ep=ep, max_batch=max_batch, max_seq_len=max_seq_len,
                          trtllm_version=trtllm_version, execute=execute, force=force)
    dep = result.deployment
    typer.echo(f"wrote {result.path}: {dep.quant_algo} on {dep.gpu.label} (sm{dep.gpu.sm}), MoE backend "
               f"{dep.moe_backend}, tp {dep.tp} ep {dep.ep}, KV cache {dep.kv_cache_dtype}, TensorRT-LLM "
               f"{dep.version_range}; {dep.memory.as_dict()['gib']['total']} of {dep.memory.as_dict()['gib']['capacity']} "
               f"GiB per GPU at batch {dep.max_batch} x {dep.max_seq_len} tokens")
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    if result.manifest.get("execution"):
        t = result.manifest["execution"]["throughput"]
        typer.echo(f"executed: {t['output_tokens_per_s']} output tokens/s over {t['requests']} requests")


def _file_progress(verb: str):
    """Per-file progress on stderr for long transfers, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    return lambda i, n, name: typer.echo(f"[{i + 1}/{n}] {verb} {name}", err=True)


@app.command()
def publish(
    artifact: Path = typer.Argument(..., help="The artifact directory (omniq quantize output, with omniq.json)."),
    ref: str = typer.Argument(..., help="oci://HOST[:PORT]/REPO:TAG or hf://ORG/NAME[@REVISION]."),
    force: bool = typer.Option(False, "--force", help="Move an existing tag / commit over an existing omniq artifact."),
    allow_failed: bool = typer.Option(False, "--allow-failed", help="Publish even if lint or the validation gates did not pass (or never ran)."),
    plain_http: bool = typer.Option(False, "--plain-http", help="OCI over plain HTTP (always on for 127.0.0.1 / localhost)."),
):
    """Publish a validated artifact to an OCI registry (OCI distribution API) or the Hugging Face Hub."""
    from omniq.publish.publish import publish as do_publish

    result = do_publish(artifact, ref, force=force, allow_failed=allow_failed, plain_http=plain_http,
                        progress=_file_progress("uploading"))
    for w in result.get("waived") or []:
        typer.echo(f"warning: published with --allow-failed: {w}", err=True)
    if result.get("unchanged"):
        typer.echo(f"{result['ref']} already holds this artifact ({result['digest']}); nothing pushed")
    elif "digest" in result:
        typer.echo(f"published {result['ref']} ({result['digest']}): {result['layers']} files, "
                   f"{result['bytes_uploaded']:,} bytes uploaded, {result['blobs_skipped']} already there; "
                   "every layer verified against omniq.json")
    else:
        typer.echo(f"published {result['ref']}: {len(result['files'])} files in commit {result.get('commit_url')}")


@app.command()
def pull(
    ref: str = typer.Argument(..., help="oci://HOST[:PORT]/REPO:TAG (or @sha256:DIGEST)."),
    dest: Path = typer.Argument(..., help="Directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it exists."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Plain HTTP (always on for 127.0.0.1 / localhost)."),
):
    """Fetch a published artifact; every file is checked against its digest and omniq.json before DEST appears."""
    from omniq.publish.publish import pull as do_pull

    result = do_pull(ref, dest, force=force, plain_http=plain_http, progress=_file_progress("downloading"))
    typer.echo(f"pulled {result['ref']} ({result['digest']}) into {result['path']}: {result['files']} files, "
               f"{result['bytes']:,} bytes, all verified")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A local checkpoint directory, a bundled name (tiny) or a hub id (org/name)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="A built-in recipe (fp8, nvfp4, nano3-nvfp4, nvfp4-experts, ...) or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to create (never overwritten without --force)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Override the recipe's KV cache: fp8 or none."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: tiny-calib (bundled), nvidia-default (ModelOpt hf_ptq's cnn_dailymail + Nemotron-Post-Training-Dataset-v2 mix), a .txt / .jsonl / .json / .parquet file, or a hub dataset NAME[:CONFIG]. [default: tiny-calib for the bundled models, nvidia-default otherwise]"),
    calib_column: Optional[str] = typer.Option(None, "--calib-column", help="Column of a .jsonl / .json / .parquet file or hub dataset: its text, or with --calib-format chat its conversations. [default: text, or messages with --calib-format chat]"),
    calib_format: str = typer.Option("text", "--calib-format", help="text: the column is text. chat: it holds conversations (lists of {role, content[, reasoning_content]} messages), each rendered through the checkpoint's chat template with reasoning on or off (enable_thinking)."),
    reasoning_share: Optional[float] = typer.Option(None, "--reasoning-share", help="With --calib-format chat: the share of conversations rendered with reasoning on (enable_thinking=True), 0-1. [default: 0.5]"),
    calib_split: str = typer.Option("train", "--calib-split", help="Split of a hub dataset."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration rows."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per calibration row."),
    calib_mix: Optional[str] = typer.Option(None, "--calib-mix", help="Shares of calibration tokens per modality, e.g. text:0.5,image:0.25,audio:0.25. Default: that mix for Omni checkpoints (modalities it has towers for), text:1 for text-only models."),
    calib_seed: Optional[int] = typer.Option(None, "--calib-seed", help="Another reproducible sample of the calibration texts (each text kept with probability 1/2 by a hash of seed and index). [default: the first texts in order]"),
    calib_media: Optional[str] = typer.Option(None, "--calib-media", help="Omni: your own calibration media instead of the bundled set: a folder of images (PNG / JPEG) and audio (WAV / FLAC) with captions in prompts.jsonl or NAME.txt, or a datasets dataset (saved folder or hub NAME[:CONFIG]) with image / audio and caption columns."),
    bad_media: str = typer.Option("skip", "--bad-media", help="Unreadable media files or rows: skip (one warning line each) or fail."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept a checkpoint whose weights are only pickled (.bin / .pt)."),
    device: str = typer.Option("cpu", "--device", help="Where calibration runs: cpu, or cuda (ModelOpt's CUDA kernels then pack the export; the CUDA path is untested: no GPU in CI)."),
    expert_calibration: str = typer.Option("all", "--expert-calibration", help="all: every routed expert also processes calibration tokens for statistics until it has --min-expert-tokens (outputs still use the real top-k routing); routed: real routing only."),
    min_expert_tokens: int = typer.Option(64, "--min-expert-tokens", help="Calibration tokens each routed expert must process to count as calibrated."),
    expert_fill: str = typer.Option("none", "--expert-fill", help="For experts still below --min-expert-tokens: none (fail), or layer-max (export them with the layer's shared input scales, the max over its observed experts; recorded in omniq.json)."),
    allow_uncalibrated_experts: bool = typer.Option(False, "--allow-uncalibrated-experts", help="Proceed although experts stay below --min-expert-tokens (recorded in omniq.json)."),
):
    """Quantize a NemotronH or Nemotron Omni checkpoint (its language model) with ModelOpt into a checked unified HF checkpoint (+ omniq.json)."""
    from omniq.calib.experts import ExpertPolicy
    from omniq.commands.quantize import quantize as run_quantize

    policy = ExpertPolicy(expert_calibration, min_expert_tokens, expert_fill, allow_uncalibrated_experts)
    with _stage_progress() as progress:
        result = run_quantize(model, recipe, out, kv_cache=kv_cache, calib=calib, calib_column=calib_column,
                              calib_split=calib_split, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                              force=force, allow_pickle=allow_pickle, progress=progress, device=device,
                              calib_mix=calib_mix, expert_policy=policy, calib_media=calib_media,
                              bad_media=bad_media, calib_seed=calib_seed, calib_format=calib_format,
                              reasoning_share=reasoning_share)
    plan = result.plan
    counts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(result.counts.items(), key=lambda kv: -kv[1]) if n)
    sec = result.seconds
    typer.echo(f"wrote {result.out}: {plan.quant_algo or 'BF16'}"
               f"{' + FP8 KV cache' if plan.kv_cache else ''}; linear layers: {counts}; "
               f"{result.output_bytes / 2**20:.1f} MiB in {len(result.files)} files (estimated "
               f"{plan.total_bytes / 2**20:.1f} MiB); {sec['total']:.1f} s (load {sec['load']:.1f}, calibrate "
               f"{sec['calibrate']:.1f}, export {sec['export']:.1f})")
    cal = result.manifest.get("calibration") or {}
    if isinstance(cal.get("text"), dict):      # an Omni mix records its text part under "text"
        cal = cal["text"]
    if cal.get("format") == "chat":
        c = cal["conversations"]
        typer.echo(f"calibration: chat, {c['reasoning_on']} conversations with reasoning on, {c['reasoning_off']} "
                   f"off (--reasoning-share {cal['reasoning_share']:g}), rendered through the chat template")
    if result.modality_tokens:
        mt = result.modality_tokens
        total = ", ".join(f"{m} {n}" for m, n in mt["total"].items() if n)
        s = mt["summary"]
        least = ", ".join(f"{m} {s['min'][m]}-{s['max'][m]}" for m in s["min"])
        typer.echo(f"calibration tokens: {total}; per quantized layer ({s['layers']}): {least}; per-layer counts "
                   "in omniq.json (calibration.modality_tokens)")
        for m, n in s["layers_without"].items():
            if n:
                typer.echo(f"note: {n} quantized layers (routed experts) saw no {m} tokens", err=True)
    if result.experts:
        typer.echo(f"routed experts (--expert-calibration {policy.mode}, tokens per expert; counts in omniq.json):")
        for line in result.experts:
            typer.echo(f"  {line}")
    wc = result.manifest.get("weight_calibration")
    if wc:
        algos = ", ".join(f"{name} ({v['layers']} layers)" for name, v in wc["algorithms"].items())
        typer.echo(f"weight calibration: {algos} in {wc['seconds']:.1f} s; "
                   f"{len(wc['fallback_to_mse'])} experts fell back to mse (listed in omniq.json)")
        comp = wc.get("compensation")
        if comp:
            kept = [r for r in comp["layers"] if r["kept"]]
            typer.echo(f"compensation: {comp['name']} changed {sum(r['tensors'] for r in kept)} BF16 tensors in "
                       f"{len(kept)} of {len(comp['layers'])} layers in {comp['seconds']:.1f} s")
    if result.lint:
        typer.echo(f"lint: {result.lint.get('error', 0)} errors, {result.lint.get('warning', 0)} warnings "
                   "(lint.json)")
    for line in result.media_skipped:
        typer.echo(f"warning: --calib-media skipped {line}", err=True)
    for name in result.restored:
        typer.echo(f"warning: ModelOpt left {name} patched; restored it", err=True)
    if result.dropped:
        typer.echo(f"warning: {len(result.dropped)} source tensors are not part of the NemotronH language model "
                   f"and were not exported (e.g. {result.dropped[0]}); listed in omniq.json", err=True)


@app.command()
def search(
    model: str = typer.Argument(..., help="A local checkpoint directory, a bundled name (tiny) or a hub id."),
    budget: float = typer.Option(..., "--budget", help="Size budget in bits per weight of the language model (as `omniq plan` reports it)."),
    out: Path = typer.Option(..., "--out", "-o", help="The recipe YAML to write (never overwritten without --force)."),
    formats: str = typer.Option("nvfp4,fp8,bf16", "--formats", help="Formats a layer group may take, comma-separated."),
    algorithm: str = typer.Option("max", "--algorithm", help="Weight calibration measured and written into the recipe: max, mse, local-hessian, gptq, four-over-six."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Sensitivity cache (JSON, keyed by model and data hashes). [default: OUT's stem + .sensitivity.json]"),
    eval_set: str = typer.Option("calib-tail", "--eval", help="Held-out text for the sensitivities: calib-tail (the bundled calib split from its end), eval, eval2, or a .txt / .jsonl file."),
    samples: int = typer.Option(16, "--samples", min=1, help="Rows of held-out text."),
    seq_len: int = typer.Option(256, "--seq-len", min=2, help="Tokens per row."),
    calib: str = typer.Option("tiny-calib", "--calib", help="Calibration text for activation ranges and weight statistics (as quantize's)."),
    calib_samples: int = typer.Option(16, "--calib-samples", help="Calibration rows."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", help="Tokens per calibration row."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
):
    """Measure each layer group's sensitivity (KL at the logits, one group quantized at a time) and write the recipe with the least predicted KL within a size budget."""
    from omniq.commands.search import search as run_search

    with _stage_progress() as progress:
        r = run_search(model, budget, out, formats=formats, algorithm=algorithm, cache=cache, eval_set=eval_set,
                       samples=samples, seq_len=seq_len, calib=calib, calib_samples=calib_samples,
                       calib_seq_len=calib_seq_len, force=force, progress=progress)
    picked: dict[str, list[str]] = {}
    for g, f in r.choice.formats.items():
        picked.setdefault(f, []).append(g)
    typer.echo(f"wrote {r.out}: predicted {r.choice.bytes / 2**20:.3f} MiB ({r.predicted_bits_per_weight:.3f} "
               f"bits/weight), predicted KL {r.choice.kl:.3e}; omniq plan: {r.plan_bytes / 2**20:.3f} MiB "
               f"({r.plan_bits_per_weight:.3f} bits/weight); budget {budget:g} bits/weight")
    for f in ("nvfp4", "fp8", "bf16"):
        if picked.get(f):
            typer.echo(f"  {f}: {', '.join(picked[f])}")
    typer.echo(f"sensitivities: {r.measured} measured, the rest from {r.cache}")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="A checkpoint directory, a config.json file, or a bundled name (tiny)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Also show which modules a recipe quantizes to which format, and the estimated size."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Override the recipe's KV cache: fp8 or none."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Architecture summary (layer pattern, parameters by component); with --recipe, the formats and size."""
    import json

    from omniq.commands.inspect import inspect_model, render

    summary = inspect_model(model, recipe, kv_cache)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    from rich.console import Console

    console = Console()
    for part in render(summary):
        console.print(part)


def _stage_progress():
    """A context manager yielding a `progress(stage, done, total)` callback drawing rich bars on stderr."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    labels = {"load": "load", "calibrate": "calibrate", "export": "export", "verify": "verify"}

    @contextlib.contextmanager
    def cm():
        bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(labels.get(stage, stage), total=max(total, 1))
            bars.update(tasks[stage], completed=done, total=max(total, 1))

        with bars:
            yield progress

    return cm()


@app.command()
def pipeline(
    file: Path = typer.Argument(..., help="The pipeline file (YAML): source, recipes x targets, data, gates, publish targets."),
    only: Optional[str] = typer.Option(None, "--only", help="Run one stage only: quantize, lint, validate, build or publish (its inputs must be cached)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show each stage output's key and whether it is cached; run nothing."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Stage outputs and summary here instead of the file's workdir."),
):
    """Quantize, lint, validate, build and publish a matrix of recipes x GPU targets, cached and resumable."""
    from omniq.pipeline.run import run as run_pipeline

    outcome = run_pipeline(file, only=only, dry_run=dry_run, workdir=workdir)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except OmniqError as e:
        typer.echo(f"omniq: error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("omniq: aborted", err=True)
        return 130
    except typer.TyperException as e:
        return _usage_error(e)
    return 0


def _usage_error(e: "typer.TyperException") -> int:
    """Typer's own errors (unknown option, missing argument, bad option value) as one line and exit 2.

    `standalone_mode=False` makes typer raise them instead of printing; its `show()` prints the usage block
    and the message on several lines, so the message is formatted here. A bare `omniq` raises the same kind
    of error carrying the help text: that one is shown as it is.
    """
    ctx = getattr(e, "ctx", None)
    message = e.format_message()
    if type(e).__name__ == "NoArgsIsHelpError":  # typer has already printed the help (rich) or carries it
        if message.strip():
            typer.echo(message, err=True)
        return 2
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    one_line = " ".join(message.split())
    typer.echo(f"omniq: error: {one_line}{hint}", err=True)
    return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
