"""`plan` and `quantize` share the decision of what is quantized: `omniq quantize`'s output on the bundled
model holds exactly the layers `omniq plan` predicted, in the predicted formats and sizes.

The artifacts are the session's (`quantized` in tests/conftest.py: `omniq quantize` in its own process, since
ModelOpt patches torch functions process-wide); they are read back from their safetensors headers only.
"""

import json
from pathlib import Path

import pytest

from omniq.cli import main
from omniq.model.checkpoint import DTYPE_BYTES, read_safetensors_header

# the dtype of a linear layer's weight in a ModelOpt unified checkpoint, per format (modelopt-notes.md)
WEIGHT_DTYPE = {"bf16": "BF16", "fp8": "F8_E4M3", "nvfp4": "U8"}
SCALES = ("weight_scale", "weight_scale_2", "input_scale")
SCALAR = 4  # an fp32 scalar scale


# the session's `omniq quantize tiny` artifacts (tests/conftest.py `quantized`): FP8, NVFP4, and a mixed
# user recipe (routed experts NVFP4, q/k/v BF16, the rest FP8) with an FP8 KV cache: MIXED_PRECISION
ARTIFACTS = ("fp8", "nvfp4", "mixed-kv")


def _plan(capsys, recipe: str, kv: str | None) -> dict:
    assert main(["plan", "tiny", "--recipe", recipe, "--json", *(["--kv-cache", kv] if kv else [])]) == 0
    return json.loads(capsys.readouterr().out)


def _headers(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    headers = {}
    for f in sorted(out.glob("*.safetensors")):
        for name, meta in read_safetensors_header(f).items():
            if name != "__metadata__":
                headers[name] = (meta["dtype"], tuple(meta["shape"]))
    return headers


def _nbytes(dtype, shape) -> int:
    n = DTYPE_BYTES[dtype]
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("name", ARTIFACTS)
def test_quantize_writes_the_planned_layers_formats_and_sizes(quantized, name, capsys):
    run = quantized[name]
    assert run["rc"] == 0, run["stderr"]
    out, recipe = run["path"], run["recipe"]
    plan = _plan(capsys, recipe, run["kv"])
    headers = _headers(out)
    weight_fmt = {v: k for k, v in WEIGHT_DTYPE.items()}

    # every planned linear layer is in the files, in the planned format; no other layer carries scales
    written = {}
    for name in plan["formats"]:
        dtype, _ = headers[f"{name}.weight"]
        written[name] = weight_fmt[dtype]
    assert written == plan["formats"]
    scaled = {n.rsplit(".", 1)[0] for n in headers if n.rsplit(".", 1)[-1] in ("weight_scale", "weight_scale_2")}
    assert scaled == {n for n, f in plan["formats"].items() if f != "bf16"}

    # bytes per format: each layer's weight with its scale tensors, as the plan predicted them, to within the
    # scalar scale tensors (4 bytes each) per layer
    actual = {f: 0 for f in WEIGHT_DTYPE}
    for name, fmt in plan["formats"].items():
        actual[fmt] += sum(_nbytes(*headers[f"{name}.{t}"]) for t in ("weight",) + SCALES if f"{name}.{t}" in headers)
    for fmt, n in plan["layers"].items():
        if fmt in actual:
            assert abs(actual[fmt] - plan["bytes_by_format"][fmt]) <= 2 * SCALAR * n, fmt
    total = sum(_nbytes(*v) for v in headers.values())
    predicted = plan["size"]["language_model"]["bytes"]
    assert abs(total - predicted) <= 2 * SCALAR * len(plan["formats"])

    # the declarations are the plan's
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    planned = plan["hf_quant_config"]["quantization"]
    assert hq["quant_algo"] == planned["quant_algo"] and hq["kv_cache_quant_algo"] == planned["kv_cache_quant_algo"]
    assert sorted(hq["exclude_modules"]) == sorted(planned["exclude_modules"])
    assert hq.get("quantized_layers") == planned.get("quantized_layers")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == planned["quant_algo"]
    if name == "mixed-kv":     # the case this file is for: every format at once, one map per layer
        assert planned["quant_algo"] == "MIXED_PRECISION" and all(plan["layers"][f] for f in WEIGHT_DTYPE)
    if planned["quant_algo"] == "MIXED_PRECISION":
        assert qc["quantized_layers"] == planned["quantized_layers"]
    # an FP8 KV cache brings k/v scales on every attention layer, and only then
    kv = {n for n in headers if n.endswith((".k_scale", ".v_scale"))}
    assert len(kv) == (2 * plan["model"]["pattern"].count("*") if plan["kv_cache"] else 0)

    # and nothing else: every tensor is one the layer plan accounts for
    from omniq.quant import plan_report

    layer_plan, _ = plan_report.make(plan_report.open_source("tiny"), recipe, kv_cache=run["kv"])
    known = {t.name for t in layer_plan.arch.tensors} | set(layer_plan.kv_scale_tensors) | {
        f"{lin.name}.{t}" for lin in layer_plan.quantized for t in SCALES}
    assert set(headers) <= known
