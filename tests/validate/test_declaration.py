"""One reading of the quantization declaration (`omniq.validate.declaration.Reading`): which format each
module of a checkpoint is declared in, for every shape and spelling engines accept. Validate, lint, build and
the model card all ask it; test_lint.py checks that they agree on omniq's and ModelOpt's own exports."""

from __future__ import annotations

import json

import pytest

from omniq.deploy import trtllm
from omniq.errors import OmniqError
from omniq.model.checkpoint import open_checkpoint
from omniq.validate import declaration as decl
from omniq.validate.artifact import read_artifact

EXPERT = "backbone.layers.1.mixer.experts.3.up_proj"
IN_PROJ = "backbone.layers.0.mixer.in_proj"
CONV = "backbone.layers.0.mixer.conv1d"
LINEARS = frozenset({EXPERT, IN_PROJ, "lm_head", "backbone.layers.3.mixer.q_proj"})


def nested(**q) -> dict:
    return {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": q}


def test_mixed_precision_fused_experts_listed_once_in_every_spelling():
    for name in ("backbone.layers.1.mixer.experts", "model.layers.1.mixer.experts", "*.mixer.experts",
                 "backbone.layers.1.mixer.experts.*"):
        r = decl.of_quantization(nested(quant_algo="MIXED_PRECISION", quantized_layers={
            name: {"quant_algo": "NVFP4", "group_size": 16}, "model.layers.0.mixer.in_proj": {"quant_algo": "FP8"}}),
            is_omni=False)
        assert r.format(EXPERT) == "nvfp4", name
        assert r.layer_entry(EXPERT) == name
        assert r.format(IN_PROJ) == "fp8"
        assert r.format("backbone.layers.3.mixer.q_proj") == "bf16"      # no entry: BF16
    # an Omni checkpoint's language model: names with or without language_model., backbone. or model.
    r = decl.of_quantization(nested(quant_algo="MIXED_PRECISION",
                                    quantized_layers={"model.layers.1.mixer.experts": "NVFP4"}), is_omni=True)
    assert r.format("language_model." + EXPERT) == "nvfp4"


def test_one_algo_with_excludes_wildcards_and_the_flat_shape():
    for q in (nested(quant_algo="FP8", exclude_modules=["lm_head", "model.layers.0.mixer*"]),
              {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "backbone.layers.0.*"]}):
        r = decl.of_quantization(q, is_omni=False, linears=LINEARS)
        assert r.format(EXPERT) == "fp8"
        assert r.format("lm_head") == "bf16" and r.excluded_by("lm_head") == "lm_head"
        assert r.format(IN_PROJ) == "bf16" and r.excluded_by(IN_PROJ) is not None
        assert r.format(CONV) == "bf16"                      # not a quantizable linear
        assert r.algo(CONV, covered=True) is None            # excluded by the wildcard even if covered
    # an exclude names an ancestor: everything under it is BF16
    r = decl.of_quantization(nested(quant_algo="NVFP4", exclude_modules=["backbone.layers.1"]), False, LINEARS)
    assert r.format(EXPERT) == "bf16" and r.format(IN_PROJ) == "nvfp4"
    # flat shape: group size from config_groups, FP8 KV cache from kv_cache_scheme
    flat = decl.of_quantization({"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": [],
                                 "kv_cache_scheme": {"num_bits": 8, "type": "float"},
                                 "config_groups": {"g": {"weights": {"group_size": 16}}}}, False, LINEARS)
    assert (flat.declared.kv_cache_quant_algo, flat.declared.group_size) == ("FP8", 16)


def test_corrupted_sentinel_names_match_nothing_unless_repaired():
    bad = "backbone.layers.1.mixer.experts.\x00backbone.pt_name_sentinel"
    r = decl.of_quantization(nested(quant_algo="MIXED_PRECISION", quantized_layers={bad: {"quant_algo": "NVFP4"}},
                                    exclude_modules=["lm_head.\x00backbone.pt_name_sentinel"]), is_omni=False)
    assert r.format(EXPERT) == "bf16"                         # as engines read it
    assert r.format(EXPERT, repair=True) == "nvfp4"           # as validate reads it (with a warning)
    assert r.layer_entry(EXPERT, repair=True) == bad
    assert r.corrupted() == {"quantized_layers": [bad], "exclude_modules": ["lm_head.\x00backbone.pt_name_sentinel"]}


def test_modelopt_raw_mixed_export(artifacts):
    """ModelOpt 0.47's own MIXED_PRECISION export (NVFP4 experts, FP8 elsewhere): the experts are listed once
    per layer, every name corrupted. Validate's reading (repaired) finds each layer's format; the engine
    reading (build) sees nothing declared, which is why `omniq quantize` rewrites the declaration."""
    ckpt = open_checkpoint(str(artifacts["mixed"]), check_shapes=False)
    r = decl.reading(ckpt.path, ckpt.config)
    assert r.declared.source == decl.HF_QUANT_CONFIG and r.declared.is_mixed
    art = read_artifact(artifacts["mixed"])
    for lin in ckpt.arch.linears:
        want = "bf16" if lin.role == "lm_head" else "nvfp4" if lin.role.startswith("expert_") else "fp8"
        assert r.format(lin.name, repair=True) == want == art.layers[lin.name].weight_format, lin.name
        assert r.format(lin.name) == "bf16"
    with pytest.raises(OmniqError, match="leaves every linear layer in BF16"):
        trtllm.declared_formats(ckpt.arch, trtllm.read_declared(ckpt.quantization))


def test_modelopt_raw_fp8_export_flat_and_nested_agree(artifacts):
    ckpt = open_checkpoint(str(artifacts["fp8"]), check_shapes=False)
    decls = decl.read(ckpt.path, ckpt.config)
    assert [d.source for d in decls] == [decl.HF_QUANT_CONFIG, decl.CONFIG_QUANT]
    linears = {lin.name for lin in ckpt.arch.linears if lin.role != "lm_head"}
    readings = [decl.Reading([d], False, frozenset(linears)) for d in decls]
    for lin in ckpt.arch.linears:
        assert {rd.format(lin.name) for rd in readings} == {"bf16" if lin.role == "lm_head" else "fp8"}, lin.name
    assert json.loads((ckpt.path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
