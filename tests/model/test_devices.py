"""Every tensor omniq's forward, Mamba-2 scan and number formats make is made on their inputs' device: run on
PyTorch's `meta` device (no values, no memory), a tensor made on the CPU by mistake stops the run with
"... is not on the expected device meta", so the CUDA path is checked without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from omniq.model import forward, mamba2
from omniq.model.arch import from_config
from omniq.model.checkpoint import resolve
from omniq.quant import formats

META = torch.device("meta")


@pytest.fixture(scope="module")
def arch():
    cfg = json.loads((resolve("tiny") / "config.json").read_text())
    return from_config(cfg)


def meta_weights(arch) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=torch.bfloat16, device=META) for t in arch.tensors}


def test_a_cpu_tensor_meeting_a_meta_tensor_raises():
    """What the tests below rely on."""
    with pytest.raises(RuntimeError, match="expected device"):
        torch.ones(3, device=META) * torch.ones(3)


@pytest.mark.parametrize("recurrent", [False, True])
def test_forward_runs_on_meta(arch, recurrent):
    ids = torch.zeros(2, arch.chunk_size + 9, dtype=torch.long, device=META)     # a ragged second chunk
    stats: dict = {}
    with torch.inference_mode():
        out = forward.logits(arch, meta_weights(arch), ids, route_stats=stats, recurrent=recurrent)
    assert out.device == META and out.shape == (*ids.shape, arch.vocab_size) and out.dtype == torch.float32
    assert set(stats) == set(arch.layers_of("E")) and all(c.device == META for c in stats.values())


def test_mamba_scan_runs_on_meta():
    b, L, h, p, g, n = 2, 70, 4, 8, 2, 16
    x, dt = torch.empty(b, L, h, p, device=META), torch.empty(b, L, h, device=META)
    B, C = torch.empty(b, L, g, n, device=META), torch.empty(b, L, g, n, device=META)
    A, D = torch.empty(h, device=META), torch.empty(h, device=META)
    y, state = mamba2.ssd_chunked(x, dt, A, B, C, D, chunk_size=32)
    assert y.device == state.device == META and state.shape == (b, h, p, n)
    y, state = mamba2.ssd_recurrent(x, dt, A, B, C, D)
    assert y.device == state.device == META


def test_number_formats_run_on_meta():
    w = torch.empty(32, 64, device=META)
    q = formats.nvfp4_quantize(w, torch.tensor(0.01, device=META))
    assert q.weight.device == META and q.dequantize(64).device == META
    assert formats.nvfp4_fake_quant(w, torch.tensor(0.01, device=META)).device == META
    assert formats.fp8_fake_quant(w, torch.tensor(0.01, device=META)).device == META
    assert formats.fp8_quantize(w).dequantize().device == META
