"""The CLI of `quantize` and `inspect`: instant help, every bad input a one-line error with exit 2 and no
output directory left behind, --out never overwritten without --force, and the inspect summary."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from omniq.cli import main
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan


def test_help_does_not_import_torch():
    from cli_subprocess import cli_imports

    r = cli_imports([["--help"], ["quantize", "--help"], ["inspect", "--help"]],
                    ("torch", "transformers", "modelopt", "datasets"))
    assert r["rcs"] == [0, 0, 0] and r["heavy"] == [] and "--calib-seq-len" in r["stdout"]


# ----- bad input ------------------------------------------------------------------------------------------
def _copy(tiny_dir, dest, *, config=None, tensors=None, link_weights=True):
    dest.mkdir()
    for f in tiny_dir.iterdir():
        if f.name == "model.safetensors" and (tensors is not None or not link_weights):
            continue
        (dest / f.name).symlink_to(f) if f.name != "config.json" else shutil.copyfile(f, dest / f.name)
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _tiny_config(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def _with_bad_value(tiny_dir, name, value):
    t = load_file(str(tiny_dir / "model.safetensors"))
    t[name] = t[name].clone()
    t[name].view(-1)[7] = value
    return t


CASES = {
    "missing directory": (lambda d, tmp: str(tmp / "no-such-dir"), [], "no such directory"),
    "no safetensors": (lambda d, tmp: _only_config(d, tmp), [], "no *.safetensors"),
    "pickle only": (lambda d, tmp: _pickle_only(d, tmp), [], "--allow-pickle"),
    "unsupported architecture": (lambda d, tmp: _copy(d, tmp / "llama", config={
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256}), [],
        "unsupported architecture 'LlamaForCausalLM'"),
    "already quantized": (lambda d, tmp: _copy(d, tmp / "q", config=dict(
        _tiny_config(d), quantization_config={"quant_method": "modelopt", "quant_algo": "FP8"})), [],
        "already quantized (FP8)"),
    "config and tensors mismatch": (lambda d, tmp: _copy(d, tmp / "mm", config=dict(
        _tiny_config(d), moe_intermediate_size=128)), [], "config and weights do not match"),
    "NaN weights": (lambda d, tmp: _copy(d, tmp / "nan", tensors=_with_bad_value(
        d, "backbone.layers.4.mixer.experts.5.up_proj.weight", float("nan"))), ["--calib", "tiny-calib"],
        "backbone.layers.4.mixer.experts.5.up_proj.weight contains NaN"),
    "inf weights": (lambda d, tmp: _copy(d, tmp / "inf", tensors=_with_bad_value(
        d, "backbone.layers.0.mixer.in_proj.weight", float("inf"))), ["--calib", "tiny-calib"],
        "backbone.layers.0.mixer.in_proj.weight contains inf"),
    "empty calibration file": (lambda d, tmp: "tiny", ["--calib", "EMPTY"], "no text found"),
    "unreadable calibration file": (lambda d, tmp: "tiny", ["--calib", "BADPARQUET"], "cannot read it as .parquet"),
    "too little calibration text": (lambda d, tmp: "tiny", ["--calib", "SHORT"], "needs 16384"),
    "unknown recipe": (lambda d, tmp: "tiny", ["--recipe", "int3"], "unknown recipe 'int3'"),
    "bad kv cache": (lambda d, tmp: "tiny", ["--kv-cache", "fp4"], "--kv-cache 'fp4'"),
    # an Omni checkpoint whose towers omniq cannot run: the default multimodal calibration says what to do
    "omni checkpoint, towers omniq cannot run": (lambda d, tmp: _omni(d, tmp), [], "--calib-mix text:1"),
    "image calibration of a text-only model": (lambda d, tmp: "tiny", ["--calib-mix", "text:0.5,image:0.5"],
                                               "text-only NemotronH"),
    "bad calibration mix": (lambda d, tmp: "tiny", ["--calib-mix", "video:1"], "--calib-mix 'video:1'"),
}


def _only_config(tiny_dir, tmp):
    d = tmp / "cfg-only"
    d.mkdir()
    shutil.copyfile(tiny_dir / "config.json", d / "config.json")
    return d


def _pickle_only(tiny_dir, tmp):
    d = _only_config(tiny_dir, tmp)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    return d


def _omni(tiny_dir, tmp):
    from reference_configs import omni_config

    d = tmp / "omni"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(omni_config(_tiny_config(tiny_dir))))
    t = {f"language_model.{k}": v for k, v in load_file(str(tiny_dir / "model.safetensors")).items()}
    save_file(t, str(d / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, d / name)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_no_output(case, tiny_dir, tmp_path, capsys):
    make_model, extra, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "empty.txt").write_text("\n\n")
    (work / "bad.parquet").write_bytes(b"PAR1 garbage")
    (work / "short.txt").write_text("A single short paragraph.")
    model = make_model(tiny_dir, work)
    extra = [{"EMPTY": str(work / "empty.txt"), "BADPARQUET": str(work / "bad.parquet"),
              "SHORT": str(work / "short.txt")}.get(a, a) for a in extra]
    args = ["quantize", str(model), "--recipe", "fp8", "--out", str(tmp_path / "out" / "art"), *extra]
    if "--recipe" in extra:   # the case's own recipe replaces the default one
        args = ["quantize", str(model), "--out", str(tmp_path / "out" / "art"), *extra]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omniq: error: "), err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_existing_out_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "tiny", "--recipe", "fp8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_out_cannot_be_the_source(tiny_dir, tmp_path, capsys):
    src = _copy(tiny_dir, tmp_path / "src")
    assert main(["quantize", str(src), "--recipe", "fp8", "--out", str(src), "--force"]) == 2
    assert "would replace the source" in capsys.readouterr().err
    assert (src / "config.json").is_file()


USAGE_ERRORS = {
    "unknown option": (["quantize", "tiny", "--recipe", "fp8", "--out", "OUT", "--bogus"], "No such option: --bogus"),
    "missing argument": (["quantize", "--recipe", "fp8", "--out", "OUT"], "Missing argument"),
    "bad option value": (["quantize", "tiny", "--recipe", "fp8", "--out", "OUT", "--calib-samples", "many"],
                         "Invalid value for '--calib-samples'"),
    "option below its minimum": (["validate", "tiny", "OUT", "--samples", "0"], "Invalid value for '--samples'"),
    "option without its value": (["plan", "tiny", "--recipe"], "requires an argument"),
    "unknown command": (["quantise", "tiny"], "No such command"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2_through_the_real_cli(case, tmp_path):
    """Typer's own usage errors, through `python -m omniq.cli` as a user runs it: one line, exit 2, no
    traceback, no usage block on stdout, nothing written."""
    args, message = USAGE_ERRORS[case]
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in args]
    p = subprocess.run([sys.executable, "-m", "omniq.cli", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omniq: error: "), p.stderr
    assert message in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert p.stdout.strip() == ""
    assert not out.exists()


def test_bare_omniq_shows_the_help_and_exits_2():
    p = subprocess.run([sys.executable, "-m", "omniq.cli"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "quantize" in p.stdout + p.stderr


# ----- inspect --------------------------------------------------------------------------------------------
def test_inspect_summarizes_the_architecture(capsys, tiny_dir):
    assert main(["inspect", "tiny", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    arch = open_checkpoint(str(tiny_dir)).arch
    m = s["model"]
    assert m["pattern"] == "MEM*EMEM*E" and m["kinds"] == {"mamba": [0, 2, 5, 7], "moe": [1, 4, 6, 9],
                                                           "attention": [3, 8]}
    assert m["params"] == arch.num_params == sum(m["params_by_component"].values())
    assert set(m["params_by_component"]) == {"mamba", "attention", "routed_experts", "shared_experts", "router",
                                             "embeddings", "lm_head", "norms"}
    assert m["params_by_component"]["routed_experts"] == 4 * 16 * 2 * 256 * 256
    assert "plan" not in s and s["quantization"] is None


def test_inspect_with_recipe_groups_formats_and_estimates_size(capsys, tiny_dir):
    assert main(["inspect", "tiny", "--recipe", "nano3-nvfp4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    plan = make_plan(open_checkpoint(str(tiny_dir)).arch, recipes.load("nano3-nvfp4"))
    p = s["plan"]
    assert p["estimated_bytes"] == plan.total_bytes and p["quant_algo"] == "NVFP4" and p["kv_cache"] == "fp8"
    assert {fmt: sum(g["count"] for g in groups) for fmt, groups in p["groups"].items()} == \
        {f: n for f, n in plan.counts.items() if n}
    bf16 = [g["modules"] for g in p["groups"]["bf16"]]
    assert "backbone.layers.{3,8}.mixer.{q_proj,k_proj,v_proj,o_proj}" in bf16
    assert "backbone.layers.{2,7}.mixer.{in_proj,out_proj}" in bf16 and "lm_head" in bf16
    assert main(["inspect", "tiny", "--recipe", "nano3-nvfp4"]) == 0
    text = capsys.readouterr().out
    assert "estimated output" in text and "routed experts" in text and "MEM*EMEM*E" in text


def test_inspect_reports_an_already_quantized_checkpoint(quantized, capsys):
    assert main(["inspect", str(quantized["fp8"]["path"]), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None}


def test_quantize_refuses_its_own_output(quantized, tmp_path, capsys):
    src = quantized["mixed-kv"]["path"]
    assert main(["quantize", str(src), "--recipe", "fp8", "--out", str(tmp_path / "x")]) == 2
    assert "already quantized (MIXED_PRECISION)" in capsys.readouterr().err


def test_allow_pickle_converts_a_weights_only_pickle_and_quantizes(tiny_dir, tmp_path):
    """--allow-pickle: the state dict is loaded with torch.load(weights_only=True), turned into safetensors in a
    temporary directory, and quantized like any checkpoint; a pickle of arbitrary objects is still refused."""
    import fractions
    import subprocess
    import sys

    import torch

    src = _only_config(tiny_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, src / name)
    torch.save(load_file(str(tiny_dir / "model.safetensors")), str(src / "pytorch_model.bin"))
    cmd = [sys.executable, "-m", "omniq.cli", "quantize", str(src), "--recipe", "fp8", "--calib", "tiny-calib",
           "--calib-samples", "16",
           "--calib-seq-len", "128"]
    p = subprocess.run([*cmd, "--out", str(tmp_path / "fp8"), "--allow-pickle"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "fp8" / "model.safetensors").exists() or list((tmp_path / "fp8").glob("*.safetensors"))

    torch.save({"x": fractions.Fraction(1, 3)}, str(src / "pytorch_model.bin"))  # a global weights_only refuses
    p = subprocess.run([*cmd, "--out", str(tmp_path / "bad"), "--allow-pickle"], capture_output=True, text=True)
    assert p.returncode == 2 and "weights-only pickle" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
