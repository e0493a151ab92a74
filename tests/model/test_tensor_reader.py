"""TensorReader: tensors read with pread from the header's offsets, equal to safetensors' own reader."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniq.errors import OmniqError
from omniq.model.checkpoint import TensorReader, open_checkpoint


def _mixed_dtypes(tmp_path, tiny_dir):
    """A copy of tiny whose shard also holds tensors of every dtype an artifact stores (U8, F8_E4M3, F32, I64)."""
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {n: h.get_tensor(n) for n in h.keys()}
    g = torch.Generator().manual_seed(0)
    tensors.update({"extra.u8": torch.randint(0, 255, (7, 5), dtype=torch.uint8, generator=g),
                    "extra.f8": torch.randn(3, 16, generator=g).to(torch.float8_e4m3fn),
                    "extra.f32": torch.randn(4, 3, generator=g), "extra.i64": torch.arange(5),
                    "extra.scalar": torch.tensor(2.5), "extra.empty": torch.zeros(0, 4)})
    save_file(tensors, str(f), metadata={"format": "pt"})
    return d


def test_a_read_maps_nothing_of_the_shard(tmp_path, tiny_dir):
    """Pages of a shard mapped into the process count against a cgroup-v1 limit: the reader maps none."""
    d = tmp_path / "c"
    shutil.copytree(tiny_dir, d)
    ckpt = open_checkpoint(d)
    reader = TensorReader(ckpt)
    for name in ckpt.headers:
        reader.get(name)
    maps = open("/proc/self/maps").read()
    assert str(d / "model.safetensors") not in maps
    reader.close()


def test_every_tensor_and_row_equals_safetensors_reading(tmp_path, tiny_dir):
    d = _mixed_dtypes(tmp_path, tiny_dir)
    ckpt = open_checkpoint(d, check_shapes=False)
    reader = TensorReader(ckpt)
    with safe_open(str(d / "model.safetensors"), framework="pt") as h:
        for name in h.keys():
            mine, theirs = reader.get(name), h.get_tensor(name)
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
            assert torch.equal(mine.view(torch.uint8) if mine.dtype == torch.float8_e4m3fn else mine,
                               theirs.view(torch.uint8) if theirs.dtype == torch.float8_e4m3fn else theirs), name
            if theirs.dim() >= 1 and theirs.shape[0] > 2:
                rows = [theirs.shape[0] - 1, 0, 1]
                assert torch.equal(reader.rows(name, rows).float(), theirs[rows].float()), name
    reader.close()


def test_a_shard_truncated_mid_run_is_one_line(tmp_path, tiny_dir):
    d = tmp_path / "t"
    shutil.copytree(tiny_dir, d)
    ckpt = open_checkpoint(d)
    last = max(ckpt.headers, key=lambda n: ckpt.headers[n].span[1])
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:ckpt.headers[last].span[0] + 10])     # cut inside the last tensor
    with pytest.raises(OmniqError, match="cannot read tensor .*the shard changed or is damaged") as e:
        TensorReader(ckpt).get(last)
    assert "\n" not in str(e.value)
    f.unlink()
    with pytest.raises(OmniqError, match="shard missing"):
        TensorReader(ckpt).get(last)


def test_a_header_whose_offsets_disagree_with_the_shape_is_refused_at_open(tmp_path, tiny_dir):
    d = tmp_path / "h"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2] + header[name]["shape"]       # the same bytes claimed for twice the elements
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])     # data offsets are relative: still valid
    with pytest.raises(OmniqError, match=f"header entry for tensor '{name}' spans"):
        open_checkpoint(d, check_shapes=False)
