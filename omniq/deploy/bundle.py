"""`omniq build`: a quantized checkpoint -> a TensorRT-LLM deployment bundle for one GPU target.

    OUT/
      checkpoint/            the checkpoint, hard-linked (same filesystem) or copied, checksum-verified
      llm_api_options.yaml   LLM-API options: KV cache, Mamba state, MoE backend, CUDA graphs, limits
      serve.sh               trtllm-serve with those options
      bench.sh               trtllm-bench throughput with those options
      README.md              how to run it
      build.json             the manifest: target, formats per layer group, mapping, backend, memory,
                             TensorRT-LLM version range, sha256 of every file above, warnings
      encoders/              (Omni) vision / audio encoders as ONNX, verified, with trtexec commands

Compatibility is decided (`omniq.deploy.trtllm.decide`) before anything is written; the bundle is
assembled in a temporary sibling directory and renamed into place, so a refusal or a failure leaves
nothing behind and `--out` is never overwritten without `--force`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omniq import __version__
from omniq.checksums import sha256_file
from omniq.errors import GateFailed, OmniqError
from omniq.deploy import gpu_memory, trtllm
from omniq.gpus import resolve_gpu
from omniq.manifest import MANIFEST, listed_files, read_manifest
from omniq.export.hf_checkpoint import staged_output



@dataclass
class BuildResult:
    path: Path
    deployment: trtllm.Deployment
    manifest: dict
    link_mode: str
    warnings: list[str] = field(default_factory=list)


# ----- checksums ------------------------------------------------------------------------------------------


def manifest_checksums(ckpt_dir: Path) -> dict[str, str] | None:
    """sha256 per file (path relative to the checkpoint) from the checkpoint's `omniq.json` (read exactly,
    omniq.manifest), or None when the checkpoint has no manifest."""
    p = ckpt_dir / MANIFEST
    if not p.is_file():
        return None
    return listed_files(read_manifest(p))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def _place(src: Path, dst: Path) -> str:
    """Hard-link `src` (its target, for hub-cache symlinks) at `dst`, or copy it across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)
        return "hardlink"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copy2(src.resolve(), dst)
    return "copy"


def place_checkpoint(src_dir: Path, dst_dir: Path, expected: dict[str, str] | None) -> tuple[dict, str, list[str]]:
    """Put the checkpoint's files under `dst_dir` and verify each placed file against `expected`
    (omniq.json) when given. Returns ({relative path: {"sha256", "bytes"}}, link mode, warnings)."""
    checksums: dict[str, dict] = {}
    modes: set[str] = set()
    warnings: list[str] = []
    present = {p.relative_to(src_dir).as_posix(): p for p in _files(src_dir)}
    if expected is not None:
        missing = sorted(set(expected) - set(present))
        if missing:
            raise GateFailed(f"{src_dir}: {missing[0]} is listed in {MANIFEST} but missing; the checkpoint is "
                             "incomplete")
        unlisted = sorted(set(present) - set(expected) - {MANIFEST})
        if unlisted:
            warnings.append(f"{len(unlisted)} file(s) in the checkpoint are not in {MANIFEST} (first: "
                            f"{unlisted[0]}); copied, checksums computed")
    for rel, src in present.items():
        dst = dst_dir / rel
        modes.add(_place(src, dst))
        digest = sha256_file(dst)
        if expected is not None and rel in expected and expected[rel] != digest:
            raise GateFailed(f"{src_dir / rel}: sha256 {digest[:12]}... does not match {MANIFEST} "
                             f"({expected[rel][:12]}...); the checkpoint changed after it was written; re-export it")
        checksums[rel] = {"sha256": digest, "bytes": dst.stat().st_size}
    mode = modes.pop() if len(modes) == 1 else "mixed" if modes else "none"
    return checksums, mode, warnings


# ----- the bundle's README --------------------------------------------------------------------------------
def bundle_readme(dep: trtllm.Deployment, name: str, encoders: dict | None) -> str:
    g = dep.memory.as_dict()["gib"]
    groups = "\n".join(f"| {grp} | {', '.join(f'{a} x{n}' for a, n in algos.items())} |"
                       for grp, algos in dep.layer_groups.items())
    lines = [
        f"# {name} on {dep.gpu.label} (sm{dep.gpu.sm})",
        "",
        "A TensorRT-LLM deployment bundle written by `omniq build`. Needs TensorRT-LLM "
        f"`{dep.version_range}` (PyTorch backend) on the target GPU, installed from NVIDIA's index or used "
        "from NVIDIA's release container.",
        "",
        "## Run",
        "",
        "```sh",
        "./serve.sh --host 0.0.0.0 --port 8000     # OpenAI-compatible server (trtllm-serve)",
        "./bench.sh                                # throughput (trtllm-bench; NUM_REQUESTS, ISL, OSL, MODEL)",
        "```",
        "",
        "From Python: `tensorrt_llm.LLM(model=\"checkpoint\", **yaml.safe_load(open(\"llm_api_options.yaml\")))`.",
        "`omniq build ... --execute` on the target loads the bundle this way, runs a smoke generation and a "
        "throughput measurement, and records them in `build.json`.",
        "",
        "## No engine file",
        "",
        "NemotronH runs only on TensorRT-LLM's PyTorch backend: the fused MoE kernels and the Mamba-2 conv / SSM "
        "kernels are chosen when the model loads, from `llm_api_options.yaml`. The legacy `trtllm-build` engine "
        "path (`--moe_plugin`, `--mamba_conv1d_plugin`) never supported NemotronH and was removed in TensorRT-LLM "
        "1.3, so there is nothing to build ahead of time.",
        "",
        "## What was decided",
        "",
        f"- Weights: `{dep.quant_algo}`; KV cache: `{dep.kv_cache_dtype}`; Mamba SSM state: float32; "
        "KV block reuse (prefix caching) off, as Mamba state cannot be reused.",
        f"- MoE backend: `{dep.moe_backend}` ({dep.moe_backend_reason}).",
        f"- Parallel mapping: tensor parallel {dep.tp}, expert parallel {dep.ep} (MoE tensor parallel "
        f"{dep.moe_tp}).",
        f"- Limits: max batch {dep.max_batch}, max sequence length {dep.max_seq_len}, max tokens per step "
        f"{dep.max_num_tokens}{' (chunked prefill)' if dep.chunked_prefill else ''}; CUDA graphs for batch sizes "
        f"{trtllm.cuda_graph_batch_sizes(dep.max_batch)} (plain CUDA graphs; piecewise graphs produced NaNs on "
        "Nemotron Nano V3).",
        "",
        "| layer group | formats |",
        "| --- | --- |",
        groups,
        "",
        f"Memory per GPU at the full batch and sequence length (estimate, GiB): weights {g['weights']}, KV cache "
        f"{g['kv_cache']}, Mamba state {g['mamba_state']}, activations {g['activations']}, runtime reserve "
        f"{g['runtime_reserve']}; total {g['total']} of {g['capacity']}.",
        "",
        "The checkpoint's files are hard links to the original when both live on one filesystem: replace files, "
        "never edit them in place. `build.json` lists the sha256 of every file.",
    ]
    if encoders:
        lines += ["", "## Encoders (Omni)", "",
                  "`encoders/` holds the vision tower + projector and the audio encoder + projector as ONNX "
                  "(verified against PyTorch with onnxruntime on CPU, errors in `build.json`). "
                  "`encoders/trtexec.sh` builds TensorRT engines from them on the target GPU."]
    if dep.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in dep.warnings]
    return "\n".join(lines) + "\n"


# ----- build ----------------------------------------------------------------------------------------------
def _check_out(out: Path, ckpt_dir: Path, force: bool) -> None:
    out_r = out.resolve()
    if out_r == ckpt_dir or ckpt_dir in out_r.parents or out_r in ckpt_dir.parents:
        raise OmniqError(f"--out {out}: overlaps the checkpoint directory {ckpt_dir}; choose a separate directory")
    if out.exists() or out.is_symlink():
        if not force:
            raise OmniqError(f"--out {out}: already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise OmniqError(f"--out {out}: exists and is not a directory; remove it yourself")


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.write_text(text)
    if executable:
        path.chmod(0o755)


def build(checkpoint: str, gpu: str, out: str | Path, *, tp: int = 1, ep: int | None = None,
          max_batch: int = trtllm.DEFAULT_MAX_BATCH, max_seq_len: int | None = None,
          trtllm_version: str | None = None, execute: bool = False, force: bool = False) -> BuildResult:
    from omniq.model.checkpoint import open_checkpoint

    out = Path(out).expanduser()
    target = resolve_gpu(gpu)
    if execute:
        from omniq.deploy import trtllm_run

        installed, sm = trtllm_run.check_runtime()
        if trtllm_version and trtllm_version != installed:
            raise OmniqError(f"--trtllm-version {trtllm_version} but TensorRT-LLM {installed} is installed here; "
                             "drop --trtllm-version with --execute")
        if sm != target.sm:
            raise OmniqError(f"--gpu {gpu} is sm{target.sm} but this host's GPU is sm{sm}; --execute runs on the "
                             "target itself")
        trtllm_version = installed
    ckpt = open_checkpoint(checkpoint)
    _check_out(out, ckpt.path, force)

    declared = trtllm.read_declared(ckpt.quantization, str(ckpt.source or ckpt.path))
    weights = gpu_memory.weight_bytes_from_headers(ckpt.arch, ckpt.headers)
    req = trtllm.Request(gpu=target, trtllm_version=trtllm_version or trtllm.DEFAULT_TRTLLM_VERSION, tp=tp, ep=ep,
                         max_batch=max_batch, max_seq_len=max_seq_len)
    dep = trtllm.decide(ckpt.arch, declared, weights, req, headers=ckpt.headers,
                        max_position_embeddings=ckpt.llm_config.get("max_position_embeddings"),
                        is_omni=ckpt.is_omni)
    expected = manifest_checksums(ckpt.path)
    encoder_plan = None
    if ckpt.is_omni:
        from omniq.deploy import encoders

        encoder_plan = encoders.plan(ckpt)          # refuses (exit 2) before anything is written

    with staged_output(out, force=force, protect=(ckpt.path,)) as stage:
        tmp = stage.final
        checksums, link_mode, warnings = place_checkpoint(ckpt.path, tmp / "checkpoint", expected)
        checksums = {f"checkpoint/{k}": v for k, v in checksums.items()}
        name = ckpt.path.name
        encoder_report = None
        if encoder_plan is not None:
            encoder_report = encoders.export(encoder_plan, tmp / "encoders", dep.gpu)
        generated = {
            "llm_api_options.yaml": (trtllm.options_yaml(dep), False),
            "serve.sh": (trtllm.serve_script(dep), True),
            "bench.sh": (trtllm.bench_script(dep), True),
            "README.md": (bundle_readme(dep, name, encoder_report), False),
        }
        for rel, (text, executable) in generated.items():
            _write(tmp / rel, text, executable)
        for p in _files(tmp):
            rel = p.relative_to(tmp).as_posix()
            if not rel.startswith("checkpoint/"):
                checksums[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}

        own = read_manifest(ckpt.path / MANIFEST) if expected is not None else {}
        manifest = {
            "omniq_version": __version__,
            "command": "omniq build",
            "checkpoint": {
                "source": str(ckpt.source or ckpt.path), "name": name, "path": "checkpoint",
                "is_omni": ckpt.is_omni, "link_mode": link_mode,
                "checksums_verified_against": MANIFEST if expected is not None else None,
                "recipe": own.get("recipe"),
                "producer": (ckpt.quantization or {}).get("producer"),
                "weight_bytes": weights.total,
            },
            **dep.as_dict(),
            "encoders": encoder_report,
            "files": dict(sorted(checksums.items())),
            "execution": None,
        }
        manifest["warnings"] = dep.warnings + warnings
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if execute:
            import yaml

            from omniq.deploy import trtllm_run

            options = yaml.safe_load((tmp / "llm_api_options.yaml").read_text())
            manifest["execution"] = trtllm_run.run_bundle(tmp, options, dep.max_batch)
            (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return BuildResult(path=out, deployment=dep, manifest=manifest, link_mode=link_mode,
                       warnings=manifest["warnings"])

