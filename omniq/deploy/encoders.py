"""The Omni encoders for TensorRT: vision tower + projector and audio encoder + projector as ONNX files.

TensorRT-LLM serves the language model; the encoders that turn image tiles and audio clips into the
embeddings spliced at the context tokens can run as TensorRT engines. For each encoder present in the
checkpoint this module

1. wraps omniq's plain-torch tower and projector (`omniq.model.towers`, the same functions calibration and
   validation use) in a module whose weights are FP16 (the checkpoint's BF16 values, range-checked: BF16 ->
   FP16 is exact inside FP16's range) and whose arithmetic is float32;
2. exports it with torch's ONNX exporter (torch.export based, opset `OPSET`, weights in an external-data file
   so the real towers' 2.7 GiB fit), the batch dimension dynamic (image tiles / audio clips);
3. runs the ONNX file with onnxruntime on CPU at two batch sizes against the PyTorch module (max absolute and
   relative error, gated at `MAX_REL_ERROR`) and against the BF16 towers of the checkpoint (the FP16 weight
   conversion's effect, reported);
4. writes `trtexec.sh`, which builds FP16 TensorRT engines from the ONNX files on the target GPU
   (`--minShapes` / `--optShapes` / `--maxShapes` over the batch dimension).

Inputs: `pixels` (tiles, 3, S, S) in [0, 1], S = force_image_size; `features` (clips, frames, mel_bins)
log-mel features of fixed-length clips. Output: `embeds` (batch, tokens, llm_hidden).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omniq.errors import GateFailed, OmniqError
from omniq.quiet import quiet

OPSET = 18
MAX_REL_ERROR = 1e-3               # ONNX (onnxruntime) against the exported PyTorch module
FP16_MAX = 65504.0
VISION_BATCH = (1, 8, 32)          # image tiles per engine call: min, opt, max
AUDIO_BATCH = (1, 2, 8)            # audio clips per engine call
CHECK_BATCHES = (1, 3)             # onnxruntime runs at these batch sizes (3: not the export's sample size)
SEED = 0


@dataclass
class Encoder:
    name: str                      # vision | audio
    components: tuple[str, ...]    # omni.TOWER_PREFIXES keys it covers
    input_name: str
    sample_shape: tuple[int, ...]  # one item, without the batch dimension
    batch: tuple[int, int, int]    # trtexec min / opt / max
    spec: object
    fn: Callable                   # (spec, weights, x) -> embeds
    tensor_shapes: dict = field(default_factory=dict, repr=False)   # name -> shape the config implies
    weights: dict = field(default_factory=dict, repr=False)         # name -> BF16 tensor from the checkpoint

    def shapes(self) -> dict[str, list[int]]:
        return {k: [b, *self.sample_shape] for k, b in zip(("min", "opt", "max"), self.batch)}


@dataclass
class EncoderPlan:
    encoders: list[Encoder]


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OmniqError(f"Omni checkpoints need the ONNX export extra for their encoders ({e.name} is missing): "
                         "pip install 'omniq[onnx]'") from None


def plan(ckpt) -> EncoderPlan:
    """Which encoders the Omni checkpoint has, with their weights read and checked; refuses (exit 2) before
    anything is written when a tower is incomplete, the export tools are missing or a weight does not fit FP16."""
    from omniq.model import towers

    _require_onnx()
    cfg = ckpt.config
    encoders = []
    if cfg.get("vision_config"):
        v = towers.vision_spec(cfg)
        encoders.append(Encoder("vision", ("vision_tower", "vision_projector"), "pixels",
                                (3, v.image_size, v.image_size), VISION_BATCH, v, towers.image_embeds,
                                towers.vision_tensors(v)))
    if cfg.get("sound_config"):
        s = towers.sound_spec(cfg)
        encoders.append(Encoder("audio", ("audio_encoder", "audio_projector"), "features",
                                (s.frames(s.clip_samples), s.mel_bins), AUDIO_BATCH, s, towers.audio_embeds,
                                towers.sound_tensors(s)))
    if not encoders:
        raise OmniqError(f"{ckpt.path}: Omni config.json has neither vision_config nor sound_config; no encoders "
                         "to export")
    for enc in encoders:
        for name, shape in enc.tensor_shapes.items():
            info = ckpt.headers.get(name)
            if info is None:
                raise OmniqError(f"{ckpt.path}: {enc.name} encoder tensor {name} is missing; the checkpoint's towers "
                                 "are incomplete")
            if tuple(info.shape) != tuple(shape):
                raise OmniqError(f"{ckpt.path}: {name} has shape {list(info.shape)} but config.json implies "
                                 f"{list(shape)}")
        enc.weights = ckpt.read(list(enc.tensor_shapes))
        for name, t in enc.weights.items():
            peak = float(t.float().abs().max()) if t.numel() else 0.0
            if not math.isfinite(peak) or peak > FP16_MAX:
                raise OmniqError(f"{name}: values up to {peak:g} do not fit FP16 (max {FP16_MAX:g}); the {enc.name} "
                                 "encoder cannot be exported with FP16 weights")
    return EncoderPlan(encoders)


class _Module:
    """Built lazily so importing this file does not import torch."""

    @staticmethod
    def make(enc: Encoder):
        import torch

        class EncoderModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.names = sorted(enc.weights)
                for i, n in enumerate(self.names):
                    self.register_buffer(f"w{i}", enc.weights[n].to(torch.float16))

            def forward(self, x):
                w = {n: getattr(self, f"w{i}") for i, n in enumerate(self.names)}
                return enc.fn(enc.spec, w, x)

        return EncoderModule().eval()


def _sample(enc: Encoder, batch: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if enc.name == "vision":
        return torch.rand((batch, *enc.sample_shape), generator=g)
    return torch.randn((batch, *enc.sample_shape), generator=g)


def _errors(got, ref) -> dict:
    import numpy as np

    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    return {"max_abs_error": diff, "max_rel_error": diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)}


def _worst(results: list[dict]) -> dict:
    return {k: max(r[k] for r in results) for k in ("max_abs_error", "max_rel_error")}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs about optional packages (torchvision) it does not need."""
    with quiet("torch.onnx", level=logging.ERROR), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_one(enc: Encoder, out_dir: Path) -> dict:
    import onnxruntime as ort
    import torch

    module = _Module.make(enc)
    path = out_dir / f"{enc.name}.onnx"
    batch = torch.export.Dim("batch", min=1, max=max(enc.batch[2], max(CHECK_BATCHES)))
    sample = _sample(enc, 2, SEED)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(module, (sample,), str(path), input_names=[enc.input_name], output_names=["embeds"],
                          opset_version=OPSET, dynamo=True, external_data=True, optimize=False,
                          dynamic_shapes=({0: batch},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vs_module, vs_checkpoint, shapes = [], [], []
    for i, b in enumerate(CHECK_BATCHES):
        x = _sample(enc, b, SEED + 1 + i)
        got = session.run(["embeds"], {enc.input_name: x.numpy()})[0]
        with torch.no_grad():
            ref = module(x)
            ref_bf16 = enc.fn(enc.spec, enc.weights, x)
        if tuple(got.shape) != tuple(ref.shape):
            raise GateFailed(f"{path.name}: onnxruntime output shape {list(got.shape)} differs from PyTorch's "
                             f"{list(ref.shape)} at batch {b}")
        vs_module.append(_errors(got, ref.numpy()))
        vs_checkpoint.append(_errors(got, ref_bf16.float().numpy()))
        shapes.append(list(x.shape))
    worst = _worst(vs_module)
    if not worst["max_rel_error"] <= MAX_REL_ERROR:
        raise GateFailed(f"{path.name}: onnxruntime differs from the PyTorch module by {worst['max_rel_error']:.2e} "
                         f"(relative, limit {MAX_REL_ERROR:g}); the ONNX export is wrong")
    files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(path.name))
    return {
        "onnx": f"encoders/{path.name}",
        "files": [f"encoders/{f}" for f in files],
        "components": list(enc.components),
        "opset": OPSET,
        "weights_dtype": "float16",
        "compute_dtype": "float32",
        "input": {"name": enc.input_name, "dtype": "float32", **enc.shapes()},
        "output": {"name": "embeds", "shape_at_opt": [enc.batch[1], *ref.shape[1:]]},
        "verification": {
            "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
            "input_shapes": shapes,
            "vs_pytorch_module": worst,
            "vs_checkpoint_bf16": _worst(vs_checkpoint),
            "limit_max_rel_error": MAX_REL_ERROR,
        },
        "engine": f"encoders/{enc.name}.plan",
    }


def trtexec_command(enc: Encoder) -> str:
    def dims(shape):
        return "x".join(map(str, shape))

    s = enc.shapes()
    return " ".join([
        "trtexec", f'--onnx="$HERE/{enc.name}.onnx"', f'--saveEngine="$HERE/{enc.name}.plan"', "--fp16",
        f"--minShapes={enc.input_name}:{dims(s['min'])}", f"--optShapes={enc.input_name}:{dims(s['opt'])}",
        f"--maxShapes={enc.input_name}:{dims(s['max'])}"])


def trtexec_script(encoders: list[Encoder], gpu) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# omniq build: TensorRT engines for the Omni encoders; run on the target ({gpu.label}, sm{gpu.sm}):",
             "# engines are specific to the GPU and TensorRT version that build them.",
             "set -euo pipefail", 'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"']
    lines += [trtexec_command(enc) + ' "$@"' for enc in encoders]
    return "\n".join(lines) + "\n"


def export(encoder_plan: EncoderPlan, out_dir: Path, gpu) -> dict:
    """Write every encoder's ONNX file and `trtexec.sh` into `out_dir`; the report goes into build.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for enc in encoder_plan.encoders:
        report[enc.name] = dict(export_one(enc, out_dir), trtexec=trtexec_command(enc))
    script = out_dir / "trtexec.sh"
    script.write_text(trtexec_script(encoder_plan.encoders, gpu))
    script.chmod(0o755)
    return report
