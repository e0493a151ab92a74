"""The streamed quantize's memory estimate and the preflight that refuses before loading anything."""

import json

import pytest

from omniq.model.arch import from_config
from omniq.quant import memory
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan


def _plan(real_config, pattern, recipe="fp8"):
    cfg = dict(real_config, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern))
    return make_plan(from_config(cfg), recipes.load(recipe))


def test_peak_does_not_grow_with_depth(real_config):
    five = memory.streamed_estimate(_plan(real_config, "MEM*E"), samples=16, seq_len=128)
    full = memory.streamed_estimate(_plan(real_config, real_config["hybrid_override_pattern"]), samples=16,
                                    seq_len=128)
    # the real model's largest layer is an MoE layer: 128 experts x 2 x 2688 x 1856 in bf16, 2.55 GB
    assert 2.55e9 < five.layer < 2.6e9 and five.layer == full.layer
    assert abs(full.total - five.total) < 0.05 * five.total     # depth changes only amax and the packed ratio
    whole = memory.weight_bytes(_plan(real_config, real_config["hybrid_override_pattern"]).arch)
    assert full.total < 0.15 * whole


def test_calibration_rows_count(real_config):
    plan = _plan(real_config, "MEM*E")
    a = memory.streamed_estimate(plan, samples=16, seq_len=128)
    b = memory.streamed_estimate(plan, samples=32, seq_len=128)
    assert b.hidden_states - a.hidden_states == 16 * 128 * 2688 * 2


def test_preflight_names_figure_limit_source_and_what_to_pass(real_config, monkeypatch):
    from omniq import memory_limit
    from omniq.errors import OmniqError

    monkeypatch.setattr(memory_limit, "_limit", lambda device="cpu": (4 * 2**30, "cgroup v1 /x/memory.limit_in_bytes"))
    with pytest.raises(OmniqError) as e:
        memory.preflight(_plan(real_config, "MEM*E"), samples=16, seq_len=128)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert "GiB" in msg and "4.00 GiB is available (cgroup v1 /x/memory.limit_in_bytes)" in msg
    assert "use a machine or --device with more memory" in msg
    monkeypatch.setattr(memory_limit, "_limit", lambda device="cpu": (9 * 2**30, "/proc/meminfo MemAvailable"))
    with pytest.raises(OmniqError, match=r"pass --calib-samples \d+ or fewer"):
        memory.preflight(_plan(real_config, "MEM*E"), samples=65536, seq_len=128)
    with pytest.raises(OmniqError, match=r"pass a shorter --calib-seq-len"):
        memory.preflight(_plan(real_config, "MEM*E"), samples=16, seq_len=262144)


def test_cli_refuses_before_loading_anything(tmp_path):
    """Through the CLI: a calibration set whose hidden states alone exceed any machine's memory is refused
    in seconds, exit 2, one line, nothing at --out."""
    import subprocess
    import sys

    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "omniq.cli", "quantize", "tiny", "--recipe", "fp8", "--out", str(out),
                        "--calib-samples", "2000000", "--calib-seq-len", "4096"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantize needs about" in lines[0] and "is available (" in lines[0]
    assert "--calib-samples" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_weight_calibration_adds_its_statistics_to_the_estimate(real_config, monkeypatch):
    """gptq keeps in^2 floats per linear (plus float32 hidden states of every row); the routed experts' (5.5 GB
    for one real-width MoE layer's 256) are gathered a chunk of experts at a time, so all-layer gptq at
    Nemotron 3 Nano's width fits where ModelOpt's own step does; mse needs no statistics and adds nothing."""
    plan = _plan(real_config, "MEM*E", "nvfp4")
    base = memory.streamed_estimate(plan, samples=16, seq_len=128)
    mse = memory.streamed_estimate(plan, samples=16, seq_len=128,
                                   algorithms={lin.name: recipes.Algorithm("mse") for lin in plan.quantized})
    algos = {lin.name: recipes.Algorithm("gptq") for lin in plan.quantized}
    gptq = memory.streamed_estimate(plan, samples=16, seq_len=128, algorithms=algos)
    assert mse.total == base.total and base.weight_calibration == 0
    experts = [lin for lin in plan.arch.linears if lin.layer == 1 and lin.expert is not None]
    stats = sum(4 * lin.in_features ** 2 for lin in experts)
    assert 5.4e9 < stats < 5.5e9                             # the docs' 5.5 GB for one MoE layer's experts
    wc = gptq.weight_calibration_parts
    assert wc.hidden == 2 * 16 * 128 * plan.arch.hidden_size * 4 and wc.layer == 1
    up = next(lin for lin in experts if lin.role == "expert_up")
    down = next(lin for lin in experts if lin.role == "expert_down")
    assert [memory.gptq_expert_chunk(lin.in_features, lin.out_features, a)
            for a in ("gptq", "gptaq") for lin in (up, down)] == [6, 8, 5, 7]
    chunk = 6 * memory.gptq_chunk_bytes(up.in_features, up.out_features, "gptq")
    assert chunk < wc.working < stats / 2
    # the BF16 layer and ModelOpt's packed copy stay the peak; weight calibration's step comes after it
    assert wc.peak < base.layer * base.layer_copies
    assert gptq.total == base.total + wc.hidden < 6 * memory.GiB
    assert gptq.as_dict()["weight_calibration_bytes"] == gptq.weight_calibration == wc.hidden + wc.working
    # every expert at once (a chunk as large as the layer's 128): the layer's statistics come back
    monkeypatch.setattr(memory, "GPTQ_CHUNK_BYTES", 1 << 50)
    monkeypatch.setattr(memory, "GPTQ_EXPERT_CHUNK", 128)
    whole = memory.streamed_estimate(plan, samples=16, seq_len=128, algorithms=algos)
    assert whole.weight_calibration_parts.working > stats
    assert whole.total == whole.weight_calibration_parts.peak + base.hidden_states + wc.hidden + base.overhead


def test_a_model_that_does_not_fit_even_streamed_is_refused_through_the_cli(tmp_path):
    """The process's limit forced to 64 MiB (the tiny model's streamed estimate is about 0.5 GiB with 2 x 32
    calibration tokens, most of it the runtime allowance): `omniq quantize` refuses before loading, exit 2,
    one line with the figure, the limit's source and what to do, nothing at --out and no stage beside it."""
    import subprocess
    import sys

    code = ("import sys\nfrom omniq import memory_limit\n"
            "memory_limit._limit = lambda device='cpu': (64 * 2**20, 'cgroup v2 /fake/memory.max')\n"
            "from omniq.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "outs" / "a"
    p = subprocess.run([sys.executable, "-c", code, "quantize", "tiny", "--recipe", "nvfp4", "--out", str(out),
                        "--calib-samples", "2", "--calib-seq-len", "32"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantize needs about" in lines[0], lines
    assert "0.06 GiB is available (cgroup v2 /fake/memory.max)" in lines[0] and "more memory" in lines[0]
    assert not (tmp_path / "outs").exists() and list(tmp_path.iterdir()) == []


def test_compensation_counts_its_view_autograd_and_streams(real_config, monkeypatch):
    """norm-tweak holds the fitted layer's view (every quantized weight fake-quantized, float32; the rest as
    stored), one batch's autograd state and a reference stream beside the quantized one. At Nemotron 3 Nano's
    width the MoE layer's view alone is about 5 GB, so the preflight refuses it inside 6 GiB (one line)
    instead of letting the kernel kill it mid-run; measured: benchmarks/compensation_memory.py and the
    quantize in benchmarks/results/quantize_realwidth_norm_tweak.json."""
    from omniq.errors import OmniqError

    plan = _plan(real_config, "MEM*E", "nvfp4")
    arch = plan.arch
    h, k, inter, shared = (arch.hidden_size, arch.num_experts_per_tok, arch.moe_intermediate_size,
                           arch.moe_shared_expert_intermediate_size)
    fit = memory.compensation_fit_bytes(plan, 1, rows=8, seq_len=128)
    experts = arch.n_routed_experts * 2 * h * inter + 2 * h * shared          # quantized: float32 in the view
    stored = sum((4 if t.dtype == "F32" else 2) * t.numel for t in arch.tensors if arch.layer_index(t.name) == 1)
    assert fit["view"] == 4 * experts + (stored - 2 * experts) and fit["view"] > 4.5 * memory.GiB   # router F32
    T = 8 * 128                             # one batch of the fit: routed slots, the shared expert, six rows
    assert fit["autograd"] == 4 * T * (k * (2 * h + 2 * inter) + h + 2 * shared + 6 * h)
    mamba = memory.compensation_fit_bytes(plan, 0, rows=8, seq_len=128)
    assert mamba["view"] < fit["view"] / 20 and mamba["autograd"] > fit["autograd"]   # the scan's state
    base = memory.streamed_estimate(plan, samples=16, seq_len=128)
    comp = memory.streamed_estimate(plan, samples=16, seq_len=128, compensation=True)
    wc = comp.weight_calibration_parts
    assert wc.layer == 1 and wc.working == fit["view"] + fit["autograd"]
    assert wc.hidden == 4 * 16 * 128 * h * 4
    assert comp.total == wc.peak + wc.hidden + comp.hidden_states + comp.overhead > 6 * memory.GiB > base.total
    monkeypatch.setattr("omniq.memory_limit.available_bytes", lambda device: 6 * memory.GiB)
    monkeypatch.setattr("omniq.memory_limit.limit_source", lambda device: "test limit")
    memory.preflight(plan, samples=16, seq_len=128)                      # max alone fits
    with pytest.raises(OmniqError, match=r"weight calibration \d+\.\d+ GiB.*only 6.00 GiB"):
        memory.preflight(plan, samples=16, seq_len=128, compensation=True)
