"""Open a checkpoint: a local directory, a bundled name, or a hub id.

Reads `config.json` (NVIDIA's style or transformers 5's, plain NemotronH or the Omni wrapper), the
safetensors headers (names, dtypes, shapes; no tensor is loaded), the declared quantization, and checks
that the tensors are the ones the config describes. Pickled weights are refused unless asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from omniq.errors import OmniqError
from omniq.model import names, omni
from omniq.model.arch import Arch, from_config
from omniq.quiet import quiet

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype name -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1,
               "I16": 2, "I32": 4, "I64": 8, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
QUANTIZED_DTYPES = {"F8_E4M3", "F8_E5M2", "U8", "I8"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    stored: str | None = None   # the name in the file when it differs from the canonical hub name
    span: tuple[int, int] | None = None   # absolute byte offsets of its data in `file` (start, end)

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 1)
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    path: Path
    config: dict
    arch: Arch
    is_omni: bool
    weight_files: list[Path]
    headers: dict[str, TensorInfo]
    quantization: dict | None = None
    source: str = ""                          # what the user typed
    extra: dict = field(default_factory=dict)

    @property
    def llm_config(self) -> dict:
        return omni.llm_config(self.config) if self.is_omni else self.config

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None or any(t.dtype in QUANTIZED_DTYPES for t in self.headers.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.headers.values())

    def read(self, names=None) -> dict:
        """Load tensors (all, or the given names) with safetensors; never pickle."""
        from safetensors import safe_open

        wanted = set(self.headers) if names is None else set(names)
        missing = wanted - set(self.headers)
        if missing:
            raise OmniqError(f"{self.path}: tensor {sorted(missing)[0]!r} is not in the checkpoint")
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self.headers[n].file, []).append(n)
        out = {}
        for f, names_in_file in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for n in names_in_file:
                    out[n] = sf.get_tensor(self.headers[n].stored or n)
        return out

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        # an Omni config.json makes transformers warn about its model type
        try:
            with quiet(transformers=True):
                # Never the checkpoint's own code: an Omni config's auto_map would make transformers ask on stdin.
                return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - turn any loader failure into a user-facing message
            raise OmniqError(f"{self.path}: cannot load the tokenizer ({type(e).__name__}: {e}); "
                             "the checkpoint directory needs tokenizer.json / tokenizer_config.json") from None


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


class TensorReader:
    """A checkpoint's tensors by name, read from shard files opened once (the streamed quantize reads one layer
    at a time, validate one layer of each checkpoint, the export self-check a few rows); never pickle.

    Why not safetensors' `safe_open`: it memory-maps the whole shard, and every page a read touches stays mapped
    into this process until the handle closes. A cgroup-v1 memory limit (CI runners, Kubernetes) charges those
    mapped pages to the process and reclaims them slowly, so a 6 GiB limit was exhausted by reads of a
    14 GiB checkpoint whose anonymous memory stayed under 4 GiB (benchmarks/validate_realwidth.py, 12 real-width
    layers, killed at 9.2 GiB RSS). Here each tensor is read with `pread` straight into its own tensor (one copy,
    as `get_tensor` makes), from the byte offsets of the safetensors header already parsed by `open_checkpoint`,
    and the page cache of the bytes just read is dropped (`posix_fadvise(DONTNEED)`): nothing of the shard
    stays charged to the process. A tensor whose offsets are unknown (a header built by hand) is read with
    `safe_open`."""

    def __init__(self, ckpt: "Checkpoint"):
        self.ckpt = ckpt
        self._fds: dict[Path, int] = {}
        self._handles: dict[Path, object] = {}

    def _info(self, name: str) -> "TensorInfo":
        meta = self.ckpt.headers.get(name)
        if meta is None:
            raise OmniqError(f"{self.ckpt.path}: tensor {name} is missing from the checkpoint")
        if not Path(meta.file).is_file() and meta.file not in self._fds and meta.file not in self._handles:
            raise OmniqError(f"{meta.file}: shard missing (it was there when the run started); restore it and rerun")
        return meta

    def _fd(self, f: Path) -> int:
        import os

        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        return self._fds[f]

    def _read(self, meta: "TensorInfo", name: str, start: int, shape: tuple[int, ...], out=None):
        import os

        import torch

        if out is None:
            out = torch.empty(shape, dtype=getattr(torch, TORCH_DTYPES[meta.dtype]))
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        fd = self._fd(Path(meta.file))
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise OmniqError(f"{meta.file}: cannot read tensor {name} (the file ends at byte {start + done}, "
                                 f"its header says {start + len(view)}); the shard changed or is damaged")
            done += n
        if done and hasattr(os, "posix_fadvise"):          # Linux; elsewhere the page cache is the OS's to manage
            os.posix_fadvise(fd, start, done, os.POSIX_FADV_DONTNEED)
        return out

    def _safe_open(self, meta: "TensorInfo"):
        from safetensors import safe_open

        f = Path(meta.file)
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f]

    def get(self, name: str, out=None):
        """Tensor `name`; `out`: a contiguous tensor of its dtype and shape to read it into (the streamed
        quantize fills a layer's fused expert stack expert by expert: no second copy of each expert)."""
        meta = self._info(name)
        if out is not None and (tuple(out.shape) != tuple(meta.shape) or not out.is_contiguous()
                                or TORCH_DTYPES.get(meta.dtype) != str(out.dtype).removeprefix("torch.")):
            raise OmniqError(f"{self.ckpt.path}: tensor {name} is {meta.dtype} {list(meta.shape)}, expected "
                             f"{out.dtype} {list(out.shape)}; config and weights do not match")
        try:
            if meta.span is not None and meta.dtype in TORCH_DTYPES:
                return self._read(meta, name, meta.span[0], meta.shape, out)
            t = self._safe_open(meta).get_tensor(meta.stored or name)
            return t if out is None else out.copy_(t)
        except OmniqError:
            raise
        except Exception as e:  # noqa: BLE001 - a shard truncated or replaced mid-run is a user-fixable input
            raise OmniqError(f"{meta.file}: cannot read tensor {name} ({type(e).__name__}); "
                             "the shard changed or is damaged") from None

    def rows(self, name: str, rows: list[int]):
        """Rows `rows` (first dimension) of a tensor, each read on its own (not the whole tensor)."""
        import torch

        meta = self._info(name)
        if meta.span is None or meta.dtype not in TORCH_DTYPES:
            return read_rows(self._safe_open(meta), meta.stored or name, rows)
        row_bytes = (meta.span[1] - meta.span[0]) // max(meta.shape[0], 1)
        return torch.cat([self._read(meta, name, meta.span[0] + r * row_bytes, (1, *meta.shape[1:])) for r in rows])

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()


def read_rows(handle, name: str, rows: list[int]):
    """Rows of tensor `name` from an open safetensors handle, slice by slice (not the whole tensor)."""
    import torch

    sl = handle.get_slice(name)
    return torch.cat([sl[r:r + 1] for r in rows])


def bundled_names() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory, a bundled name (`tiny`), or a hub id (`org/name`, downloaded with huggingface_hub)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    if name_or_path in bundled_names():
        return BUNDLED_DIR / name_or_path
    if p.exists():
        raise OmniqError(f"{name_or_path}: is a file, not a checkpoint directory; pass the directory holding "
                         "config.json and the *.safetensors files")
    looks_like_hub = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub:
        names = ", ".join(bundled_names()) or "none"
        raise OmniqError(f"{name_or_path}: no such directory, bundled model ({names}) or hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model",
                                                      "*.jinja", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 - network / auth / not found: all fixable by the user
        raise OmniqError(f"{name_or_path}: could not download from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); check the id, your network and "
                         "HF_TOKEN, or pass a local directory") from None


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one safetensors file, without loading tensors."""
    return read_safetensors_layout(path)[0]


def read_safetensors_layout(path: Path) -> tuple[dict, int]:
    """(the JSON header of one safetensors file, the byte offset where its data begin)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"implausible header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header, 8 + n
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise OmniqError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise OmniqError(f"{index}: unreadable index ({e}); re-download the checkpoint") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise OmniqError(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing")
        return files
    return sorted(path.glob("*.safetensors"))


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise OmniqError(f"{path}: no config.json; pass a Hugging Face style checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise OmniqError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise OmniqError(f"{cfg_path}: expected a JSON object")
    return cfg


def read_quantization(path: Path, cfg: dict) -> dict | None:
    hq = path / "hf_quant_config.json"
    if hq.is_file():
        try:
            return json.loads(hq.read_text())
        except ValueError as e:
            raise OmniqError(f"{hq}: not valid JSON ({e})") from None
    qc = cfg.get("quantization_config")
    if not qc and omni.is_omni(cfg):
        qc = omni.llm_config(cfg).get("quantization_config")
    return qc or None


def arch_of(cfg: dict) -> tuple[Arch, bool]:
    if omni.is_omni(cfg):
        return from_config(omni.llm_config(cfg), prefix=omni.LLM_PREFIX), True
    return from_config(cfg), False


def open_checkpoint(name_or_path: str, *, allow_pickle: bool = False, revision: str | None = None,
                    check_shapes: bool = True) -> Checkpoint:
    path = resolve(str(name_or_path), revision)
    cfg = read_config(path)
    arch, is_omni = arch_of(cfg)
    files = _weight_files(path)
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise OmniqError(f"{path}: only pickled weights ({pickles[0]}); pickles can run code when loaded. "
                             "Convert to safetensors, or pass --allow-pickle if you trust the file")
        if not pickles:
            raise OmniqError(f"{path}: no *.safetensors weights found")
        path = pickles_to_safetensors(path, [path / p for p in pickles])
        files = _weight_files(path)
    headers: dict[str, TensorInfo] = {}
    for f in files:
        header, base = read_safetensors_layout(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                a, b = meta["data_offsets"]
                headers[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), f, span=(base + int(a), base + int(b)))
                if headers[name].dtype in DTYPE_BYTES and int(b) - int(a) != headers[name].nbytes:
                    raise OmniqError(f"{f}: header entry for tensor {name!r} spans {int(b) - int(a)} bytes but "
                                     f"{meta['dtype']} {list(meta['shape'])} needs {headers[name].nbytes}; "
                                     "re-download or re-export it")
            except (KeyError, TypeError, ValueError):
                raise OmniqError(f"{f}: malformed header entry for tensor {name!r}") from None
    canonicalize_names(headers, arch.prefix)
    ckpt = Checkpoint(path=path, config=cfg, arch=arch, is_omni=is_omni, weight_files=files, headers=headers,
                      quantization=read_quantization(path, cfg), source=str(name_or_path))
    if check_shapes and not ckpt.is_quantized:
        check_tensors_match_config(ckpt)
    return ckpt


# Names some writers use for a hub-layout tensor (the name codec, omniq.model.names).
NAME_ALIASES = names.ALIASES


def canonicalize_names(headers: dict[str, TensorInfo], prefix: str = "") -> None:
    """Key aliased tensors by their canonical hub name (in place); `TensorInfo.stored` keeps the file's name."""
    from dataclasses import replace

    for alias, canonical in NAME_ALIASES.items():
        a, c = prefix + alias, prefix + canonical
        if a in headers and c not in headers:
            headers[c] = replace(headers.pop(a), stored=a)


def pickles_to_safetensors(path: Path, pickles: list[Path]) -> Path:
    """--allow-pickle: load the pickled state dicts with `torch.load(weights_only=True)` (tensors and plain
    containers only; arbitrary objects are refused) and write them as safetensors, with the checkpoint's JSON and
    tokenizer files, into a temporary directory removed when the process ends. Everything after this reads
    safetensors only."""
    import atexit
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="omniq-unpickled-"))
    atexit.register(shutil.rmtree, tmp, True)
    for f in path.iterdir():
        if f.is_file() and f.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(f, tmp / f.name)
    tensors: dict = {}
    for f in pickles:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything torch.load refuses is a user-fixable input
            raise OmniqError(f"{f}: cannot load it as a weights-only pickle ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise OmniqError(f"{f}: not a state dict of tensors")
        tensors.update({k: v.contiguous() for k, v in state.items()})
    (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return tmp


def check_tensors_match_config(ckpt: Checkpoint) -> None:
    """Every tensor the config implies is present with its shape (language model only)."""
    for t in ckpt.arch.tensors:
        info = ckpt.headers.get(t.name)
        if info is None:
            raise OmniqError(f"{ckpt.path}: tensor {t.name} implied by config.json is missing; "
                             "config and weights do not match")
        if info.shape != t.shape:
            raise OmniqError(f"{ckpt.path}: tensor {t.name} has shape {list(info.shape)} but config.json "
                             f"implies {list(t.shape)}; config and weights do not match")
