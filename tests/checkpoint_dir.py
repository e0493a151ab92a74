"""Small checkpoint directories for tests: tensors saved as one safetensors file (or re-saved into several
shards with an index) beside config.json and the tokenizer files, and a BF16 checkpoint's linears replaced by
FP8 / NVFP4 tensors with omniq's arithmetic (`omniq.quant.formats`, bit for bit ModelOpt's export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

from omniq.quant import formats

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_checkpoint(dest: Path, tensors: dict, side_from: Path, config: dict | None = None) -> Path:
    """`dest` (created) with `model.safetensors`, `config.json` when `config` is given, and the tokenizer
    files `side_from` has."""
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config, indent=1))
    for f in SIDE_FILES:
        if (side_from / f).is_file():
            shutil.copyfile(side_from / f, dest / f)
    return dest


def quantize_linears(tensors: dict, plan, input_amax: Callable[[str], float], kv_amax: Callable[[str], float],
                     quantized: Callable | None = None) -> dict:
    """`tensors` (a BF16 checkpoint's, edited in place) with every linear the plan quantizes replaced by its
    FP8 / NVFP4 weight and scales: input scales from `input_amax(linear name)`, K / V scales from
    `kv_amax(scale tensor name)`; `quantized(name, weight, format)` may cache the packing."""
    quantized = quantized or (lambda name, w, fmt: formats.fp8_quantize(w) if fmt == "fp8"
                              else formats.nvfp4_quantize(w))
    for lin in plan.quantized:
        fmt = plan.formats[lin.name]
        q = quantized(lin.name, tensors.pop(f"{lin.name}.weight"), fmt)
        if fmt == "fp8":
            tensors[f"{lin.name}.input_scale"] = formats.fp8_scale(input_amax(lin.name))
        else:
            tensors[f"{lin.name}.weight_scale_2"] = q.weight_scale_2
            tensors[f"{lin.name}.input_scale"] = formats.nvfp4_global_scale(input_amax(lin.name))
        tensors[f"{lin.name}.weight"] = q.weight
        tensors[f"{lin.name}.weight_scale"] = q.weight_scale
    for name in plan.kv_scale_tensors:
        tensors[name] = formats.fp8_scale(kv_amax(name))
    return tensors


def resave_sharded(src: Path, dest: Path, split: Callable[[list[str]], list[list[str]]]) -> list[Path]:
    """`src`'s tensors re-saved into `dest` in the shards `split(names)` gives, with an index and every
    other file of `src`; returns the shard paths."""
    tensors = load_file(str(src / "model.safetensors"))
    parts = split(list(tensors))
    weight_map, paths = {}, []
    for k, part in enumerate(parts):
        f = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(dest / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
        paths.append(dest / f)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copyfile(p, dest / p.name)
    return paths


def by_layer_shards(src: Path, dest: Path) -> Path:
    """The bundled tiny model re-saved in model order into two shards, the second holding only the last two
    layers and lm_head (read last by a streamed run); returns that shard."""
    late = ("backbone.layers.8.", "backbone.layers.9.", "backbone.norm_f", "lm_head")
    return resave_sharded(src, dest, lambda names: [[n for n in names if not n.startswith(late)],
                                                    [n for n in names if n.startswith(late)]])[-1]


def watch_reads(monkeypatch, delete: Path | None = None, when: str = ".layers.0.") -> list[str]:
    """validate / eval's shard reader (`artifact.ShardReader.get`) patched to record every tensor name it
    reads, in order; with `delete`, that shard is deleted as the first tensor whose name holds `when` is read
    (the run has started)."""
    from omniq.validate import artifact as artifact_mod

    names: list[str] = []
    real = artifact_mod.ShardReader.get

    def get(self, name):
        names.append(name)
        if delete is not None and when in name and delete.exists():
            delete.unlink()
        return real(self, name)

    monkeypatch.setattr(artifact_mod.ShardReader, "get", get)
    return names


def read_tensors(path: Path) -> dict:
    """Every tensor of a checkpoint directory's safetensors shards."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({n: sf.get_tensor(n) for n in sf.keys()})
    return out
