"""The reference side of a validate run, kept on disk so the next candidate of the same reference skips it.

Of validate's three streams (`omniq.validate.stream`), two depend only on the reference checkpoint and the
token rows: the float32 reference and the noise floor (the reference as a BF16 engine runs it). Validating
several candidates of one model (every recipe of `omniq pipeline`, a recipe search, a re-run in CI) runs
them again for each. With `--reference-cache DIR`, a run stores what those two streams leave at the head:
the reference's final-normed hidden states of the scored positions (float32, 4 x hidden bytes per token,
where its logits would be 0.5 MiB per token at a 131,072-entry vocabulary) and the noise floor's per-token
scores against the reference (KL, top-1 agreement, the target's log-likelihood per logits chunk). A later
run with the same key reads them and runs only the candidate's stream through the layers (the reference's
layers are still read, for the weight SQNR), then the reference's lm_head on the stored states to score the
candidate. The report's numbers are the same bit for bit (tests/validate/test_reference_cache.py).

The key (sha256) covers everything the stored states depend on: the reference's config and weight files
(their sha256, `omniq.checksums`), every batch's input ids, targets, scored positions and the reference's
media embeddings, whether the noise floor runs, the device kind, torch's version and thread count, the CPU's
AMX BF16 flag (oneDNN rounds otherwise there) and the source of the code that computes the states (the
forward, the Mamba scan, the streams' linears). A file that does not load, or whose key or shapes differ,
is recomputed and replaced, with a warning. Files are safetensors (never pickle), written atomically.

Why not a library cache: the stored states are omniq's own streams' (engine numerics no library model
runs), and the key must cover omniq's code; a content-keyed directory of safetensors files is all it takes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniq import checksums
from omniq.errors import OmniqError

FORMAT = 1
# the code whose change changes the stored states (relative to the package)
CODE = ("model/forward.py", "model/mamba2.py", "model/omni.py", "model/arch.py", "validate/stream.py",
        "validate/artifact.py", "quant/formats/base.py", "quant/formats/fp8.py", "quant/formats/nvfp4.py")


@dataclass
class Entry:
    """A cache directory's entry for one key, once loaded or computed: `states["reference"][k]`, the
    reference's final-normed hidden states of batch k at its scored positions ((b * S, hidden) float32), and
    `states["noise_floor"][k]`, the noise floor's scores of those tokens against the reference (`kl`, `agree`
    per token, `nll` per logits chunk: what `metrics.compare_logits` adds to its Comparison)."""

    directory: Path
    key: str
    states: dict[str, list[torch.Tensor]] | None = None
    hit: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.key}.safetensors"

    def record(self) -> dict:
        """What the report says of the cache."""
        return {"dir": str(self.directory), "key": self.key, "hit": self.hit}


def _cpu_has_amx_bf16() -> bool:
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def _tensor_digest(h, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def key(reference, items, *, noise_floor: bool, device) -> str:
    """sha256 of what the cached streams' states depend on (see the module docstring)."""
    ckpt = reference.checkpoint
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "device": torch.device(device).type, "amx_bf16": _cpu_has_amx_bf16(),
                         "noise_floor": bool(noise_floor), "code": code_digest(),
                         "config": ckpt.config}, sort_keys=True, default=str).encode())
    for f in sorted(ckpt.weight_files):
        h.update(Path(f).name.encode() + checksums.sha256_file(f).encode())
    for it in items:
        h.update(f"{it.set}|{it.select}".encode())
        _tensor_digest(h, it.input_ids)
        _tensor_digest(h, it.targets)
        for kind in sorted((it.media or {}).get("reference") or {}):
            h.update(kind.encode())
            _tensor_digest(h, it.media["reference"][kind])
    return h.hexdigest()


def open_entry(directory, reference, items, *, noise_floor: bool, device) -> Entry:
    """The entry of this run's key in `directory` (made if missing), loaded when a valid file is there."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise OmniqError(f"--reference-cache {directory}: not a directory; pass a directory for the cache")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OmniqError(f"--reference-cache {directory}: cannot create it ({e.strerror}); pass a writable "
                         "directory") from None
    entry = Entry(directory, key(reference, items, noise_floor=noise_floor, device=device))
    if entry.path.is_file():
        entry.states = _load(entry, items, noise_floor, reference.arch.hidden_size, device)
        entry.hit = entry.states is not None
    return entry


def _load(entry: Entry, items, noise_floor: bool, hidden: int, device) -> dict | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(entry.path))
    except (OSError, SafetensorError, ValueError) as e:
        entry.warnings.append(f"reference cache {entry.path.name}: unreadable ({e}); recomputed")
        return None
    out: dict[str, list] = {"reference": []}
    if noise_floor:
        out["noise_floor"] = []
    for k, it in enumerate(items):
        rows = it.targets.shape[0] * it.targets.shape[1]
        want = {f"reference.{k}": (torch.float32, [rows, hidden])}
        if noise_floor:
            want.update({f"noise_floor.kl.{k}": (torch.float64, [rows]),
                         f"noise_floor.agree.{k}": (torch.bool, [rows]),
                         f"noise_floor.nll.{k}": (torch.float64, None)})
        for name, (dtype, shape) in want.items():
            t = tensors.get(name)
            if t is None or t.dtype != dtype or (shape is not None and list(t.shape) != shape):
                entry.warnings.append(f"reference cache {entry.path.name}: {name} missing or of another dtype or "
                                      "shape; recomputed")
                return None
        out["reference"].append(tensors[f"reference.{k}"].to(device))
        if noise_floor:
            out["noise_floor"].append({w: tensors[f"noise_floor.{w}.{k}"].to(device) for w in ("kl", "agree", "nll")})
    if len(tensors) != len(items) * (4 if noise_floor else 1):
        entry.warnings.append(f"reference cache {entry.path.name}: {len(tensors)} tensors, expected "
                              f"{len(items) * (4 if noise_floor else 1)}; recomputed")
        return None
    return out


def store(entry: Entry, states: dict[str, list[torch.Tensor]]) -> None:
    """Write the computed states under the entry's key (atomically; over an invalid file of the same key)."""
    from safetensors.torch import save

    from omniq.atomic import write_atomic

    flat = {f"reference.{k}": t for k, t in enumerate(states["reference"])}
    for k, scores in enumerate(states.get("noise_floor", [])):
        flat.update({f"noise_floor.{w}.{k}": t for w, t in scores.items()})
    flat = {n: t.detach().to("cpu").contiguous() for n, t in flat.items()}
    write_atomic(entry.path, save(flat, metadata={"omniq": "validate reference cache", "key": entry.key,
                                                  "format": str(FORMAT)}))
    entry.states = states
