"""`omniq quantize`: checkpoint -> layer plan -> ModelOpt calibration -> checked unified HF checkpoint.

Cheap checks come first, so a bad input fails in a second and before anything is written: the output path,
the recipe, the checkpoint (missing, pickle-only, not NemotronH, already quantized, config/tensor mismatch),
the plan's ModelOpt config and the calibration data (read and tokenized; for an Omni checkpoint the
`--calib-mix` of text, image and audio samples, media embedded by its own towers: `omniq.calib.multimodal`).
An Omni checkpoint's language model alone is quantized; its towers and projectors are copied into the artifact
byte for byte (`hf_checkpoint.copy_raw_tensors`); see docs/omni.md. A preflight (`omniq.quant.memory.preflight`)
refuses, before anything is loaded, a run whose predicted peak does not fit the process's memory limit. Then
the model is calibrated and exported layer by layer (`omniq.export.streamed`: one decoder layer in memory,
read from the shards, NaN / inf refused, docs/streamed.md) into a staged directory that only becomes `--out`
when every check has passed.

The checks that end every run (docs/trust.md), each exit 1 with nothing left at `--out`: expert coverage
(`omniq.calib.experts`: tokens per routed expert counted, and under the default policy topped up, during
calibration; experts left uncalibrated fail unless filled or allowed; counts in omniq.json `experts`), the
coverage assertion (`hf_checkpoint.verify_tensors`: the files are exactly the layer plan, per layer and
format), and `omniq lint` on the finished artifact (`lint_stage`; its report ships as the lint.json sidecar).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from omniq import __version__
from omniq.calib import data as calib_data
from omniq.calib.experts import ExpertCoverage, ExpertPolicy
from omniq.errors import GateFailed, OmniqError
from omniq.model.checkpoint import Checkpoint, open_checkpoint
from omniq.quant import recipe as recipes
from omniq.quant.plan import LayerPlan, make_plan

Progress = Callable[[str, int, int], None]


@dataclass
class QuantizeResult:
    out: Path
    plan: LayerPlan
    counts: dict[str, int]            # linear layers per format
    files: list[str]
    output_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    restored: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)     # source tensors outside the language model
    # Omni: calibration tokens per modality (totals, and the per-layer summary of omniq.json)
    modality_tokens: dict = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)      # expert coverage summary lines (omniq.calib.experts)
    lint: dict = field(default_factory=dict)               # counts of the lint run at the end (lint.json)
    predicted_peak_bytes: int = 0                          # the preflight's streamed estimate (quant/memory.py)
    bytes_read: int = 0                                    # source tensors read by the streamed run
    media_skipped: list[str] = field(default_factory=list)  # --calib-media files / rows skipped, one line each


def open_source(model: str, *, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint to quantize, refused when omniq cannot quantize it (yet)."""
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    if ckpt.is_quantized:
        algo = ((ckpt.quantization or {}).get("quantization") or ckpt.quantization or {}).get("quant_algo")
        what = f" ({algo})" if algo else ""
        raise OmniqError(f"{ckpt.path}: already quantized{what}; quantize the BF16 checkpoint instead")
    # An Omni checkpoint: only its language model is quantized; its towers pass through byte for byte (whether
    # omniq can run them for multimodal calibration is checked when the calibration mix asks for them).
    return ckpt


def resolve_recipe(recipe, kv_cache: str | None) -> recipes.Recipe:
    r = recipe if isinstance(recipe, recipes.Recipe) else recipes.load(str(recipe))
    return r.with_kv_cache(kv_cache)


def versions() -> dict[str, str]:
    import modelopt
    import safetensors
    import torch
    import transformers

    return {"omniq": __version__, "modelopt": modelopt.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def quantize(model: str, recipe, out, *, kv_cache: str | None = None, calib: str | None = None,
             calib_column: str | None = None, calib_split: str = "train", calib_samples: int = 64,
             calib_seq_len: int = 256, force: bool = False, allow_pickle: bool = False,
             progress: Progress | None = None, device: str = "cpu",
             calib_mix: str | None = None, expert_policy=None, calib_media: str | None = None,
             bad_media: str = "skip", calib_seed: int | None = None, calib_format: str = "text",
             reasoning_share: float | None = None) -> QuantizeResult:
    from omniq.calib import media, multimodal, user_media
    from omniq.export import hf_checkpoint as export
    from omniq.export import streamed
    from omniq.quant import calibrate as cal
    from omniq.quant import memory
    from omniq.quant.modelopt_config import enabled_quantizers, modelopt_config

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    export.check_out(out, force=force)
    if device != "cpu":
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise OmniqError(f"--device {device}: expected cpu or cuda[:N] with a CUDA device present")
    from omniq.calib import chat

    chat.check_format(calib_format, "--calib-format")
    chat.check_share(reasoning_share, calib_format)
    calib_column = calib_column or (chat.COLUMN if calib_format == "chat" else "text")
    rec = resolve_recipe(recipe, kv_cache)
    ckpt = open_source(model, allow_pickle=allow_pickle)
    export.check_out(out, force=force, protect=(ckpt.path,))
    calib = calib or calib_data.default_for(ckpt.path)
    plan = make_plan(ckpt.arch, rec)
    if not plan.quantized and not plan.kv_cache:
        raise OmniqError(f"recipe {rec.name}: quantizes nothing on this model (every linear layer BF16, no KV "
                         "cache); nothing to export")
    # Refuse before anything is loaded when the streamed peak cannot fit this process's memory limit.
    algorithms = {lin.name: rec.algorithm_of(lin, ckpt.arch) for lin in plan.quantized}
    predicted = memory.preflight(plan, samples=calib_samples, seq_len=calib_seq_len, batch=cal.BATCH_SIZE,
                                 device=device, algorithms=algorithms, activation=rec.activation_calibration,
                                 compensation=rec.compensation.name != "none")
    config = modelopt_config(plan)
    enabled = enabled_quantizers(plan)
    weight_algos = (any(a.name != "max" for a in algorithms.values()) or rec.activation_calibration != "max"
                    or rec.compensation.name != "none")
    if weight_algos and (ckpt.is_omni or device != "cpu"):
        raise OmniqError(f"recipe {rec.name}: weight calibration {', '.join(rec.algorithms)} runs on CPU on text "
                         "checkpoints only for now (not on Omni checkpoints, not with --device cuda)")
    dropped = sorted(set(ckpt.headers) - set(ckpt.arch.tensor_by_name)     # e.g. mtp.* (not in the model)
                     - set(export.tower_tensors(ckpt)))                     # Omni towers: copied as they are
    own_media = None
    if calib_media is not None:
        if not ckpt.is_omni:
            raise OmniqError("--calib-media: this checkpoint is a text-only NemotronH; image / audio calibration "
                             "needs an Omni checkpoint")
        own_media = user_media.load(calib_media, bad=bad_media, what="--calib-media")
    mix = media.parse_calib_mix(calib_mix or multimodal.default_mix(ckpt.is_omni, ckpt.config, own_media))
    media.check_mix(mix, ckpt.config, ckpt.is_omni)
    if own_media is not None:
        lacking = [m for m in ("image", "audio") if mix.get(m) and not own_media.samples.get(m)]
        if lacking:
            raise OmniqError(f"--calib-mix asks for {' and '.join(lacking)} but --calib-media {calib_media} has "
                             f"no usable {' or '.join(lacking)} sample; drop it from the mix or add files")
    mm = None
    if ckpt.is_omni:
        mm = multimodal.build(ckpt, mix, calib=calib, calib_column=calib_column, calib_split=calib_split,
                              samples=calib_samples, seq_len=calib_seq_len, dtype=cal.LOAD_DTYPE,
                              media_source=own_media, calib_format=calib_format, reasoning_share=reasoning_share)
        calib_set = calib_data.CalibSet(rows=None, identity=mm.identity,
                                        sample_sha256=tuple(b.sha256 for b in mm.batches))
    else:
        calib_set = calib_data.load(calib, ckpt.tokenizer, samples=calib_samples, seq_len=calib_seq_len,
                                    column=calib_column, split=calib_split, seed=calib_seed, fmt=calib_format,
                                    reasoning_share=reasoning_share)
    top = int(calib_set.rows.max()) if calib_set.rows is not None else 0
    if top >= ckpt.arch.vocab_size:
        raise OmniqError(f"{ckpt.path}: the tokenizer produced token id {top} but the model's vocab_size is "
                         f"{ckpt.arch.vocab_size}; tokenizer and model do not match")
    seconds["prepare"] = time.perf_counter() - t0

    # Layer-streamed calibration and export (omniq.export.streamed): one decoder layer in memory at a time.
    coverage = ExpertCoverage(expert_policy or ExpertPolicy(), ckpt.arch)
    batches = (list(mm.batches) if mm is not None
               else [calib_set.rows[i:i + cal.BATCH_SIZE] for i in range(0, calib_set.rows.shape[0], cal.BATCH_SIZE)])
    t = time.perf_counter()
    with export.staged_output(out, force=force, protect=(ckpt.path,)) as stage:
        skeleton = streamed.build_skeleton(ckpt)
        counter = multimodal.ModalityCounter(skeleton) if mm is not None else None
        wcal = reader = None
        if weight_algos:   # omniq's weight calibration, per layer inside the stream (before the layer is written)
            from omniq.model.checkpoint import TensorReader
            from omniq.quant.weight_calibration import LayerByLayer

            reader = TensorReader(ckpt)
            wcal = LayerByLayer(ckpt.arch, calib_set.rows, plan.formats, algorithms,
                                reader.get(ckpt.arch.embedding_weight), keep_weights=False,
                                activation=rec.activation_calibration, compensation=rec.compensation)
        try:
            run = streamed.run(ckpt, plan, config, enabled, batches, stage.final, coverage=coverage,
                               counter=counter, device=device, progress=progress, model=skeleton,
                               layer_tensors_hook=wcal.exported_layer(reader.get) if wcal is not None else None)
        finally:
            if counter is not None:
                counter.close()
            if reader is not None:
                reader.close()
        modality_tokens: dict = {}
        if counter is not None:
            per_layer = counter.per_layer(plan)
            modality_tokens = {"total": dict(counter.total), "samples": dict(mm.samples),
                               "summary": multimodal.summary(per_layer), "per_layer": per_layer}
        seconds["load"] = run.seconds["inputs"]            # skeleton, embeddings, every block's inputs
        seconds["calibrate"] = run.seconds["calibrate"]     # layers read from the shards and calibrated
        seconds["read_layers"] = run.seconds["read_layers"]  # the reading part of calibrate
        seconds["export_layers"] = run.seconds["export_layers"]
        coverage.enforce()    # experts left uncalibrated fail here (exit 1); the stage is removed
        modelopt_qc = run.quant_config
        weight_calibration = None
        if wcal is not None:
            weight_calibration = wcal.result.manifest(algorithms)
            seconds["weight_calibration"] = wcal.result.seconds     # part of calibrate / export_layers
        manifest = {
            "omniq_manifest": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "source": {"model": str(model), "path": str(ckpt.path), "files": export.source_hashes(ckpt),
                       "dropped_tensors": dropped},
            "recipe": dict(rec.as_dict(), source=rec.source),
            "plan": {"quant_algo": plan.quant_algo, "kv_cache": plan.kv_cache, "counts": plan.counts,
                     "estimated_bytes": plan.total_bytes},
            "calibration": dict(calib_set.identity, algorithm=config["algorithm"], dtype=cal.LOAD_DTYPE,
                                batch_size=cal.BATCH_SIZE, mamba_forward="omniq.model.mamba2.mixer_scan",
                                device=device,
                                sample_sha256=list(calib_set.sample_sha256),
                                **({"modality_tokens": modality_tokens} if modality_tokens else {})),
            **({"weight_calibration": weight_calibration} if weight_calibration else {}),
            "modelopt_config": _jsonable(config),
            "modules": dict(plan.formats),
            "experts": coverage.manifest(),
        }
        t = time.perf_counter()
        exported = export.finish_written(stage, plan, ckpt, manifest, modelopt_qc, progress,
                                         wcal.result.compensated if wcal is not None else None, run.checked)
        lint_counts = lint_stage(stage, out)
    seconds.update({f"export_{k}": v for k, v in exported.seconds.items()})
    seconds["export"] = seconds["export_layers"] + time.perf_counter() - t   # packing + writing, checks, lint
    seconds["total"] = time.perf_counter() - t0
    return QuantizeResult(out=exported.path, plan=plan, counts=exported.counts, files=exported.files,
                          output_bytes=exported.bytes, seconds=seconds, manifest=exported.manifest,
                          restored=run.restored, dropped=dropped, modality_tokens=modality_tokens,
                          experts=coverage.summary(), lint=lint_counts, predicted_peak_bytes=predicted.total,
                          bytes_read=run.bytes_read,
                          media_skipped=list(own_media.skipped) if own_media is not None else [])


def lint_stage(stage, out) -> dict:
    """`omniq lint` on the finished stage (checksums were just written): lint.json goes into the artifact (a
    sidecar, not listed in omniq.json); any error fails the run (exit 1) and nothing is left at --out."""
    import json

    from omniq.validate import findings as fnd
    from omniq.validate.lint import lint, report

    found = lint(stage.final, checksums=False)
    doc = report(found, stage.final, None)
    doc["path"] = doc["bound_to"]["candidate"]["path"] = str(Path(out).expanduser().resolve())
    (stage.final / "lint.json").write_text(json.dumps(doc, indent=1) + "\n")
    bad = fnd.errors(found)
    if bad:
        first = "; ".join(f"{f.id} {f.tensor_or_module}: {f.message}" for f in bad[:3])
        raise GateFailed(f"lint found {len(bad)} errors in the exported checkpoint: {first}")
    return fnd.counts(found)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
