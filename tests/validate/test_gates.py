"""Gates from this model, this run (`omniq.validate.gates`): derived from the noise floor measured on the same
rows, shown side by side with it; honest artifacts pass and the held-back broken ones fail, on the bundled
model (ModelOpt's exports) and on a random non-square NemotronH (omniq's layout); `--gates FILE.yaml`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import broken_cases
import nonsquare
from omniq.cli import main
from omniq.errors import OmniqError
from omniq.validate import gates
from omniq.validate.run import validate

EVAL = {"samples": 8, "seq_len": 128}
SMALL = {"samples": 2, "seq_len": 64}       # the broken cases fail on their layer / KV signals at any size


# ----- from floor to gates -------------------------------------------------------------------------------
def test_gates_scale_with_the_floor_and_overrides_win():
    floor = dict(gates.BUNDLED_FLOOR)
    g = gates.from_floor(floor, "fp8")
    assert g.source == "floor" and g.multiplier == gates.MULTIPLIERS["fp8"] and g.floor["kl_mean"] == 2.43e-4
    assert g.max_kl == pytest.approx(gates.MULTIPLIERS["fp8"] * 2.43e-4, rel=1e-2)
    worse = gates.from_floor(dict(floor, kl_mean=2.43e-3, top1_agreement=0.95, ppl_ratio=1.004), "fp8")
    assert worse.max_kl == pytest.approx(10 * g.max_kl, rel=1e-2)
    assert worse.min_top1 < g.min_top1 and worse.max_ppl_ratio > g.max_ppl_ratio
    # a floor measured on few tokens with no top-1 disagreement still gives a reachable top-1 gate
    lucky = gates.from_floor(dict(floor, top1_agreement=1.0, ppl_ratio=1.0), "fp8")
    assert 0.9 < lucky.min_top1 < 0.99 and lucky.max_ppl_ratio > 1.005
    # the formats are ordered, and mixed (NVFP4 experts only) sits between fp8 and nvfp4
    kl = [gates.from_floor(floor, f).max_kl for f in ("bf16", "fp8", "mixed", "nvfp4")]
    assert kl == sorted(kl)
    o = gates.from_floor(floor, "nvfp4", {"multiplier": 10, "min_top1": 0.5, "source": "team.yaml"})
    assert o.max_kl == pytest.approx(10 * 2.43e-4, rel=1e-2) and o.min_top1 == 0.5
    assert o.source == "floor + team.yaml"
    assert gates.from_floor(None, "fp8").source == "constant"
    with pytest.raises(OmniqError, match="unknown gate override"):
        gates.from_floor(floor, "fp8", {"max_kll": 1})


def test_layer_and_kv_signals():
    g = gates.from_floor(None, "nvfp4")
    lines = gates.check_layers({"a": 20.1, "b": 0.0, "c": 30.0, "d": 12.0}, {"a": "nvfp4", "b": "nvfp4", "c": "fp8",
                                                                         "d": "fp8"}, g)
    assert lines == ["layer b (nvfp4) weight SQNR 0.0 dB < min_layer_sqnr_db 8",
                     "layer d (fp8) weight SQNR 12.0 dB < min_layer_sqnr_db 19"]
    assert gates.check_kv({(3, "k"): 1.0}, {3: {"k": 1.0 / 448}}) == []
    assert "8.0x larger" in gates.check_kv({(3, "k"): 1.0}, {3: {"k": 8.0 / 448}})[0]
    assert "5.0x smaller" in gates.check_kv({(3, "v"): 5.0}, {3: {"v": 1.0 / 448}})[0]


# ----- bundled model, ModelOpt's exports ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def honest_reports(artifacts) -> dict[str, dict]:
    return {name: validate("tiny", artifacts[name], **EVAL) for name in ("fp8", "nvfp4", "nvfp4-kv", "mixed")}


def test_honest_artifacts_pass_gates_from_this_runs_floor(honest_reports):
    floors = set()
    for name, r in honest_reports.items():
        assert r["passed"], (name, r["failures"])
        assert r["gates"]["source"] == "floor" and r["noise_floor"]["tokens"] == r["tokens"]
        floors.add(r["noise_floor"]["kl_mean"])
        assert 0 < r["noise_floor"]["kl_mean"] < r["kl_mean"] < r["gates"]["max_kl"]
        rows = {row["metric"]: row for row in r["gate_table"]["text"]}
        assert rows["kl_mean"]["floor"] == r["noise_floor"]["kl_mean"] and rows["kl_mean"]["value"] == r["kl_mean"]
        assert rows["kl_mean"]["gate"] == r["gates"]["max_kl"] and all(row["passed"] for row in rows.values())
        assert r["layer_failures"] == []
    assert len(floors) == 1                                  # the same rows: the same floor for every candidate
    assert honest_reports["mixed"]["gate_format"] == "mixed"    # NVFP4 only in the routed experts
    assert honest_reports["nvfp4"]["gates"]["max_kl"] > honest_reports["mixed"]["gates"]["max_kl"]


BROKEN = [("fp8", "scales-x4"), ("nvfp4", "scales-x4"), ("fp8", "experts-swapped"), ("nvfp4", "experts-swapped"),
          ("mixed", "experts-swapped"), ("fp8", "expert-transposed"), ("nvfp4", "expert-zeroed"),
          ("mixed", "expert-zeroed"), ("nvfp4-kv", "kv-scale-x8")]


@pytest.mark.parametrize("base,case", BROKEN, ids=[f"{b}-{c}" for b, c in BROKEN])
def test_broken_artifacts_fail_naming_what_broke(artifacts, tmp_path, base, case):
    path = broken_cases.make(artifacts[base], tmp_path / f"{base}-{case}", case)
    r = validate("tiny", path, **SMALL)
    assert not r["passed"], (base, case, r["failures"])
    where = {"scales-x4": ".mixer.in_proj", "experts-swapped": ".experts.", "expert-transposed": ".experts.2.",
             "expert-zeroed": ".experts.2.", "kv-scale-x8": "k_scale"}[case]
    assert any(where in f for f in r["layer_failures"]), r["layer_failures"]


def test_zeroed_expert_fails_even_where_the_aggregate_kl_passes(artifacts, tmp_path):
    """Issue 15's case: NVFP4 with expert 2 zeroed in every MoE layer is within the KL gate; its own
    per-layer SQNR (0 dB) fails it."""
    path = broken_cases.make(artifacts["nvfp4"], tmp_path / "zeroed", "expert-zeroed")
    r = validate("tiny", path, **EVAL)
    assert r["kl_mean"] <= r["gates"]["max_kl"]
    assert not r["passed"] and r["layer_failures"][0].startswith("layer backbone.layers.")
    assert "SQNR 0.0 dB" in r["layer_failures"][0]


# ----- a random non-square NemotronH, omniq's layout -----------------------------------------------------
@pytest.fixture(scope="module")
def nonsquare_artifacts(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonsquare")
    src = nonsquare.make_model(tiny_dir, root / "bf16")
    out = {"bf16": src}
    for name, recipe, kv in (("fp8", "fp8", None), ("nvfp4", "nvfp4", "fp8"), ("mixed", "omni-nvfp4", None)):
        out[name] = nonsquare.quantize(src, root / name, recipe, kv)
    return out


def test_nonsquare_model_honest_pass_broken_fail(nonsquare_artifacts, tmp_path, capsys):
    src = nonsquare_artifacts["bf16"]
    for name in ("fp8", "nvfp4", "mixed"):
        r = validate(src, nonsquare_artifacts[name], **EVAL)
        assert r["passed"], (name, r["failures"])
        # this random model's floor is not the bundled model's, and the gates follow it
        assert r["noise_floor"]["kl_mean"] > 10 * gates.BUNDLED_FLOOR["kl_mean"]
    for base, case in (("fp8", "experts-swapped"), ("nvfp4", "expert-zeroed"), ("mixed", "experts-swapped"),
                       ("nvfp4", "scales-x4"), ("nvfp4", "kv-scale-x8")):
        path = broken_cases.make(nonsquare_artifacts[base], tmp_path / f"{base}-{case}", case)
        assert not validate(src, path, **SMALL)["passed"], (base, case)
    # a transposed expert cannot hide behind a matching shape: refused from the files (exit 2)
    path = broken_cases.make(nonsquare_artifacts["fp8"], tmp_path / "transposed", "expert-transposed")
    assert main(["validate", str(src), str(path), "--samples", "2", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "experts.2.up_proj.weight is stored as [96, 48]" in err and len(err.strip().splitlines()) == 1


# ----- --gates FILE.yaml --------------------------------------------------------------------------------
def test_gates_file_is_applied_per_format_and_modality_and_recorded(artifacts, tmp_path, capsys):
    f = tmp_path / "team.yaml"
    f.write_text("fp8:\n  multiplier: 1000\n  text:\n    max_kl: 1.0e-7\nnvfp4:\n  min_top1: 0.5\n")
    report = tmp_path / "r.json"
    args = ["validate", "tiny", str(artifacts["fp8"]), "--samples", "4", "--seq-len", "64", "--report", str(report)]
    assert main(args + ["--gates", str(f)]) == 1
    out = capsys.readouterr().out
    assert "noise floor" in out and "FAIL" in out
    r = json.loads(report.read_text())
    assert r["gates"]["max_kl"] == 1e-7 and r["gates"]["multiplier"] == 1000
    assert r["gates"]["source"] == "floor + team.yaml" and r["gates_file"]["path"] == str(f)
    assert r["gates_file"]["formats"]["nvfp4"] == {"min_top1": 0.5}
    # the flag wins over the file (the report of the run before replaced: --force)
    assert main(args + ["--gates", str(f), "--max-kl", "1", "--force"]) == 0
    capsys.readouterr()
    # without a floor the gates are the bundled model's constants, said so
    assert main(args + ["--no-noise-floor", "--force"]) == 0
    r = json.loads(report.read_text())
    assert r["gates"]["source"] == "constant" and r["noise_floor"] is None


@pytest.mark.parametrize("text,words", [
    ("fp9:\n  max_kl: 0.1\n", "unknown format 'fp9'"),
    ("fp8:\n  max_kll: 0.1\n", "unknown key fp8.max_kll"),
    ("fp8:\n  text:\n    min_top: 0.9\n", "unknown key fp8.text.min_top"),
    ("fp8:\n  min_top1: 1.5\n", "fp8.min_top1: 1.5 is impossible"),
    ("fp8:\n  image:\n    max_kl: -1\n", "fp8.image.max_kl: -1 is impossible"),
    ("fp8:\n  max_ppl_ratio: 0.9\n", "fp8.max_ppl_ratio: 0.9 is impossible"),
    ("fp8:\n  multiplier: 0\n", "fp8.multiplier: 0 is impossible"),
    ("fp8:\n  max_kl: lots\n", "is not a finite number"),
    ("fp8: [1, 2\n", "not valid YAML"),
])
def test_bad_gates_file_exits_2_before_anything_runs(tmp_path, capsys, text, words):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    report = tmp_path / "r.json"
    assert main(["validate", "tiny", str(tmp_path / "no-such-candidate"), "--gates", str(f),
                 "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not report.exists()
