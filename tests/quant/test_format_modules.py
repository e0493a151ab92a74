"""One module per format behind one interface (omniq.quant.formats): each format's facts agree with the
tensors its own quantize writes, and its dequantize reads them back."""

import pytest
import torch

from omniq.quant import formats
from omniq.quant.plan import weight_bytes


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_a_format_writes_what_it_declares(name):
    f = formats.FORMATS[name]
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t = f.quantize(w)
    dtypes = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8", torch.float32: "F32"}
    assert dtypes[t["weight"].dtype] == f.weight_dtype and f.bits * w.numel() == 8 * t["weight"].numel()
    specs = f.companion_specs(tuple(w.shape))
    assert set(specs) == set(f.companions)
    for c, (dtype, shape) in specs.items():
        if c != "input_scale":           # calibrated, not part of the weight
            assert dtypes[t[c].dtype] == dtype and tuple(t[c].shape) == shape, c
    stored = sum(v.numel() * v.element_size() for v in t.values()) + formats.SCALAR_BYTES   # + input_scale
    assert f.stored_bytes(*w.shape) == stored == weight_bytes(name, *w.shape)
    back = f.dequantize(t, w.shape[-1])
    assert back.shape == w.shape
    assert (back - w.float()).norm() / w.float().norm() < {"fp8": 0.05, "nvfp4": 0.2}[name]
    x = torch.randn(3, 64)
    assert torch.equal(f.fake_quant_input(x, torch.tensor(0.01)),
                       formats.fp8_fake_quant(x, 0.01) if name == "fp8" else formats.nvfp4_fake_quant(x, 0.01))


def test_mixed_declaration_is_built_from_the_formats():
    assert formats.quant_algo_of({"fp8"}) == "FP8" and formats.quant_algo_of({"nvfp4", "bf16"}) == "NVFP4"
    assert formats.quant_algo_of({"fp8", "nvfp4"}) == formats.MIXED_PRECISION
    assert formats.quant_algo_of({"bf16"}) is None
    assert formats.layer_declaration("nvfp4") == {"quant_algo": "NVFP4", "group_size": 16}
    assert formats.layer_declaration("fp8") == {"quant_algo": "FP8"}
    assert formats.BY_WEIGHT_DTYPE["U8"] is formats.NVFP4 and formats.BY_QUANT_ALGO["FP8"] is formats.FP8


def test_format_facts_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from omniq.quant import formats, plan; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
