"""The unified HF checkpoint around the layer-streamed export: its names, checks and manifest, written atomically.

`staged_output` owns the output directory's life: it refuses an existing `--out` without `force`, stages
everything in a hidden temporary sibling (`.NAME.omniq-XXXX`, same file system), moves the finished
artifact into place with one rename at the end, and on any failure removes the stage (and any parent
directories it created), so nothing is ever left at `--out`.

Inside the stage:
1. (`omniq.export.streamed`) the decoder layers are calibrated and exported one at a time, with ModelOpt's own
   export steps, straight into `stage/final` in NVIDIA's hub layout (`expected_tensors` gives every tensor's
   dtype and shape up front). `hub_names` maps ModelOpt's names onto the hub's: ModelOpt 0.47 reverses
   transformers' load-time conversion itself (`backbone.*`, one tensor per expert) except one name:
   transformers' reverse rename writes `backbone.embedding.weight` where NVIDIA's checkpoints have
   `backbone.embeddings.weight`; it also covers native `model.*` names and fused 3-D expert tensors. An Omni
   checkpoint's tower and projector tensors (never loaded into the model) are copied from the source shards
   byte for byte into one more shard (`copy_raw_tensors`), and `expected_tensors` lists them as passthrough.
2. (`omniq.quant.weight_calibration`, optional) inside step 1, per layer: weights of another algorithm replace
   ModelOpt's before the layer is written (`streamed.run`'s `layer_tensors_hook`).
3. `verify_tensors`: the tensors are exactly what the plan says, or the export fails (GateFailed, exit 1):
   every plan-quantized layer has its quantized weight and scales with the right dtypes and shapes, and
   dequantizes close to its own source weight on sampled rows (a swapped or garbled expert fails); every BF16 layer and
   every other tensor is the source's, bit for bit (router in F32); scales are finite and positive; no stray
   or missing tensor.
4. `write_configs`: `hf_quant_config.json` from `plan.hf_quant_config` (ModelOpt's own exclude list is
   corrupted for NemotronH: `"lm_head.\\u0000backbone.pt_name_sentinel"`), and `config.json` = the source's
   config.json (its own style, `hybrid_override_pattern` or `layers_block_type`) plus `quantization_config`
   converted from the same dict with ModelOpt's `convert_hf_quant_config_format` (MIXED_PRECISION keeps
   `quantized_layers` in both files).
5. tokenizer and other side files copied from the source; `omniq.json` written last with the sha256 of every
   other output file.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omniq.atomic import Staged, staged_dir
from omniq.checksums import sha256_file
from omniq.errors import GateFailed, OmniqError
from omniq.manifest import MANIFEST
from omniq.model import names
from omniq.model.arch import Arch
from omniq.model.checkpoint import Checkpoint, TensorReader, read_rows, read_safetensors_header
from omniq.quant import formats as qformats
from omniq.quant.plan import LayerPlan

Progress = Callable[[str, int, int], None]
# Files of the source checkpoint that travel with the artifact (weights and configs are written anew).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json", "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt",
              "tokenizer.model", "preprocessor_config.json", "processor_config.json")
SIDE_PATTERNS = ("*.py", "*.jinja", "*.tiktoken", "LICENSE*", "NOTICE*")
# Largest relative RMS error of a dequantized weight against its source before the export is refused.
MAX_WEIGHT_ERROR = {"fp8": 0.15, "nvfp4": 0.35}
CHECK_ROWS = 32


# ----- the output directory ----------------------------------------------------------------------------
@dataclass
class Stage(Staged):
    force: bool = False

    @property
    def out(self) -> Path:
        return self.dest



def check_out(out: str | Path, *, force: bool, protect: tuple[Path, ...] = ()) -> Path:
    """The resolved output path, refused when it exists (without force) or would replace a protected path."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise OmniqError(f"--out {out} already exists; choose another directory or pass --force to replace it")
    for p in protect:
        p = Path(p).resolve()
        o = out.resolve()
        if o == p or o in p.parents:
            raise OmniqError(f"--out {out} would replace the source checkpoint {p}; choose another directory")
    return out


def staged_output(out: str | Path, *, force: bool = False, protect: tuple[Path, ...] = ()):
    """Stage an artifact beside `out` and move it into place only if the block succeeds."""
    out = check_out(out, force=force, protect=protect)
    return staged_dir(out, tag="omniq", replace=force, stage_type=Stage, force=force,
                      appeared=f"--out {out} appeared while quantizing; pass --force to replace it")


# ----- 1. tensors in the hub layout ----------------------------------------------------------------------
def hub_names(name: str, tensor, arch: Arch) -> list[tuple[str, object]]:
    """One exported tensor -> [(hub-layout name, tensor)]: `model.` -> `backbone.`, `embedding` ->
    `embeddings`, and a fused 3-D expert tensor split into one tensor per expert."""
    local = names.hub_local(names.without_prefix(name, arch.prefix))
    fused = names.fused_expert(local)
    if fused and getattr(tensor, "dim", lambda: 0)() == 3:
        return [(arch.prefix + names.expert_weight(fused[0], e, fused[1]), tensor[e].contiguous())
                for e in range(tensor.shape[0])]
    return [(arch.prefix + local, tensor)]


# ----- 3. the tensors are the plan ----------------------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    dtype: str
    shape: tuple[int, ...]
    kind: str                  # passthrough | weight | scale | kv_scale
    fmt: str = "bf16"


def tower_tensors(ckpt: Checkpoint | None) -> dict[str, Expected]:
    """An Omni checkpoint's vision / audio tower and projector tensors: passed through in their own dtype."""
    from omniq.model import omni

    if ckpt is None or not ckpt.is_omni:
        return {}
    return {n: Expected(t.dtype, t.shape, "passthrough") for n, t in sorted(ckpt.headers.items())
            if omni.component_of(n) in omni.TOWER_PREFIXES}


def copy_raw_tensors(ckpt: Checkpoint, names: list[str], dst: Path) -> int:
    """Write `names` into a new safetensors file whose data are the source files' bytes of those tensors,
    copied as stored (never through torch, so no dtype or layout can change); returns the data bytes."""
    import struct

    header: dict = {"__metadata__": {"format": "pt"}}
    parts: list[tuple[Path, int, int]] = []
    offset = 0
    src_headers: dict[Path, tuple[int, dict]] = {}
    for name in names:
        f = ckpt.headers[name].file
        if f not in src_headers:
            with open(f, "rb") as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
            src_headers[f] = (8 + hlen, read_safetensors_header(f))
        base, meta = src_headers[f]
        start, end = meta[name]["data_offsets"]
        header[name] = {"dtype": meta[name]["dtype"], "shape": meta[name]["shape"],
                        "data_offsets": [offset, offset + end - start]}
        parts.append((f, base + start, end - start))
        offset += end - start
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for f, pos, size in parts:
            with open(f, "rb") as fh:
                fh.seek(pos)
                data = fh.read(size)
            if len(data) != size:
                raise OmniqError(f"{f}: truncated safetensors file (tensor data ends early)")
            out.write(data)
    return offset


def expected_tensors(plan: LayerPlan, towers: dict[str, Expected] | None = None) -> dict[str, Expected]:
    """Every tensor the artifact of a plan must hold, with its dtype and shape (plus an Omni checkpoint's
    `towers`, passed through)."""
    arch = plan.arch
    out: dict[str, Expected] = dict(towers or {})
    quantized_weights = {f"{lin.name}.weight": lin for lin in plan.quantized}
    for t in arch.tensors:
        if t.name in quantized_weights:
            continue
        out[t.name] = Expected("F32" if t.dtype == "F32" else "BF16", t.shape, "passthrough")
    for w, lin in quantized_weights.items():
        fmt = plan.formats[lin.name]
        f, shape = qformats.FORMATS[fmt], (lin.out_features, lin.in_features)
        out[w] = Expected(f.weight_dtype, f.stored_shape(shape), "weight", fmt)
        for c in f.scales:                        # as the format stores them: weight scales, then input_scale
            out[f"{lin.name}.{c.suffix}"] = Expected(c.dtype, c.shape(shape), "scale", fmt)
    kv_dtype = qformats.KV_CACHE[0].dtype             # K and V scales alike
    for name in plan.kv_scale_tensors:
        out[name] = Expected(kv_dtype, (), "kv_scale", plan.kv_cache)
    return out


def _headers(final: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    out = {}
    for f in sorted(final.glob("*.safetensors")):
        for name, meta in read_safetensors_header(f).items():
            if name != "__metadata__":
                out[name] = (meta["dtype"], tuple(meta["shape"]), f)
    return out


def _fail(problems: list[str]) -> None:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise GateFailed(f"exported checkpoint does not match the layer plan: {'; '.join(problems[:3])}{more}")


def _relative_error(deq, ref) -> float:
    ref = ref.float()
    denom = float(ref.norm())
    diff = float((deq.float() - ref).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


def _same_bits(a, b) -> bool:
    """Bit-for-bit equality of two tensors of one dtype and shape (NaN payloads and the sign of zero included,
    which `torch.equal` does not see), compared as int64 words where the bytes allow it: on a real-width
    embedding matrix about 5x faster than `torch.equal` on bf16 at one thread."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    try:
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    except RuntimeError:                      # byte count or offset not a multiple of 8
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_rows(n_rows: int) -> list[int]:
    """The rows of a quantized weight the self-check dequantizes: CHECK_ROWS evenly spaced ones."""
    import torch

    return torch.linspace(0, n_rows - 1, min(n_rows, CHECK_ROWS)).round().long().unique().tolist()


def weight_error(name: str, fmt: str, rows: list[int], src, rows_of, whole) -> float:
    """Relative error of quantized weight `name` (format `fmt`) on `rows`, dequantized from the exported
    tensors (`rows_of(name, rows)`, `whole(name)`: read from the written shards), against its source rows `src`."""
    module = name[: -len(".weight")]
    f = qformats.FORMATS[fmt]
    tensors = {"weight": rows_of(name, rows)}
    for c in f.weight_scales:                  # per-block scales: the same rows; per-tensor ones whole
        tensors[c.suffix] = rows_of(f"{module}.{c.suffix}", rows) if c.block else whole(f"{module}.{c.suffix}")
    return _relative_error(f.dequantize(tensors, src.shape[-1]), src)


def weight_problem(name: str, fmt: str, err: float) -> str | None:
    if err <= MAX_WEIGHT_ERROR[fmt]:
        return None
    return f"{name} ({fmt}) dequantizes to relative error {err:.3f} against its source weight"


def verify_tensors(final: Path, plan: LayerPlan, ckpt: Checkpoint, progress: Progress | None = None,
                   compensated: dict | None = None, checked: frozenset | set = frozenset()) -> dict:
    """Check the written tensors against the plan and the source; returns per-format counts. `compensated`
    (name -> tensor): high-precision tensors the recipe's compensation refitted, compared with those values
    instead of the source's. `checked`: quantized weights and passthrough tensors the streamed export already
    compared, read back from the shards it had just written, against the source it still held in memory
    (`omniq.export.streamed.WriteCheck`): not read again here; names, dtypes, shapes and scales are checked for
    every tensor all the same."""
    import torch
    from safetensors import safe_open

    expected = expected_tensors(plan, tower_tensors(ckpt))
    found = _headers(final)
    problems = []
    for name in sorted(set(expected) - set(found)):
        problems.append(f"missing {name}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name} ({found[name][0]})")
    for name in sorted(set(expected) & set(found)):
        e, (dtype, shape, _) = expected[name], found[name]
        if dtype != e.dtype or shape != e.shape:
            problems.append(f"{name} is {dtype} {list(shape)}, expected {e.dtype} {list(e.shape)}")
    if problems:
        _fail(problems)

    # Every output shard and source shard opened once; whole tensors only where whole ones are compared
    # (scales, passthrough), quantized weights read as CHECK_ROWS row slices on both sides.
    handles = {f: safe_open(str(f), framework="pt") for f in {v[2] for v in found.values()}}
    source = TensorReader(ckpt)

    def get(name):
        return handles[found[name][2]].get_tensor(name)

    def rows_of(name, rows):
        return read_rows(handles[found[name][2]], name, rows)

    # Scales: finite and positive (engines reject zero or non-finite scales).
    for name, e in expected.items():
        if e.kind in ("scale", "kv_scale"):
            v = get(name)
            if v.dtype == torch.float8_e4m3fn:       # NVFP4 block scales: by their codes (a float32 copy was slow)
                ok = qformats.e4m3_all_positive_finite(v)
            else:
                v = v.float()
                ok = bool(v.isfinite().all()) and bool((v > 0).all())
            if not ok:
                problems.append(f"{name} has non-finite or non-positive values")
    # Passthrough tensors: the source's, bit for bit, in the exported dtype (one at a time).
    compensated = compensated or {}
    for name in (n for n, e in expected.items() if e.kind == "passthrough"
                 and not (n in checked and n not in compensated)):
        out = get(name)
        src = compensated[name] if name in compensated else source.get(name)
        if not _same_bits(out, src.to(out.dtype)):
            problems.append(f"{name} differs from the {'compensation' if name in compensated else 'source checkpoint'}")
        del out, src
    if problems:
        _fail(problems)
    # Quantized weights: close to their own source weight once dequantized (on CHECK_ROWS evenly spaced rows,
    # enough to catch a swapped, shifted or garbled weight at a small fraction of a full dequantization).
    weights = [n for n, e in expected.items() if e.kind == "weight"]
    for k, name in enumerate(weights):
        if name not in checked:
            fmt = expected[name].fmt
            rows = check_rows(expected[name].shape[0])
            problem = weight_problem(name, fmt, weight_error(name, fmt, rows, source.rows(name, rows), rows_of, get))
            if problem:
                problems.append(problem)
        if progress and ((k + 1) % 64 == 0 or k + 1 == len(weights)):
            progress("verify", k + 1, len(weights))
    if problems:
        _fail(problems)
    counts: dict[str, int] = {}
    for fmt in plan.formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


# ----- 4. configs ---------------------------------------------------------------------------------------
def producer() -> dict:
    import modelopt

    return {"name": "modelopt", "version": modelopt.__version__}


def write_configs(final: Path, plan: LayerPlan, ckpt: Checkpoint, modelopt_quant_config: dict) -> dict:
    """hf_quant_config.json and config.json's quantization_config, both from the plan."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hq = plan.hf_quant_config(producer())
    theirs = (modelopt_quant_config or {}).get("quantization", {})
    ours = hq["quantization"]
    for key in ("quant_algo", "kv_cache_quant_algo"):
        if theirs.get(key) != ours.get(key):
            raise GateFailed(f"ModelOpt exported {key} {theirs.get(key)!r} but the plan says {ours.get(key)!r}")
    (final / "hf_quant_config.json").write_text(json.dumps(hq, indent=4) + "\n")
    config = dict(ckpt.config)
    config["quantization_config"] = convert_hf_quant_config_format(hq)
    (final / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return hq


def copy_side_files(src: Path, final: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or (final / p.name).exists():
            continue
        if p.name in SIDE_FILES or any(Path(p.name).match(pat) for pat in SIDE_PATTERNS):
            shutil.copyfile(p, final / p.name)
            copied.append(p.name)
    return copied


# ----- 5. manifest --------------------------------------------------------------------------------------


def source_hashes(ckpt: Checkpoint) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(ckpt.path.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def write_manifest(final: Path, manifest: dict) -> dict:
    """omniq.json: the given facts plus the sha256 of every other file of the artifact."""
    files = {p.name: sha256_file(p) for p in sorted(final.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = dict(manifest, files=files)
    (final / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class Exported:
    path: Path
    files: list[str]
    bytes: int
    counts: dict[str, int] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)




def finish_written(stage: Stage, plan: LayerPlan, ckpt: Checkpoint, manifest: dict, modelopt_quant_config: dict,
                   progress: Progress | None = None, compensated: dict | None = None,
                   checked: frozenset | set = frozenset()) -> Exported:
    """Steps 3-5 on a stage whose final directory holds the hub-layout shards (the layer-streamed export
    writes them there directly: `omniq.export.streamed`; `checked`: what it compared as it wrote them)."""
    seconds = {}
    t = time.perf_counter()
    counts = verify_tensors(stage.final, plan, ckpt, progress, compensated, checked)
    seconds["verify"] = time.perf_counter() - t
    t = time.perf_counter()
    write_configs(stage.final, plan, ckpt, modelopt_quant_config)
    copy_side_files(ckpt.path, stage.final)
    manifest = write_manifest(stage.final, manifest)
    seconds["manifest"] = time.perf_counter() - t
    files = sorted(p.name for p in stage.final.iterdir() if p.is_file())
    size = sum((stage.final / f).stat().st_size for f in files)
    return Exported(path=stage.out, files=files, bytes=size, counts=counts, manifest=manifest, seconds=seconds)
