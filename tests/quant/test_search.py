"""`omniq search`: the exact knapsack against brute force, bad input (exit 2, nothing written), and a small
end-to-end run through the CLI whose recipe `omniq plan` sizes exactly as predicted, reused from the cache."""

import itertools
import json
import random

import pytest
import torch

from omniq.cli import main
from omniq.errors import OmniqError
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import search as srch
from cli_subprocess import run_cli_in_subprocess  # noqa: E402

FAST = ["--samples", "2", "--seq-len", "64", "--calib-samples", "2", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def arch(tiny_dir):
    return open_checkpoint(str(tiny_dir)).arch


def test_groups_cover_every_linear_but_lm_head_once(arch):
    gs = srch.groups(arch)
    names = [lin.name for g in gs for lin in g.linears]
    assert sorted(names) == sorted(lin.name for lin in arch.linears if lin.role != "lm_head")
    assert {g.kind for g in gs} == {"mamba", "attention", "shared_experts", "routed_experts"}
    assert len(gs) == 14


@pytest.mark.parametrize("seed", range(5))
def test_frontier_pick_is_the_brute_force_optimum(arch, seed):
    rng = random.Random(seed)
    gs = srch.groups(arch)[:7]
    fmts = ("nvfp4", "fp8", "bf16")
    sens = {g.name: {"nvfp4": rng.random(), "fp8": rng.random() * 0.3} for g in gs}
    base = 1000
    choices = srch.frontier(gs, sens, fmts, base)
    low, high = srch.size_bounds(gs, fmts, base)
    for budget in [low, (low + high) / 2, low + (high - low) * 0.2, high]:
        best = None
        for picks in itertools.product(fmts, repeat=len(gs)):
            b = base + sum(g.bytes(f) for g, f in zip(gs, picks))
            kl = sum(0.0 if f == "bf16" else sens[g.name][f] for g, f in zip(gs, picks))
            if b <= budget and (best is None or kl < best - 1e-12):
                best = kl
        got = srch.pick(choices, budget)
        assert got.bytes <= budget and got.kl == pytest.approx(best, abs=1e-12)


def test_check_formats():
    assert srch.check_formats(("nvfp4", "bf16", "nvfp4")) == ("nvfp4", "bf16")
    with pytest.raises(OmniqError):
        srch.check_formats(("int4",))


@pytest.mark.parametrize("args, message", [
    (["--budget", "3"], "below the smallest this model reaches"),
    (["--budget", "17"], "above BF16"),
    (["--budget", "8", "--formats", "nvfp4,int8"], "--formats"),
    (["--budget", "8", "--algorithm", "awq"], "--algorithm 'awq' is unknown"),
    (["--budget", "8", "--formats", "fp8", "--algorithm", "four-over-six"], "does not apply"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    rc = main(["search", "tiny", "--out", str(tmp_path / "r.yaml"), *args, *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cache_from_another_model_exits_2(tmp_path, capsys):
    cache = tmp_path / "c.json"
    cache.write_text(json.dumps({"omniq_search_cache": 1, "model_sha256": "0" * 64, "entries": {}}))
    rc = main(["search", "tiny", "--budget", "8", "--out", str(tmp_path / "r.yaml"), "--cache", str(cache), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "measured on another model" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_search_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    rc = main(["search", "tiny", "--budget", "7.2", "--out", str(out), *FAST])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "sensitivities: 28 measured" in stdout
    cache = json.loads((tmp_path / "r.sensitivity.json").read_text())
    (entry,) = cache["entries"].values()
    kl = entry["kl"]
    assert len(kl) == 14 and all(v["nvfp4"] > 0 and v["fp8"] > 0 for v in kl.values())
    assert sum(v["nvfp4"] for v in kl.values()) > 3 * sum(v["fp8"] for v in kl.values())
    # the prediction is the plan's exact size, within the budget
    line = stdout.splitlines()[0]
    predicted = line.split("predicted ")[1].split(" MiB")[0]
    planned = line.split("omniq plan: ")[1].split(" MiB")[0]
    assert predicted == planned
    bpw = float(line.split("omniq plan: ")[1].split("(")[1].split(" bits")[0])
    assert 6.42 < bpw <= 7.2
    rc = main(["plan", "tiny", "--recipe", str(out)])
    plan_out = capsys.readouterr().out
    assert rc == 0 and f"{bpw:.2f} bits per weight" in plan_out
    # again: nothing measured, the cache serves; without --force the recipe is not overwritten
    before = out.read_bytes()
    assert main(["search", "tiny", "--budget", "7.2", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists; pass --force" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == before
    rc = main(["search", "tiny", "--budget", "8.5", "--out", str(out), "--force", *FAST])
    stdout = capsys.readouterr().out
    assert rc == 0 and "sensitivities: 0 measured" in stdout


def test_a_recipe_with_whole_bf16_layers_quantizes(tmp_path, tiny_dir):
    """What `omniq search` writes at mid budgets: BF16 default, some layers with no quantized linear at all.
    The streamed quantize passes those layers through (ModelOpt refuses a one-layer shell none of whose
    modules its config quantizes); their tensors are the source's."""
    from safetensors import safe_open

    from omniq.model.checkpoint import open_checkpoint

    (tmp_path / "r.yaml").write_text("name: sparse\ndefault: bf16\nrules:\n"
                                     "  - modules: ['backbone.layers.1.mixer.experts.*']\n    format: nvfp4\n"
                                     "  - modules: ['backbone.layers.3.mixer.q_proj']\n    format: fp8\n")
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out",
                                 str(tmp_path / "out"), "--calib-samples", "4", "--calib-seq-len", "32"])
    assert run["rc"] == 0, run["stderr"][-2000:]
    name = "backbone.layers.0.mixer.in_proj.weight"
    src = open_checkpoint(str(tiny_dir)).read([name])[name]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(name), src)
        assert "backbone.layers.1.mixer.experts.0.up_proj.weight_scale" in f.keys()
