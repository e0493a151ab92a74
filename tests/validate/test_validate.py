"""`omniq validate` on real ModelOpt artifacts of the bundled model: good ones pass the default gates,
broken ones fail them (exit 1), another model is refused (exit 2), and the artifact is read exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from omniq.cli import main
from omniq.errors import OmniqError
from omniq.quant import formats
from omniq.validate import gates
from omniq.validate.artifact import read_artifact
from omniq.validate.run import validate

import golden

# Small evaluation for tests: 8 rows of 128 tokens of the held-out "eval" text.
EVAL = {"samples": 8, "seq_len": 128}
REPORT_KEYS = {"kl_mean", "kl_p95", "top1_agreement", "ppl_reference", "ppl_candidate", "ppl_ratio", "tokens",
               "passed"}


@pytest.fixture(scope="module")
def reference():
    return read_artifact("tiny")


def test_reader_finds_each_layers_format_and_rebuilds_the_export_bit_for_bit(artifacts, reference):
    """Re-quantizing the reference's BF16 weights with omniq's arithmetic gives the exported bytes."""
    from safetensors.torch import load_file

    for name, fmt in (("fp8", "fp8"), ("nvfp4", "nvfp4")):
        art = read_artifact(artifacts[name])
        assert art.format == fmt and art.kv_cache is None
        linears = [lin.name for lin in reference.arch.linears]
        assert {art.layers[n].weight_format for n in linears if "lm_head" not in n} == {fmt}
        assert art.layers["lm_head"].weight_format == "bf16"
        assert all(art.layers[n].activation == fmt and art.layers[n].input_scale is not None
                   for n in linears if "lm_head" not in n)
        raw = load_file(str(artifacts[name] / "model.safetensors"))
        bf16 = reference.checkpoint.read([f"{n}.weight" for n in linears])
        for n in linears[:-1]:
            w = bf16[f"{n}.weight"]
            if fmt == "fp8":
                q = formats.fp8_quantize(w)
                assert torch.equal(q.weight.view(torch.uint8), raw[f"{n}.weight"].view(torch.uint8)), n
                assert q.weight_scale.item() == raw[f"{n}.weight_scale"].item(), n
            else:
                q = formats.nvfp4_quantize(w, raw[f"{n}.weight_scale_2"])
                assert torch.equal(q.weight, raw[f"{n}.weight"]), n
                assert torch.equal(q.weight_scale.view(torch.uint8), raw[f"{n}.weight_scale"].view(torch.uint8)), n
                assert torch.equal(art.weights[f"{n}.weight"], q.dequantize()), n


def test_fp8_and_nvfp4_artifacts_pass_the_default_gates(artifacts, tmp_path):
    """... and the layer-streamed validate reproduces today's whole-model reports field for field."""
    results = {}
    for name in ("fp8", "nvfp4", "nvfp4-kv", "mixed"):
        report_path = tmp_path / f"{name}.json"
        r = validate("tiny", artifacts[name], report_path=report_path, **EVAL)
        on_disk = json.loads(report_path.read_text())
        assert REPORT_KEYS <= set(on_disk) and on_disk["passed"] == r["passed"]
        assert r["passed"], (name, r["failures"])
        assert r["tokens"] == EVAL["samples"] * EVAL["seq_len"]
        assert r["format"] == name.split("-")[0]
        assert r["gates"]["source"] == "floor" and r["noise_floor"]["tokens"] == r["tokens"]
        assert r["kv_cache"] == ("fp8" if name.endswith("-kv") else None)
        golden.check(name, name, r, artifacts[name])
        results[name] = r
    # the comparison sees quantization: NVFP4 is measurably further from the reference than FP8
    assert 0 < results["fp8"]["kl_mean"] < results["nvfp4"]["kl_mean"]
    assert results["fp8"]["top1_agreement"] > results["nvfp4"]["top1_agreement"]
    sq8 = sorted(results["fp8"]["layers_sqnr"].values())
    sq4 = sorted(results["nvfp4"]["layers_sqnr"].values())
    assert sq8[len(sq8) // 2] > 30 and sq4[-1] < 23      # E4M3 ~31 dB, E2M1 with 16-blocks ~20 dB
    assert sq8[0] > 26                                   # k_proj re-rounded to the fused QKV scale: ~28 dB
    # the router the export rounded to BF16 is reported, not hidden
    assert any(".gate.weight" in n for n in results["fp8"]["unquantized_changed"])


def test_mixed_precision_layers_are_read_per_layer(artifacts):
    """NVFP4 routed experts + FP8 elsewhere: ModelOpt declares the experts once per fused module and corrupts
    every quantized_layers name with its sentinel; the reader still maps each tensor to its declared format."""
    art = read_artifact(artifacts["mixed"])
    assert art.format == "mixed"
    for lin in art.arch.linears:
        layer = art.layers[lin.name]
        want = "bf16" if lin.role == "lm_head" else "nvfp4" if lin.role.startswith("expert_") else "fp8"
        assert (layer.weight_format, layer.activation or "bf16") == (want, want), lin.name
    assert any("quantized_layers has" in w and "corrupted" in w for w in art.warnings)


def test_weight_scales_times_four_fail_through_the_cli(broken_scales, tmp_path):
    report = tmp_path / "broken.json"
    proc = subprocess.run([sys.executable, "-m", "omniq.cli", "validate", "tiny", str(broken_scales),
                           "--samples", str(EVAL["samples"]), "--seq-len", str(EVAL["seq_len"]),
                           "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("omniq: error: validate: kl_mean") and len(proc.stderr.strip().splitlines()) == 1
    assert "FAIL" in proc.stdout                                  # the summary table marks the failed gates
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["failures"]
    assert data["kl_mean"] > gates.DEFAULTS["fp8"].max_kl
    # the per-layer SQNR points at the broken layers
    worst = sorted(data["layers_sqnr"], key=lambda n: data["layers_sqnr"][n])[:4]
    assert all(n.endswith("mixer.in_proj") for n in worst)


def test_swapped_experts_fail_the_default_gates(swapped_experts):
    r = validate("tiny", swapped_experts, **EVAL)
    assert not r["passed"]
    assert r["kl_mean"] > gates.DEFAULTS["fp8"].max_kl


def test_passing_artifact_exits_0_and_overrides_apply(artifacts, capsys):
    args = ["validate", "tiny", str(artifacts["fp8"]), "--samples", "4", "--seq-len", "64"]
    assert main(args) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    # a gate the FP8 artifact cannot meet: it fails with exit 1
    assert main(args + ["--max-kl", "1e-7"]) == 1


def test_another_model_is_refused_with_exit_2(other_model, other_tokenizer, misdeclared, capsys):
    for cand, words in ((other_model, "config differs"), (other_tokenizer, "tokenizer"),
                        (misdeclared, "declares FP8")):
        code = main(["validate", "tiny", str(cand), "--samples", "2", "--seq-len", "32"])
        err = capsys.readouterr().err
        assert code == 2, (cand, err)
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_reference_and_candidate_swapped_is_refused(artifacts):
    with pytest.raises(OmniqError, match="reference is quantized"):
        validate(artifacts["fp8"], "tiny", samples=2, seq_len=32)


def test_position_buckets(artifacts):
    r = validate("tiny", artifacts["nvfp4"], samples=2, seq_len=160, positions=True)
    golden.check("nvfp4-positions", "nvfp4", r, artifacts["nvfp4"])
    assert set(r["positions"]) == {"0-128", "128-512"}
    assert sum(b["tokens"] for b in r["positions"].values()) == r["tokens"] == 320
