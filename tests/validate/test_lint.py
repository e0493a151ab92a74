"""`omniq lint`: clean artifacts of the bundled model lint clean, and one broken artifact per check is caught
with the right finding id (and nothing else of error severity).

The clean artifacts are written in the layout of ModelOpt's unified export and `omniq quantize` (FP8 /
NVFP4 tensors from `omniq.quant.formats`, which matches ModelOpt's export bit for bit; declarations from the
layer plan in both shapes; omniq.json from the export's own `write_manifest`), so these tests need neither
ModelOpt nor a calibration run. One test reads real ModelOpt exports (the validate tests' session fixture)
to see that lint catches ModelOpt 0.47's own defects in them. Broken artifacts are hard-linked copies of a
clean one with one file rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniq.cli import main
from omniq.export.hf_checkpoint import write_manifest
from omniq.model import omni
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import formats
from omniq.quant.plan import make_plan
from omniq.quant.recipe import load
from omniq.validate.lint import lint
from checkpoint_dir import quantize_linears, write_checkpoint
from reference_configs import manifest_fields

TOWER_TENSORS = {   # a few tower / projector tensors per component, enough for the name checks
    "vision_model.radio_model.model.blocks.0.attn.qkv.weight": (96, 32),
    "vision_model.radio_model.model.blocks.0.norm1.weight": (32,),
    "mlp1.1.weight": (256, 128),
    "sound_encoder.encoder.layers.0.feed_forward1.linear1.weight": (64, 32),
    "sound_projection.linear1.weight": (256, 32),
}


# ----- writing artifacts ---------------------------------------------------------------------------------
def flat(hq: dict) -> dict:
    """config.json's quantization_config from hf_quant_config.json, as ModelOpt's converter writes it."""
    q = hq["quantization"]
    out: dict = {"quant_method": "modelopt", "quant_algo": q["quant_algo"], "ignore": list(q["exclude_modules"]),
                 "producer": hq["producer"]}
    if q.get("quant_algo") == "NVFP4":
        g = q.get("group_size")
        out["config_groups"] = {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": g},
                                            "targets": ["Linear"]}}
    if q.get("quantized_layers"):
        out["quantized_layers"] = q["quantized_layers"]
    if q.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif q.get("kv_cache_quant_algo"):
        out["kv_cache_scheme"] = q["kv_cache_quant_algo"]
    return out


def write_declaration(dest: Path, hq: dict, config: dict) -> None:
    (dest / "hf_quant_config.json").write_text(json.dumps(hq, indent=1))
    (dest / "config.json").write_text(json.dumps(dict(config, quantization_config=flat(hq)), indent=1))


_QUANTIZED: dict = {}   # (source file, tensor, format) -> quantized weight: NVFP4 packing is slow on CPU


def _quantized(src: Path, name: str, w: torch.Tensor, fmt: str):
    key = (str(src), name, fmt)
    if key not in _QUANTIZED:
        _QUANTIZED[key] = formats.fp8_quantize(w) if fmt == "fp8" else formats.nvfp4_quantize(w)
    return _QUANTIZED[key]


def write_artifact(src: Path, dest: Path, recipe: str, kv_cache: str | None = None) -> Path:
    ckpt = open_checkpoint(str(src))
    plan = make_plan(ckpt.arch, load(recipe).with_kv_cache(kv_cache))
    tensors = quantize_linears(ckpt.read(), plan, lambda name: 3.5, lambda name: 6.0,
                               lambda name, w, fmt: _quantized(src, name, w, fmt))
    write_checkpoint(dest, tensors, src)
    write_declaration(dest, plan.hf_quant_config({"name": "modelopt", "version": "0.47.0"}), ckpt.config)
    write_manifest(dest, manifest_fields())
    return dest


def omni_source(tiny: Path, dest: Path) -> Path:
    """A BF16 Nemotron 3 Nano Omni checkpoint around the tiny language model, with small tower tensors."""
    cfg = json.loads((tiny / "config.json").read_text())
    top = {"architectures": ["NemotronH_Nano_Omni_Reasoning_V3"], "model_type": "NemotronH_Nano_Omni_Reasoning_V3",
           "llm_config": cfg, "vision_config": {"hidden_size": 32}, "sound_config": {"model_type": "parakeet"},
           "img_context_token_id": 4, "sound_context_token_id": 5}
    tensors = {omni.LLM_PREFIX + n: t for n, t in load_file(str(tiny / "model.safetensors")).items()}
    g = torch.Generator().manual_seed(0)
    for name, shape in TOWER_TENSORS.items():
        tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return write_checkpoint(dest, tensors, tiny, top)


def _rewrite(path: Path, text: str | None = None, tensors: dict | None = None) -> None:
    """Replace a hard-linked file by a new one (never write through the link into the clean artifact)."""
    path.unlink()
    if tensors is not None:
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        path.write_text(text)


def broken(clean: Path, dest: Path, *, tensors=None, declaration=None, config=None, manifest: bool = True) -> Path:
    """A copy of `clean` with edits: `tensors(dict)`, `declaration(quantization dict)` (applied to both
    hf_quant_config.json and config.json, as an export writes them), `config(config dict)`; omniq.json is
    rewritten afterwards unless `manifest=False`."""
    shutil.copytree(clean, dest, copy_function=os.link)
    if tensors is not None:
        t = load_file(str(dest / "model.safetensors"))
        tensors(t)
        _rewrite(dest / "model.safetensors", tensors=t)
    cfg = json.loads((dest / "config.json").read_text())
    if declaration is not None:
        hq = json.loads((dest / "hf_quant_config.json").read_text())
        declaration(hq["quantization"])
        (dest / "hf_quant_config.json").unlink()
        (dest / "config.json").unlink()
        write_declaration(dest, hq, {k: v for k, v in cfg.items() if k != "quantization_config"})
    if config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        config(cfg)
        _rewrite(dest / "config.json", json.dumps(cfg, indent=1))
    if manifest:
        (dest / "omniq.json").unlink()
        write_manifest(dest, manifest_fields())
    return dest


# ----- fixtures ------------------------------------------------------------------------------------------
CLEAN = {   # name -> (recipe, kv_cache, omni)
    "fp8": ("fp8", None, False),
    "nvfp4": ("nvfp4", None, False),
    "fp8-kv": ("fp8", "fp8", False),
    "mixed": ("omni-nvfp4", None, False),
    "nano3": ("nano3-nvfp4", None, False),
    "omni-fp8": ("omni-fp8", None, True),
    "omni-nvfp4": ("omni-nvfp4", None, True),
}


@pytest.fixture(scope="session")
def clean(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lint-clean")
    omni_src = omni_source(tiny_dir, root / "omni-bf16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # many small tensors: thread hand-offs cost more than they give
    try:
        return {name: write_artifact(omni_src if is_omni else tiny_dir, root / name, recipe, kv)
                for name, (recipe, kv, is_omni) in CLEAN.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def make_broken(clean, tmp_path):
    def make(base: str, **edits) -> Path:
        return broken(clean[base], tmp_path / f"{base}-broken", **edits)

    return make


def ids(findings, severity="error") -> set[str]:
    return {f.id for f in findings if f.severity == severity}


def one(findings, fid):
    hits = [f for f in findings if f.id == fid]
    assert hits, f"no {fid} in {[f.id for f in findings]}"
    return hits[0]


IN_PROJ = "backbone.layers.0.mixer.in_proj"      # Mamba (tiny pattern MEM*EMEM*E)
OUT_PROJ = "backbone.layers.0.mixer.out_proj"
Q_PROJ = "backbone.layers.3.mixer.q_proj"
ROUTER = "backbone.layers.1.mixer.gate.weight"
EXPERT = "backbone.layers.1.mixer.experts.0.up_proj"
K_SCALE = "backbone.layers.3.mixer.k_proj.k_scale"


# ----- clean ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_artifacts_lint_clean(clean, name):
    assert lint(clean[name]) == []
    for engine in ("trtllm", "vllm", "sglang"):
        assert lint(clean[name], engine) == [], engine


def test_bf16_checkpoint_is_only_noted(tiny_dir):
    found = lint(tiny_dir)
    assert [(f.id, f.severity) for f in found] == [("not-quantized", "info")]


# ----- one broken artifact per check --------------------------------------------------------------------
def _set(name, value):
    def edit(t):
        t[name] = value
    return edit


def _drop(name):
    def edit(t):
        del t[name]
    return edit


def _to_fp8(name):
    def edit(t):
        t[name] = t[name].float().clamp(-448, 448).to(torch.float8_e4m3fn)
    return edit


def _unpacked(module):
    def edit(t):
        packed = t[f"{module}.weight"]
        t[f"{module}.weight"] = formats.unpack_e2m1(packed)     # [out, in] codes: one per byte
    return edit


def _nan_block_scale(module):
    def edit(t):
        s = t[f"{module}.weight_scale"].float()
        s[0, 0] = float("nan")
        t[f"{module}.weight_scale"] = s.to(torch.float8_e4m3fn)
    return edit


def _quantize_lm_head(t):
    q = formats.fp8_quantize(t["lm_head.weight"])
    t["lm_head.weight"], t["lm_head.weight_scale"] = q.weight, q.weight_scale
    t["lm_head.input_scale"] = formats.fp8_scale(3.5)


TENSOR_CASES = [   # (case, clean base, tensor edit, the one error id expected)
    ("missing-weight-scale", "fp8", _drop(f"{IN_PROJ}.weight_scale"), "companion-missing"),
    ("missing-input-scale-nvfp4", "nvfp4", _drop(f"{EXPERT}.input_scale"), "companion-missing"),
    ("missing-weight-scale-2", "nvfp4", _drop(f"{EXPERT}.weight_scale_2"), "companion-missing"),
    ("scale-dtype-bf16", "fp8", _set(f"{IN_PROJ}.weight_scale", torch.tensor(0.01, dtype=torch.bfloat16)),
     "companion-dtype"),
    ("nvfp4-block-scale-f32", "nvfp4", lambda t: t.update({f"{EXPERT}.weight_scale":
                                                           t[f"{EXPERT}.weight_scale"].float()}), "companion-dtype"),
    ("scale-per-channel", "fp8", _set(f"{IN_PROJ}.weight_scale", torch.full((648,), 0.01)), "companion-shape"),
    ("nvfp4-unpacked", "nvfp4", _unpacked(EXPERT), "packed-shape"),
    ("input-scale-zero", "fp8", _set(f"{IN_PROJ}.input_scale", torch.tensor(0.0)), "scale-nonpositive"),
    ("input-scale-negative", "fp8", _set(f"{IN_PROJ}.input_scale", torch.tensor(-0.5)), "scale-nonpositive"),
    ("input-scale-nan", "fp8", _set(f"{IN_PROJ}.input_scale", torch.tensor(float("nan"))), "scale-nonfinite"),
    ("block-scale-nan", "nvfp4", _nan_block_scale(EXPERT), "scale-nonfinite"),
    ("k-scale-zero", "fp8-kv", _set(K_SCALE, torch.tensor(0.0)), "scale-nonpositive"),
    ("missing-k-scale", "fp8-kv", _drop(K_SCALE), "kv-scale-missing"),
    ("router-fp8", "fp8", _to_fp8(ROUTER), "router-quantized"),
    ("conv1d-fp8", "fp8", _to_fp8("backbone.layers.0.mixer.conv1d.weight"), "conv1d-quantized"),
    ("norm-fp8", "fp8", _to_fp8("backbone.layers.0.norm.weight"), "norm-quantized"),
    ("embeddings-fp8", "fp8", _to_fp8("backbone.embeddings.weight"), "embedding-quantized"),
    ("A_log-fp8", "fp8", _to_fp8("backbone.layers.0.mixer.A_log"), "quantized-undeclared"),
    ("tower-fp8", "omni-fp8", _to_fp8("mlp1.1.weight"), "tower-quantized"),
    ("scale-on-bf16-layer", "fp8", _set("lm_head.input_scale", torch.tensor(0.01)), "companion-orphan"),
    ("missing-norm-f", "fp8", _drop("backbone.norm_f.weight"), "tensor-missing"),
]


@pytest.mark.parametrize("case,base,edit,expected", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_broken_tensors_are_caught(make_broken, case, base, edit, expected):
    found = lint(make_broken(base, tensors=edit))
    assert ids(found) == {expected}, [(f.id, f.tensor_or_module, f.message) for f in found]


def test_finding_names_the_tensor_and_says_how_to_fix(make_broken):
    f = one(lint(make_broken("fp8", tensors=_set(f"{IN_PROJ}.input_scale", torch.tensor(0.0)))),
            "scale-nonpositive")
    assert f.tensor_or_module == f"{IN_PROJ}.input_scale"
    assert f.severity == "error" and "0.0" in f.message and f.fix


def _append_exclude(name):
    def edit(q):
        q["exclude_modules"].append(name)
    return edit


def _replace_exclude(old, new):
    def edit(q):
        q["exclude_modules"] = [new if e == old else e for e in q["exclude_modules"]]
    return edit


def _set_key(key, value):
    def edit(q):
        q[key] = value
    return edit


def _set_layer(name, entry):
    def edit(q):
        q["quantized_layers"][name] = entry
    return edit


def _drop_layer(name):
    def edit(q):
        del q["quantized_layers"][name]
    return edit


def _drop_towers(q):
    q["exclude_modules"] = [e for e in q["exclude_modules"] if omni.component_of(e) not in omni.TOWER_PREFIXES]


SENTINEL = "lm_head.\u0000backbone.pt_name_sentinel"
DECLARATION_CASES = [   # (case, clean base, edit of the quantization dict, the one error id expected)
    ("group-size-32", "nvfp4", _set_key("group_size", 32), "group-size"),
    ("group-size-missing", "nvfp4", lambda q: q.pop("group_size"), "group-size"),
    ("exclude-typo", "fp8", _append_exclude("backbone.layers.99.mixer.in_proj"), "exclude-unmatched"),
    ("exclude-sentinel", "fp8", _replace_exclude("lm_head", SENTINEL), "exclude-unmatched"),
    ("quantized-but-excluded", "fp8", _append_exclude(OUT_PROJ), "quantized-undeclared"),
    ("quantized-not-in-layer-map", "mixed", _drop_layer(OUT_PROJ), "quantized-undeclared"),
    ("layer-map-typo", "mixed", _set_layer("backbone.layers.99.mixer.in_proj", {"quant_algo": "FP8"}),
     "quantized-layers-unmatched"),
    ("fp8-layer-declared-nvfp4", "mixed", _set_layer(IN_PROJ, {"quant_algo": "NVFP4", "group_size": 16}),
     "format-mismatch"),
    ("bf16-layer-declared-fp8", "mixed", _set_layer(Q_PROJ, {"quant_algo": "FP8"}), "declared-not-stored"),
    ("unknown-algo", "fp8", _set_key("quant_algo", "INT4_AWQ"), "quant-algo-unsupported"),
    ("kv-int8", "fp8-kv", _set_key("kv_cache_quant_algo", "INT8"), "kv-algo-unsupported"),
    ("towers-not-excluded", "omni-fp8", _drop_towers, "tower-not-excluded"),
]


@pytest.mark.parametrize("case,base,edit,expected", DECLARATION_CASES, ids=[c[0] for c in DECLARATION_CASES])
def test_broken_declarations_are_caught(make_broken, case, base, edit, expected):
    found = lint(make_broken(base, declaration=edit))
    assert ids(found) == {expected}, [(f.id, f.tensor_or_module, f.message) for f in found]


def test_sentinel_exclude_is_reported_as_corrupted(make_broken):
    f = one(lint(make_broken("fp8", declaration=_replace_exclude("lm_head", SENTINEL))), "exclude-unmatched")
    assert f.tensor_or_module == repr(SENTINEL)
    assert "corrupted" in f.message and "'lm_head'" in f.fix


def test_exclude_names_in_trtllm_and_omni_spellings_match(make_broken):
    """`model.` (TensorRT-LLM's rewrite) and names without `language_model.` in an Omni checkpoint resolve."""
    found = lint(make_broken("fp8", declaration=_replace_exclude("lm_head", "model.layers.0.mixer.conv1d")))
    assert ids(found) == set()
    found = lint(make_broken("omni-fp8", declaration=_append_exclude("backbone.layers.0.mixer.conv1d")))
    assert ids(found) == set()


def test_nvfp4_declared_but_bf16_stored_is_a_size_error(tiny_dir, clean, tmp_path):
    """An "NVFP4" checkpoint at BF16 size: the BF16 weights under the NVFP4 artifact's declaration."""
    dest = tmp_path / "nvfp4-at-bf16"
    shutil.copytree(tiny_dir, dest)
    for f in ("hf_quant_config.json", "config.json"):
        (dest / f).unlink(missing_ok=True)
        shutil.copyfile(clean["nvfp4"] / f, dest / f)
    found = lint(dest)
    assert ids(found) == {"size-mismatch", "declared-not-stored"}
    f = one(found, "size-mismatch")
    assert "3.5" in f.message or "3.6" in f.message      # BF16 is about 3.5x the NVFP4 bytes


def test_declaration_with_nothing_quantized(tiny_dir, clean, tmp_path):
    dest = tmp_path / "null-algo"
    shutil.copytree(tiny_dir, dest)
    hq = json.loads((clean["fp8"] / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = None
    (dest / "hf_quant_config.json").write_text(json.dumps(hq))
    assert ids(lint(dest)) == {"nothing-quantized"}


def test_quantized_without_declaration(make_broken):
    dest = make_broken("fp8", config=lambda c: c.pop("quantization_config"), manifest=False)
    for f in ("hf_quant_config.json", "omniq.json"):
        (dest / f).unlink()
    assert ids(lint(dest)) == {"no-declaration"}


def test_the_two_declarations_disagree(make_broken):
    def drop_conv1d_from_ignore(cfg):
        cfg["quantization_config"]["ignore"] = cfg["quantization_config"]["ignore"][:-1]

    assert ids(lint(make_broken("fp8", config=drop_conv1d_from_ignore))) == {"declaration-conflict"}


def test_lm_head_quantized_is_an_error_for_every_engine(make_broken):
    dest = make_broken("fp8", tensors=_quantize_lm_head)
    for engine in ("trtllm", "vllm", "sglang"):
        assert ids(lint(dest, engine)) == {"lm-head-quantized"}, engine
    neutral = lint(dest)
    assert ids(neutral) == set() and ids(neutral, "warning") == {"lm-head-quantized"}


def test_nvfp4_kv_cache_is_refused_by_vllm_only(make_broken):
    dest = make_broken("fp8-kv", declaration=_set_key("kv_cache_quant_algo", "NVFP4"))
    assert ids(lint(dest, "trtllm")) == set()
    assert ids(lint(dest, "vllm")) == {"kv-algo-unsupported"}


def test_kv_scales_without_kv_declaration_are_a_warning(make_broken):
    found = lint(make_broken("fp8-kv", declaration=_set_key("kv_cache_quant_algo", None)))
    assert ids(found) == set() and ids(found, "warning") == {"kv-scale-undeclared"}


def test_mamba_ssm_cache_dtype_for_trtllm(make_broken):
    low = make_broken("fp8", config=lambda c: c.update(mamba_ssm_cache_dtype="bfloat16"))
    assert ids(lint(low, "trtllm"), "warning") == {"mamba-ssm-cache-dtype"}
    assert lint(low, "vllm") == []


def test_checksum_mismatch(make_broken):
    dest = make_broken("fp8", tensors=_set(f"{IN_PROJ}.input_scale", torch.tensor(0.02)), manifest=False)
    f = one(lint(dest), "checksum-mismatch")
    assert f.tensor_or_module == "model.safetensors"
    assert ids(lint(dest)) == {"checksum-mismatch"}
    assert ids(lint(dest, checksums=False)) == set()


def test_files_missing_from_or_added_to_the_manifest(make_broken):
    dest = make_broken("fp8", manifest=False)
    (dest / "tokenizer_config.json").unlink()
    (dest / "notes.txt").write_text("added later")
    (dest / "lint.json").write_text("{}")            # a sidecar omniq publish ships: not a finding
    found = lint(dest)
    assert ids(found) == {"checksum-file-missing"}
    assert [f.tensor_or_module for f in found if f.id == "checksum-file-unlisted"] == ["notes.txt"]


def test_unreadable_manifest(make_broken):
    dest = make_broken("fp8", manifest=False)
    _rewrite(dest / "omniq.json", json.dumps({"files": []}))
    assert ids(lint(dest)) == {"manifest-unreadable"}
    _rewrite(dest / "omniq.json", json.dumps(dict(manifest_fields(), files=[])))
    assert "`files` is a list" in one(lint(dest), "manifest-unreadable").message


def test_unexpected_tensor_is_a_warning(make_broken):
    extra = _set("backbone.mtp.0.proj.weight", torch.zeros(4, 4, dtype=torch.bfloat16))
    found = lint(make_broken("fp8", tensors=extra))
    assert ids(found) == set() and ids(found, "warning") == {"tensor-unexpected"}


def test_table_shows_a_few_findings_per_id():
    from rich.console import Console

    from omniq.validate.findings import Finding, table

    many = [Finding("scale-nonpositive", "error", f"backbone.layers.1.mixer.experts.{e}.up_proj.input_scale",
                    "is 0.0", "recalibrate") for e in range(7)]
    console = Console(width=200, record=True)
    console.print(table(many, title="t"))
    text = console.export_text()
    assert text.count("scale-nonpositive") == 6 and "... and 2 more" in text


# ----- real ModelOpt exports -------------------------------------------------------------------------------
def test_raw_modelopt_exports_show_their_known_defect(artifacts):
    """ModelOpt 0.47's own export of the tiny model (the validate tests' session fixture): its tensors,
    scales, KV scales and sizes pass, but every exclude name is corrupted (defect 3, which `omniq quantize`
    repairs). Lint sees exactly that."""
    for name in ("fp8", "nvfp4", "nvfp4-kv"):
        found = lint(artifacts[name], "trtllm")
        assert ids(found) == {"exclude-unmatched"}, (name, [(f.id, f.tensor_or_module) for f in found])
        assert all("corrupted" in f.message for f in found if f.id == "exclude-unmatched")


# ----- CLI -----------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_json(clean, make_broken, capsys):
    assert main(["lint", str(clean["nvfp4"]), "--engine", "trtllm"]) == 0
    assert "0 errors" in capsys.readouterr().out

    bad = make_broken("fp8", tensors=_set(f"{IN_PROJ}.input_scale", torch.tensor(0.0)))
    assert main(["lint", str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["passed"] is False and doc["counts"]["error"] == 1
    assert [(f["id"], f["tensor_or_module"]) for f in doc["findings"]] == [("scale-nonpositive",
                                                                           f"{IN_PROJ}.input_scale")]
    assert set(doc["findings"][0]) == {"id", "severity", "tensor_or_module", "message", "fix"}
    assert "lint: 1 errors" in captured.err

    assert main(["lint", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "scale-nonpositive" in out and "1 errors" in out


def test_cli_warnings_only_exit_0_and_report(make_broken, capsys):
    dest = make_broken("fp8", tensors=_quantize_lm_head)
    report = dest / "lint.json"
    assert main(["lint", str(dest), "--report", str(report)]) == 0
    assert "1 warnings" in capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and [f["id"] for f in doc["findings"]] == ["lm-head-quantized"]
    assert main(["lint", str(dest), "--engine", "trtllm"]) == 1


def test_cli_refuses_unknown_engine_and_non_checkpoints(clean, tmp_path, capsys):
    assert main(["lint", str(clean["fp8"]), "--engine", "tgi"]) == 2
    assert main(["lint", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


# ----- one reading of the declaration ------------------------------------------------------------------------
def _readings(path: Path) -> dict[str, dict[str, str]]:
    """Every linear layer's declared format as validate, lint, build and the model card each read it."""
    from omniq.deploy import trtllm
    from omniq.publish import release as rel
    from omniq.validate.artifact import read_artifact
    from omniq.validate.lint import Seen
    from omniq.validate import declaration as decl_mod

    ckpt = open_checkpoint(str(path), check_shapes=False)
    seen = Seen(ckpt, decl_mod.read(ckpt.path, ckpt.config), None)
    build = trtllm.declared_formats(ckpt.arch, trtllm.read_declared(ckpt.quantization))
    art = read_artifact(path)
    card = rel.declared_formats(rel.open_release(path))
    names = [lin.name for lin in ckpt.arch.linears]
    return {"validate": {n: art.layers[n].weight_format for n in names},
            "lint": {n: seen.declared_format(n) for n in names},
            "build": {n: build[n].lower() for n in names},
            "card": {n: card[n] for n in names}}


@pytest.mark.parametrize("name", ["fp8", "nvfp4", "fp8-kv", "mixed", "nano3", "omni-fp8", "omni-nvfp4"])
def test_validate_lint_build_and_card_read_the_declaration_alike(clean, name):
    """omniq's artifacts (exclude lists with wildcards and Omni spellings; MIXED_PRECISION for mixed / nano3)."""
    r = _readings(clean[name])
    assert r["validate"] == r["lint"] == r["build"] == r["card"], name
    assert r["validate"][f"{open_checkpoint(str(clean[name])).arch.prefix}lm_head"] == "bf16"
    assert len(set(r["validate"].values())) > 1


def test_declaration_spelled_as_tensorrt_llm_reads_alike(make_broken):
    """The mixed artifact's quantized_layers rewritten in TensorRT-LLM's `model.` spelling and its experts
    listed once per layer (`...mixer.experts`, as ModelOpt writes fused experts)."""
    def edit(q):
        out = {}
        for k, v in q["quantized_layers"].items():
            k = k.replace("backbone.", "model.", 1)
            k = k.split(".experts.")[0] + ".experts" if ".experts." in k else k
            out[k] = v
        q["quantized_layers"] = out

    path = make_broken("mixed", declaration=edit)
    assert any(k.endswith(".mixer.experts") for k in json.loads((path / "hf_quant_config.json").read_text())
               ["quantization"]["quantized_layers"])
    r = _readings(path)
    assert r["validate"] == r["lint"] == r["build"] == r["card"]
    assert r["validate"][EXPERT] == "nvfp4" and r["validate"][IN_PROJ] in ("fp8", "nvfp4")
    assert lint(path) == []
