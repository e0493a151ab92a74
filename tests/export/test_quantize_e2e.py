"""`omniq quantize tiny` end to end through the CLI: the artifact holds exactly what the plan says, in NVIDIA's
hub layout, with real exclude names, and omniq.json describes it. Everything is read back from the files;
expectations are derived here from the plan and the source checkpoint, independently of the exporter."""

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open

from omniq.model.checkpoint import DTYPE_BYTES, open_checkpoint, read_safetensors_header
from omniq.quant import formats
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan

# fp8 and the mixed recipe (NVFP4 experts + FP8 + KV cache) run by default; the plain nvfp4 artifact is slow.
NAMES = ("fp8", pytest.param("nvfp4", marks=pytest.mark.slow), "mixed-kv")


@pytest.fixture(scope="module")
def source(tiny_dir):
    return open_checkpoint(str(tiny_dir))


def _plan(source, art):
    return make_plan(source.arch, recipes.load(art["recipe"]).with_kv_cache(art["kv"]))


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                out[name] = sf.get_tensor(name)
    return out


def _dtype_name(t):
    return {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}[t.dtype]


@pytest.mark.parametrize("name", NAMES)
def test_cli_succeeds_with_a_summary(quantized, name):
    art = quantized[name]
    assert art["rc"] == 0, art["stderr"][-2000:]
    assert art["stdout"].startswith(f"wrote {art['path']}") and "linear layers:" in art["stdout"]
    assert art["path"].is_dir()
    assert not [p for p in art["path"].parent.iterdir() if p.name.startswith(".")]   # no stage left


@pytest.mark.parametrize("name", NAMES)
def test_tensors_are_exactly_the_plan(quantized, source, name):
    art = quantized[name]
    plan = _plan(source, art)
    got = _tensors(art["path"])
    src = source.read()
    want = set()
    for lin in plan.arch.linears:
        fmt = plan.formats[lin.name]
        o, i = lin.out_features, lin.in_features
        w = got[f"{lin.name}.weight"]
        if fmt == "bf16":
            want.add(f"{lin.name}.weight")
            assert w.dtype == torch.bfloat16 and torch.equal(w, src[f"{lin.name}.weight"]), lin.name
            continue
        scales = {"fp8": ("weight_scale", "input_scale"),
                  "nvfp4": ("weight_scale", "weight_scale_2", "input_scale")}[fmt]
        want |= {f"{lin.name}.weight"} | {f"{lin.name}.{s}" for s in scales}
        for s in scales:
            assert torch.isfinite(got[f"{lin.name}.{s}"].float()).all() and (got[f"{lin.name}.{s}"].float() > 0).all()
        if fmt == "fp8":
            assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (o, i)
            deq = formats.fp8_dequantize(w, got[f"{lin.name}.weight_scale"])
        else:
            assert w.dtype == torch.uint8 and tuple(w.shape) == (o, i // 2)
            assert got[f"{lin.name}.weight_scale"].dtype == torch.float8_e4m3fn
            assert tuple(got[f"{lin.name}.weight_scale"].shape) == (o, i // 16)
            deq = formats.nvfp4_dequantize(w, got[f"{lin.name}.weight_scale"], got[f"{lin.name}.weight_scale_2"], i)
        ref = src[f"{lin.name}.weight"].float()
        rel = ((deq - ref).norm() / ref.norm()).item()
        assert rel < {"fp8": 0.05, "nvfp4": 0.2}[fmt], (lin.name, rel)
    # every other tensor: the source's, same name (hub layout: backbone.embeddings, one tensor per expert)
    linear_weights = {f"{lin.name}.weight" for lin in plan.arch.linears}
    for t in plan.arch.tensors:
        if t.name not in linear_weights:
            want.add(t.name)
            assert torch.equal(got[t.name], src[t.name]) and got[t.name].dtype == src[t.name].dtype, t.name
    assert got["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32         # router stays fp32
    kv = set(plan.kv_scale_tensors)
    for name in kv:
        assert got[name].dtype == torch.float32 and got[name].shape == () and got[name] > 0
    assert set(got) == want | kv                                                        # nothing stray


@pytest.mark.parametrize("name", NAMES)
def test_quant_configs_name_real_modules(quantized, source, name):
    art = quantized[name]
    plan = _plan(source, art)
    raw = (art["path"] / "hf_quant_config.json").read_text()
    assert "\\u0000" not in raw and "sentinel" not in raw
    hq = json.loads(raw)["quantization"]
    modules = {n.rsplit(".", 1)[0] for n in _tensors(art["path"])}
    assert hq["quant_algo"] == plan.quant_algo
    assert hq["kv_cache_quant_algo"] == ("FP8" if plan.kv_cache else None)
    assert sorted(hq["exclude_modules"]) == sorted(plan.exclude_modules())
    assert all(m in modules for m in hq["exclude_modules"]), set(hq["exclude_modules"]) - modules
    config = json.loads((art["path"] / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source.config                       # the source's own config style, untouched
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == plan.quant_algo
    assert sorted(qc["ignore"]) == sorted(hq["exclude_modules"])
    if plan.kv_cache:
        assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    if plan.quant_algo == "MIXED_PRECISION":
        layers = hq["quantized_layers"]
        assert qc["quantized_layers"] == layers
        tensors = _tensors(art["path"])
        assert set(layers) == {lin.name for lin in plan.quantized}
        for module, entry in layers.items():
            dtype = _dtype_name(tensors[f"{module}.weight"])
            assert {"FP8": "F8_E4M3", "NVFP4": "U8"}[entry["quant_algo"]] == dtype, module
    else:
        assert "quantized_layers" not in hq


@pytest.mark.parametrize("name", NAMES)
def test_manifest(quantized, source, name, tiny_dir):
    art = quantized[name]
    plan = _plan(source, art)
    path = art["path"]
    m = json.loads((path / "omniq.json").read_text())
    assert {"omniq", "modelopt", "torch", "transformers"} <= set(m["versions"])
    assert m["versions"]["modelopt"] == "0.47.0"
    assert m["recipe"]["name"] == plan.recipe.name and m["recipe"]["kv_cache"] == plan.recipe.kv_cache
    for f, digest in m["source"]["files"].items():
        assert hashlib.sha256((tiny_dir / f).read_bytes()).hexdigest() == digest
    assert "model.safetensors" in m["source"]["files"] and m["source"]["dropped_tensors"] == []
    cal = m["calibration"]
    assert (cal["source"], cal["samples"], cal["seq_len"], cal["algorithm"]) == ("tiny-calib", 16, 128, "max")
    assert len(cal["sample_sha256"]) == 16 and len(set(cal["sample_sha256"])) == 16
    assert m["modules"] == plan.formats
    files = sorted(p.name for p in path.iterdir() if p.name not in ("omniq.json", "lint.json"))
    assert sorted(m["files"]) == files
    assert json.loads((path / "lint.json").read_text())["passed"] is True   # the lint sidecar, not listed
    assert m["experts"]["policy"] == "all" and m["experts"]["uncalibrated"] == {}
    for f in files:
        assert hashlib.sha256((path / f).read_bytes()).hexdigest() == m["files"][f], f
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    assert (path / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_same_calibration_gives_the_same_sample_hashes(quantized):
    hashes = [json.loads((quantized[n]["path"] / "omniq.json").read_text())["calibration"]["sample_sha256"]
              for n in ("fp8", "mixed-kv")]
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("name", NAMES)
def test_size_is_the_plan_estimate(quantized, source, name):
    art = quantized[name]
    plan = _plan(source, art)
    header = read_safetensors_header(art["path"] / "model.safetensors")
    data = sum(DTYPE_BYTES[m["dtype"]] * math.prod(m["shape"]) for k, m in header.items() if k != "__metadata__")
    assert data == plan.total_bytes
