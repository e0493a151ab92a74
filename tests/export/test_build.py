"""`omniq build`: compatibility decisions (real Nemotron 3 Nano 30B-A3B numbers), golden options and commands
per target x recipe, every refusal (exit 2, nothing written), and bundles end to end on small checkpoints.

Regenerate the golden files after an intended change with `OMNIQ_REGEN_GOLDEN=1 pytest tests/export`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from build_fixtures import quantized, tiny_config, tiny_omni_config, tower_weights  # noqa: F401  (fixtures)
from omniq.cli import main
from omniq.errors import OmniqError
from omniq.deploy import gpu_memory, trtllm
from omniq.gpus import GPUS, resolve_gpu
from omniq.model.arch import from_config
from omniq.model.checkpoint import arch_of
from omniq.quant.plan import make_plan
from omniq.quant.recipe import load

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden" / "build"
REGEN = os.environ.get("OMNIQ_REGEN_GOLDEN") == "1"
GIB = 2**30
OMNI_TOWERS_BYTES = int(2.7 * GIB)      # published: BF16 release 61.5 GiB, language model alone 58.8 GiB


def check_golden(case: str, files: dict[str, str]) -> None:
    d = GOLDEN / case
    if REGEN:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)
        return
    for name, text in files.items():
        p = d / name
        assert p.is_file(), f"missing golden {p}; create it with OMNIQ_REGEN_GOLDEN=1"
        assert text == p.read_text(), f"{case}/{name} differs from the golden file; if intended, regenerate " \
                                      "with OMNIQ_REGEN_GOLDEN=1 and review the diff"


# ----- the real model, no weights ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(real_config, omni_config_dir):
    """(text arch, omni arch) of the published 30B-A3B config."""
    text = from_config({k: v for k, v in real_config.items() if k != "_comment"})
    omni_arch, is_omni = arch_of(json.loads((omni_config_dir / "config.json").read_text()))
    assert is_omni and omni_arch.prefix == "language_model."
    return text, omni_arch


def deploy(arch, recipe: str, gpu: str, *, kv: str | None = None, towers: int = 0, omni: bool = False,
           **request) -> trtllm.Deployment:
    plan = make_plan(arch, load(recipe).with_kv_cache(kv))
    declared = trtllm.read_declared(plan.hf_quant_config())
    weights = gpu_memory.weight_bytes_from_plan(plan, extra_replicated=towers)
    return trtllm.decide(arch, declared, weights, trtllm.Request(resolve_gpu(gpu), **request),
                         max_position_embeddings=262144, is_omni=omni)


REAL_CASES = {
    # case: (recipe, kv override, gpu, omni, request)
    "fp8-kvfp8_hopper": ("fp8", "fp8", "hopper", False, {}),
    "fp8_b200_trtllm-1.2.1": ("fp8", None, "b200", False, {"trtllm_version": "1.2.1"}),
    "nano3-nvfp4_sm100_tp2-ep2": ("nano3-nvfp4", None, "sm100", False, {"tp": 2, "ep": 2}),
    "nano3-nvfp4_hopper_w4a16": ("nano3-nvfp4", None, "hopper", False, {"trtllm_version": "1.3.0rc18"}),
    "omni-fp8_h200_tp2-ep1": ("omni-fp8", None, "h200", True, {"tp": 2, "ep": 1, "max_batch": 128}),
    "omni-nvfp4_sm120": ("omni-nvfp4", None, "sm120", True, {"max_seq_len": 131072, "max_batch": 16}),
}


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_golden_options_and_commands_real_model(case, real):
    recipe, kv, gpu, omni, request = REAL_CASES[case]
    dep = deploy(real[1] if omni else real[0], recipe, gpu, kv=kv, towers=OMNI_TOWERS_BYTES if omni else 0,
                 omni=omni, **request)
    files = {"llm_api_options.yaml": trtllm.options_yaml(dep), "serve.sh": trtllm.serve_script(dep),
             "bench.sh": trtllm.bench_script(dep)}
    check_golden(case, files)
    opts = yaml.safe_load(files["llm_api_options.yaml"])
    assert opts == trtllm.llm_api_options(dep)
    assert opts["kv_cache_config"]["enable_block_reuse"] is False
    assert opts["kv_cache_config"]["mamba_ssm_cache_dtype"] == "float32"
    assert opts["cuda_graph_config"]["batch_sizes"][-1] == dep.max_batch
    assert "piecewise" not in files["llm_api_options.yaml"] and "torch_compile" not in files["llm_api_options.yaml"]


def test_golden_decisions_are_the_documented_ones(real):
    text, omni = real
    assert deploy(text, "fp8", "hopper", kv="fp8").moe_backend == "CUTLASS"
    nv_b200 = deploy(text, "nano3-nvfp4", "sm100", tp=2, ep=2)
    assert (nv_b200.moe_backend, nv_b200.kv_cache_dtype, nv_b200.w4a16_fallback) == ("TRTLLM", "fp8", False)
    hop = deploy(text, "nano3-nvfp4", "hopper", trtllm_version="1.3.0rc18")
    assert hop.moe_backend == "MARLIN" and hop.w4a16_fallback and hop.min_version == "1.3.0rc18"
    # nano3-nvfp4 has NVFP4 Mamba / shared-expert layers: dense Marlin GEMMs too; omni-nvfp4 has NVFP4 experts only
    assert trtllm.llm_api_options(hop)["nvfp4_gemm_config"] == {"allowed_backends": ["marlin"]}
    omni_hop = deploy(omni, "omni-nvfp4", "hopper", omni=True)
    assert omni_hop.moe_backend == "MARLIN" and "nvfp4_gemm_config" not in trtllm.llm_api_options(omni_hop)
    sm120 = deploy(omni, "omni-nvfp4", "sm120", omni=True, towers=OMNI_TOWERS_BYTES)
    assert sm120.moe_backend == "CUTLASS" and sm120.quant_algo == "MIXED_PRECISION"
    assert sm120.layer_groups["routed_experts"] == {"NVFP4": 23 * 128 * 2}
    assert sm120.layer_groups["attention"] == {"BF16": 18, "FP8": 6}
    assert trtllm.llm_api_options(sm120)["trust_remote_code"] is True
    old = deploy(text, "fp8", "b200", trtllm_version="1.2.1")
    assert not old.chunked_prefill and old.max_num_tokens == old.max_seq_len == 32768


@pytest.mark.parametrize("gpu,algo,version,tp,ep,backend", [
    ("b200", "NVFP4", "1.3.0rc27", 1, 1, "TRTLLM"),
    ("b300", "NVFP4", "1.3.0rc27", 1, 1, "TRTLLM"),
    ("gb200", "NVFP4", "1.3.0rc27", 2, 1, "TRTLLM"),
    ("b200", "NVFP4", "1.3.0rc5", 2, 1, "CUTLASS"),      # TRTLLM MoE tensor parallelism for NemotronH: rc7
    ("b200", "NVFP4", "1.3.0rc5", 2, 2, "TRTLLM"),       # no MoE tensor parallelism needed
    ("b200", "FP8", "1.3.0rc27", 1, 1, "CUTLASS"),
    ("h100", "NVFP4", "1.3.0rc18", 1, 1, "MARLIN"),
    ("h200", "FP8", "1.3.0rc27", 1, 1, "CUTLASS"),
    ("rtx-pro-6000", "NVFP4", "1.3.0rc27", 1, 1, "CUTLASS"),
    ("gb10", "NVFP4", "1.3.0rc27", 1, 1, "CUTLASS"),
])
def test_moe_backend_per_target_and_format(gpu, algo, version, tp, ep, backend):
    chosen, reason, notes = trtllm.choose_moe_backend(resolve_gpu(gpu), algo, trtllm.parse_version(version), tp // ep)
    assert chosen == backend and reason
    assert bool(notes) == (gpu == "b200" and version == "1.3.0rc5" and tp != ep)


# ----- memory model with the real model's numbers ---------------------------------------------------------------
def test_memory_terms_of_the_real_model(real):
    text, _ = real
    # 6 attention layers x (K, V) x 2 KV heads x head_dim 128
    assert gpu_memory.kv_bytes_per_token(text, "fp8") == 6 * 2 * 2 * 128
    assert gpu_memory.kv_bytes_per_token(text, "bf16") == 2 * 6 * 2 * 2 * 128
    # 23 Mamba layers x (conv state 6144 x 3 in bf16 + SSM state 64 heads x 64 x 128 in fp32)
    assert gpu_memory.mamba_state_bytes_per_sequence(text) == 23 * (6144 * 3 * 2 + 64 * 64 * 128 * 4)


def test_weight_bytes_from_plan_match_published_sizes(real):
    text, omni = real
    # published-recipes.md: Omni FP8 language model 30.09 GiB, text NVFP4 18.01 GiB, Omni NVFP4 LM 18.19 GiB
    for arch, recipe, gib in ((omni, "omni-fp8", 30.09), (text, "nano3-nvfp4", 18.01), (omni, "omni-nvfp4", 18.19)):
        w = gpu_memory.weight_bytes_from_plan(make_plan(arch, load(recipe)))
        assert abs(w.total / GIB - gib) < 0.01, (recipe, w.total / GIB)
        assert w.sharded > 10 * w.replicated          # linear layers dominate; embeddings etc. stay whole


def test_memory_refusal_real_omni_fp8_on_one_h100(real):
    _, omni = real
    with pytest.raises(OmniqError, match=r"does not fit: .* H100 SXM 80GB has 80.0 GiB"):
        deploy(omni, "omni-fp8", "h100", omni=True, towers=OMNI_TOWERS_BYTES, max_batch=256, max_seq_len=262144)
    # the same model fits one H100 at a modest batch, and the big request fits two B300s
    small = deploy(omni, "omni-fp8", "h100", omni=True, towers=OMNI_TOWERS_BYTES, max_batch=8, max_seq_len=32768)
    assert small.memory.fits and 32 < small.memory.weights / GIB < 33.5     # published 32.8 GiB with towers
    big = deploy(omni, "omni-fp8", "b300", omni=True, towers=OMNI_TOWERS_BYTES, max_batch=256, max_seq_len=262144,
                 tp=2)
    assert big.memory.fits and big.memory.kv_cache == 6 * 2 * 2 * 128 * 262144 * 256 // 2


def test_memory_scales_with_tp_and_kv_dtype(real):
    text, _ = real
    one = deploy(text, "fp8", "h200", kv="fp8", max_batch=32, max_seq_len=65536)
    two = deploy(text, "fp8", "h200", kv="fp8", max_batch=32, max_seq_len=65536, tp=2)
    bf16_kv = deploy(text, "fp8", "h200", max_batch=32, max_seq_len=65536)
    assert two.memory.kv_cache * 2 == one.memory.kv_cache and two.memory.mamba_state * 2 == one.memory.mamba_state
    assert two.memory.weights < one.memory.weights
    assert bf16_kv.memory.kv_cache == 2 * one.memory.kv_cache


# ----- refusals (pure) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,ok", [("1.2.1", False), ("1.2.0", False), ("1.3.0rc17", False),
                                        ("1.3.0rc18", True), ("1.3.0", True), ("1.4.0rc4", True)])
def test_nvfp4_on_hopper_depends_on_the_release(real, version, ok):
    if ok:
        dep = deploy(real[0], "nano3-nvfp4", "hopper", trtllm_version=version)
        assert dep.w4a16_fallback and dep.moe_backend == "MARLIN" and any("W4A16" in w for w in dep.warnings)
    else:
        with pytest.raises(OmniqError, match="NVFP4 on Hopper fails in TensorRT-LLM .*1.3.0rc18"):
            deploy(real[0], "nano3-nvfp4", "hopper", trtllm_version=version)


@pytest.mark.parametrize("gpu", ["sm80", "a100", "sm86", "a10", "a6000"])
def test_fp8_needs_sm89(real, gpu):
    with pytest.raises(OmniqError, match="no FP8 tensor cores; FP8 needs sm89"):
        deploy(real[0], "fp8", gpu)


def test_fp8_on_ada_is_allowed_with_a_warning_and_nvfp4_is_not(real):
    dep = deploy(real[0], "fp8", "l40s", max_batch=4, max_seq_len=8192)
    assert dep.moe_backend == "CUTLASS" and any("outside TensorRT-LLM's NemotronH support matrix" in w
                                                for w in dep.warnings)
    with pytest.raises(OmniqError, match="cannot run NVFP4"):
        deploy(real[0], "nano3-nvfp4", "l40s")


@pytest.mark.parametrize("tp,message", [(3, "tensor parallel sizes 1, 2, 4, 8"), (16, "tensor parallel sizes"),
                                        (4, "2 KV heads, not divisible by 4"), (8, "2 KV heads")])
def test_tensor_parallel_refusals_real_model(real, tp, message):
    with pytest.raises(OmniqError, match=message):
        deploy(real[0], "fp8", "h100", tp=tp)


def _custom_arch(**overrides):
    cfg = {k: v for k, v in json.loads((REPO / "tests/data/nemotron-3-nano-30b-a3b.config.json").read_text()).items()
           if k != "_comment"}
    return from_config(dict(cfg, **overrides))


def test_tensor_parallel_must_divide_attention_and_mamba_heads():
    with pytest.raises(OmniqError, match="12 attention heads, not divisible by 8"):
        deploy(_custom_arch(num_attention_heads=12, num_key_value_heads=4), "fp8", "h100", tp=8)
    with pytest.raises(OmniqError, match="12 Mamba heads, not divisible by 8"):
        deploy(_custom_arch(num_key_value_heads=8, mamba_num_heads=12), "fp8", "h100", tp=8)


def test_expert_parallel_refusals():
    arch = _custom_arch(num_key_value_heads=8, n_routed_experts=6, num_experts_per_tok=2)
    with pytest.raises(OmniqError, match="6 routed experts, not divisible by 4"):
        deploy(arch, "fp8", "b200", tp=4, ep=4)
    assert deploy(arch, "fp8", "b200", tp=4, ep=2).ep == 2
    with pytest.raises(OmniqError, match="--ep 4: must divide --tp 2"):
        deploy(arch, "fp8", "b200", tp=2, ep=4)
    with pytest.raises(OmniqError, match="--ep 0: must divide"):
        deploy(arch, "fp8", "b200", tp=2, ep=0)
    # default: as many expert groups as GPUs, but a single group on sm120 / sm121
    assert deploy(_custom_arch(), "fp8", "b200", tp=2).ep == 2
    assert deploy(_custom_arch(), "nano3-nvfp4", "sm120", tp=2).ep == 1
    with pytest.raises(OmniqError, match=r"--ep \(default 4\): the model has 6 routed experts"):
        deploy(arch, "fp8", "b200", tp=4)
    dep = deploy(_custom_arch(), "nano3-nvfp4", "sm120", tp=2, ep=2)
    assert any("discussion #16360" in w for w in dep.warnings)


def test_nvfp4_expert_shards_must_hold_whole_blocks():
    arch = _custom_arch(num_key_value_heads=8, moe_intermediate_size=1872)    # 1872 = 16 x 117; 936 = 1872 / 2 is not
    with pytest.raises(OmniqError, match="whole 16-element blocks"):
        deploy(arch, "nvfp4-experts", "b200", tp=2, ep=1)
    assert deploy(arch, "nvfp4-experts", "b200", tp=2, ep=2).moe_tp == 1


def _declared(real_arch, recipe="fp8", **q):
    hq = make_plan(real_arch, load(recipe)).hf_quant_config()
    hq["quantization"].update(q)
    return trtllm.read_declared(hq)


def _decide(arch, declared, gpu="b200", **request):
    plan_weights = gpu_memory.WeightBytes(10 * GIB, GIB)
    return trtllm.decide(arch, declared, plan_weights, trtllm.Request(resolve_gpu(gpu), **request))


@pytest.mark.parametrize("kv", ["INT8", "FP16", "W4A16"])
def test_only_fp8_and_nvfp4_kv_caches(real, kv):
    with pytest.raises(OmniqError, match=f"kv_cache_quant_algo {kv}: TensorRT-LLM accepts only FP8 or NVFP4"):
        _decide(real[0], _declared(real[0], kv_cache_quant_algo=kv))


def test_kv_cache_from_flat_modelopt_scheme(real):
    flat = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "*.conv1d"],
            "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}}
    dep = _decide(real[0], trtllm.read_declared(flat))
    assert dep.kv_cache_dtype == "fp8" and dep.layer_groups["lm_head"] == {"BF16": 1}
    with pytest.raises(OmniqError, match="kv_cache_quant_algo INT8"):
        _decide(real[0], trtllm.read_declared(dict(flat, kv_cache_scheme={"num_bits": 8, "type": "int"})))


def test_nvfp4_kv_cache_needs_blackwell(real):
    assert trtllm.llm_api_options(_decide(real[0], _declared(real[0], kv_cache_quant_algo="NVFP4")))[
        "kv_cache_config"]["dtype"] == "nvfp4"
    with pytest.raises(OmniqError, match="NVFP4 KV cache needs Blackwell"):
        _decide(real[0], _declared(real[0], kv_cache_quant_algo="NVFP4"), gpu="h200")


def test_unsupported_declarations(real):
    with pytest.raises(OmniqError, match="quant_algo W4A16_AWQ"):
        _decide(real[0], _declared(real[0], quant_algo="W4A16_AWQ"))
    with pytest.raises(OmniqError, match="group_size 32"):
        _decide(real[0], _declared(real[0], "nano3-nvfp4", group_size=32))
    with pytest.raises(OmniqError, match="not a quantized checkpoint"):
        trtllm.read_declared(None)
    with pytest.raises(OmniqError, match="no quant_algo"):
        trtllm.read_declared({"producer": {}, "quantization": {"kv_cache_quant_algo": "FP8"}})
    with pytest.raises(OmniqError, match="leaves every linear layer in BF16"):
        _decide(real[0], _declared(real[0], exclude_modules=["*"]))


@pytest.mark.parametrize("version,match", [("1.1.0", "needs 1.2.0 or newer"), ("0.21.0", "needs 1.2.0"),
                                           ("latest", "not a version")])
def test_trtllm_version_refusals(real, version, match):
    with pytest.raises(OmniqError, match=match):
        deploy(real[0], "fp8", "b200", trtllm_version=version)


def test_newer_trtllm_than_checked_warns(real):
    dep = deploy(real[0], "fp8", "b200", trtllm_version="1.5.0")
    assert any("newer than the releases the option keys were checked against" in w for w in dep.warnings)


def test_limits():
    assert trtllm.cuda_graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert trtllm.cuda_graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert trtllm.cuda_graph_batch_sizes(1) == [1]
    rc27, old = trtllm.parse_version("1.3.0rc27"), trtllm.parse_version("1.2.1")
    assert trtllm.token_budget(64, 4096, rc27) == (8192, False)
    assert trtllm.token_budget(64, 32768, rc27) == (8192, True)
    assert trtllm.token_budget(64, 32768, old) == (32768, False)
    assert trtllm.token_budget(10000, 4096, rc27) == (10000, False)
    assert trtllm.bench_lengths(4096) == (1024, 256) and trtllm.bench_lengths(512) == (256, 256)


def test_gpu_table():
    assert (GPUS["h100"].memory_gib, GPUS["h200"].memory_gib, GPUS["b200"].memory_gib) == (80, 141, 180)
    for alias, sm in (("hopper", 90), ("sm90", 90), ("blackwell", 100), ("sm100", 100), ("sm103", 103),
                      ("sm120", 120), ("sm121", 121), ("RTX PRO 6000", 120), ("H200", 90)):
        assert resolve_gpu(alias).sm == sm, alias
    assert resolve_gpu("hopper").memory_gib == min(g.memory_gib for g in GPUS.values() if g.family == "hopper")
    with pytest.raises(OmniqError, match="unknown target"):
        resolve_gpu("tpu-v5")


# ----- bundles end to end (small checkpoints) ------------------------------------------------------------------
def run_cli(*args) -> int:
    return main([str(a) for a in args])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".omniq-" in p.name)


@pytest.fixture
def tiny_fp8(quantized, tiny_config):
    return quantized("tiny-fp8-kvfp8", tiny_config, "fp8", "fp8")


@pytest.fixture
def tiny_nvfp4(quantized, tiny_config):
    return quantized("tiny-nano3-nvfp4", tiny_config, "nano3-nvfp4")


def fake_tools(tmp_path: Path) -> Path:
    """`trtllm-serve` / `trtllm-bench` stand-ins that record their arguments (and write the dataset)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for tool in ("trtllm-serve", "trtllm-bench"):
        p = bin_dir / tool
        p.write_text("#!/usr/bin/env bash\n"
                     f'printf "%s\\n" "$@" >> "$FAKE_LOG.{tool}"\n'
                     'prev=""; for a in "$@"; do if [ "$prev" = "--output" ]; then echo "{}" > "$a"; fi; '
                     'prev="$a"; done\n')
        p.chmod(0o755)
    return bin_dir


def test_bundle_fp8_on_hopper_end_to_end(tmp_path, tiny_fp8):
    out = tmp_path / "bundle"
    assert run_cli("build", tiny_fp8, "--gpu", "hopper", "--out", out) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "bench.sh", "build.json", "checkpoint/config.json",
                     "checkpoint/hf_quant_config.json", "checkpoint/model.safetensors", "checkpoint/omniq.json",
                     "checkpoint/tokenizer_config.json", "llm_api_options.yaml", "serve.sh"]
    check_golden("tiny-fp8-kvfp8_hopper_bundle", {n: (out / n).read_text()
                                                  for n in ("llm_api_options.yaml", "serve.sh", "bench.sh")})

    manifest = json.loads((out / "build.json").read_text())
    # every file but build.json itself is listed with its real sha256
    assert sorted(manifest["files"]) == [n for n in names if n != "build.json"]
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel
        assert (out / rel).stat().st_size == entry["bytes"]
    assert manifest["checkpoint"]["checksums_verified_against"] == "omniq.json"
    assert manifest["checkpoint"]["link_mode"] == "hardlink"
    assert (out / "checkpoint/model.safetensors").stat().st_ino == (tiny_fp8 / "model.safetensors").stat().st_ino
    assert manifest["target"]["sm"] == 90 and manifest["moe_backend"]["backend"] == "CUTLASS"
    assert manifest["quantization"]["kv_cache_dtype"] == "fp8"
    assert manifest["quantization"]["layer_groups"] == {"mamba": {"FP8": 8}, "attention": {"FP8": 8},
                                                        "routed_experts": {"FP8": 128}, "shared_experts": {"FP8": 8},
                                                        "lm_head": {"BF16": 1}}
    assert manifest["parallel"] == {"tp": 1, "ep": 1, "moe_tp": 1}
    assert manifest["tensorrt_llm"]["range"] == ">=1.2.0,<1.5.0"
    assert manifest["memory_per_gpu"]["fits"] and manifest["execution"] is None
    assert manifest["limits"]["max_seq_len"] == 4096              # the model's max_position_embeddings
    readme = (out / "README.md").read_text()
    assert "trtllm-build" in readme and "removed in TensorRT-LLM 1.3" in readme

    for script in ("serve.sh", "bench.sh"):
        assert os.access(out / script, os.X_OK)
        subprocess.run(["bash", "-n", str(out / script)], check=True)


def test_bundle_scripts_call_the_tools_with_the_bundle(tmp_path, tiny_fp8):
    out = tmp_path / "bundle"
    assert run_cli("build", tiny_fp8, "--gpu", "h200", "--out", out, "--max-batch", "8") == 0
    env = dict(os.environ, PATH=f"{fake_tools(tmp_path)}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"))
    subprocess.run([str(out / "serve.sh"), "--port", "9000"], check=True, env=env, cwd=tmp_path)
    serve = (tmp_path / "log.trtllm-serve").read_text().split("\n")
    assert serve[0] == str(out / "checkpoint")
    assert serve[serve.index("--extra_llm_api_options") + 1] == str(out / "llm_api_options.yaml")
    assert serve[serve.index("--backend") + 1] == "pytorch" and serve[serve.index("--max_batch_size") + 1] == "8"
    assert serve[-3:-1] == ["--port", "9000"]

    subprocess.run([str(out / "bench.sh")], check=True, env=dict(env, NUM_REQUESTS="16"), cwd=tmp_path)
    bench = (tmp_path / "log.trtllm-bench").read_text().split("\n")
    assert bench.count("prepare-dataset") == 1 and bench.count("throughput") == 1
    assert bench[bench.index("--num-requests") + 1] == "16"
    dataset = bench[bench.index("--output") + 1]
    assert Path(dataset).is_file() and bench[bench.index("--dataset") + 1] == dataset
    assert bench[bench.index("--model_path") + 1] == str(out / "checkpoint")


def test_bundle_nvfp4_hopper_fallback_and_blackwell(tmp_path, tiny_nvfp4):
    assert run_cli("build", tiny_nvfp4, "--gpu", "h100", "--out", tmp_path / "h", "--trtllm-version", "1.3.0rc18") == 0
    opts = yaml.safe_load((tmp_path / "h" / "llm_api_options.yaml").read_text())
    assert opts["moe_config"] == {"backend": "MARLIN"} and opts["nvfp4_gemm_config"] == {"allowed_backends": ["marlin"]}
    manifest = json.loads((tmp_path / "h" / "build.json").read_text())
    assert manifest["quantization"]["w4a16_fallback"] and any("W4A16" in w for w in manifest["warnings"])
    assert run_cli("build", tiny_nvfp4, "--gpu", "b200", "--out", tmp_path / "b", "--tp", "2") == 0
    opts = yaml.safe_load((tmp_path / "b" / "llm_api_options.yaml").read_text())
    assert opts["moe_config"] == {"backend": "TRTLLM"} and "nvfp4_gemm_config" not in opts
    assert (opts["tensor_parallel_size"], opts["moe_expert_parallel_size"]) == (2, 2)


REFUSALS = {
    "nvfp4-hopper-old-trtllm": ("nvfp4", ["--gpu", "hopper", "--trtllm-version", "1.2.1"], "NVFP4 on Hopper fails"),
    "fp8-sm80": ("fp8", ["--gpu", "sm80"], "FP8 needs sm89"),
    "fp8-sm86": ("fp8", ["--gpu", "sm86"], "FP8 needs sm89"),
    "tp3": ("fp8", ["--gpu", "h100", "--tp", "3"], "tensor parallel sizes 1, 2, 4, 8"),
    "tp4-kv-heads": ("fp8", ["--gpu", "h100", "--tp", "4"], "2 KV heads, not divisible by 4"),
    "ep-not-dividing-tp": ("fp8", ["--gpu", "h100", "--tp", "2", "--ep", "3"], "--ep 3: must divide --tp 2"),
    "memory": ("fp8", ["--gpu", "h100", "--max-batch", "50000", "--max-seq-len", "4096"], "does not fit"),
    "execute-here": ("fp8", ["--gpu", "h100", "--execute"], "--execute needs TensorRT-LLM"),
    "unknown-gpu": ("fp8", ["--gpu", "mi300x"], "unknown target"),
    "bad-version": ("fp8", ["--gpu", "h100", "--trtllm-version", "newest"], "not a version"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_2_and_write_nothing(case, tmp_path, tiny_fp8, tiny_nvfp4, capsys):
    which, args, message = REFUSALS[case]
    ckpt = tiny_fp8 if which == "fp8" else tiny_nvfp4
    parent = tmp_path / "deploy"
    parent.mkdir()
    assert run_cli("build", ckpt, "--out", parent / "bundle", *args) == 2
    assert message in capsys.readouterr().err
    assert list(parent.iterdir()) == []


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, update) -> None:
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


def test_int8_kv_checkpoint_refused(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "int8kv")
    _edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(kv_cache_quant_algo="INT8"))
    assert run_cli("build", ckpt, "--gpu", "b200", "--out", tmp_path / "out") == 2
    assert "only FP8 or NVFP4 KV caches" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_declaration_disagreeing_with_weights_refused(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "lying")
    _edit_json(ckpt / "hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="NVFP4", group_size=16))
    assert run_cli("build", ckpt, "--gpu", "b200", "--out", tmp_path / "out") == 2
    assert "declared NVFP4 but stored as F8_E4M3" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_unquantized_checkpoint_refused(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "plain")
    (ckpt / "hf_quant_config.json").unlink()
    _edit_json(ckpt / "config.json", lambda d: d.pop("quantization_config"))
    assert run_cli("build", ckpt, "--gpu", "b200", "--out", tmp_path / "out") == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_out_needs_force(tmp_path, tiny_fp8, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("build", tiny_fp8, "--gpu", "h100", "--out", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli("build", tiny_fp8, "--gpu", "h100", "--out", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "build.json").is_file()
    assert leftovers(tmp_path) == []


def test_failed_force_rebuild_keeps_the_old_bundle(tmp_path, tiny_fp8):
    out = tmp_path / "bundle"
    assert run_cli("build", tiny_fp8, "--gpu", "h100", "--out", out) == 0
    before = (out / "build.json").read_text()
    assert run_cli("build", tiny_fp8, "--gpu", "sm80", "--out", out, "--force") == 2
    assert (out / "build.json").read_text() == before and leftovers(tmp_path) == []


def test_out_overlapping_the_checkpoint_refused(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "ck")
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, ckpt / "bundle", tmp_path):
        assert run_cli("build", ckpt, "--gpu", "h100", "--out", out, "--force") == 2
        assert "overlaps the checkpoint directory" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_checksum_mismatch_fails_and_writes_nothing(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "tampered")
    (ckpt / "tokenizer_config.json").write_text('{"model_max_length": 8192}')
    assert run_cli("build", ckpt, "--gpu", "h100", "--out", tmp_path / "out") == 1
    assert "does not match omniq.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_listed_file_fails(tmp_path, tiny_fp8, capsys):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "incomplete")
    (ckpt / "tokenizer_config.json").unlink()
    assert run_cli("build", ckpt, "--gpu", "h100", "--out", tmp_path / "out") == 1
    assert "listed in omniq.json but missing" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_without_manifest_checksums_are_computed(tmp_path, tiny_fp8):
    ckpt = _copy_checkpoint(tiny_fp8, tmp_path / "nomanifest")
    (ckpt / "omniq.json").unlink()
    assert run_cli("build", ckpt, "--gpu", "h100", "--out", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "build.json").read_text())
    assert manifest["checkpoint"]["checksums_verified_against"] is None
    assert manifest["files"]["checkpoint/model.safetensors"]["sha256"] == \
        hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def test_copies_across_filesystems(tmp_path, tiny_fp8, monkeypatch):
    def no_cross_device_link(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_cross_device_link)
    out = tmp_path / "copied"
    assert run_cli("build", tiny_fp8, "--gpu", "h100", "--out", out) == 0
    assert json.loads((out / "build.json").read_text())["checkpoint"]["link_mode"] == "copy"
    assert (out / "checkpoint/model.safetensors").stat().st_ino != (tiny_fp8 / "model.safetensors").stat().st_ino
    assert (out / "checkpoint/model.safetensors").read_bytes() == (tiny_fp8 / "model.safetensors").read_bytes()


def test_execute_refuses_without_cuda_even_with_tensorrt_llm(tmp_path, tiny_fp8, monkeypatch, capsys):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("build", tiny_fp8, "--gpu", "h100", "--out", tmp_path / "out", "--execute") == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_weight_bytes_from_headers_match_the_plan(tiny_fp8, tiny_config):
    from omniq.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(tiny_fp8))
    from_files = gpu_memory.weight_bytes_from_headers(ckpt.arch, ckpt.headers)
    from_plan = gpu_memory.weight_bytes_from_plan(make_plan(from_config(tiny_config), load("fp8").with_kv_cache("fp8")))
    assert from_files == from_plan


# ----- Omni: the language model plus encoders as ONNX ------------------------------------------------------------
@pytest.fixture(scope="module")
def omni_ckpt(quantized):
    """The bundled tiny Omni's config and trained towers, its language model written as omni-nvfp4 exports it
    (`omniq quantize` does not take Omni checkpoints yet). Regenerate the golden files if its config changes."""
    from omniq.model import omni
    from omniq.model.checkpoint import open_checkpoint

    src = open_checkpoint("tiny-omni")
    towers = src.read([n for n in src.headers if omni.component_of(n) != "language_model"])
    assert towers and all(omni.component_of(n) in omni.TOWER_PREFIXES for n in towers)
    return quantized("tiny-omni-nvfp4", src.config, "omni-nvfp4", extra_tensors=towers)


@pytest.fixture(scope="module")
def omni_bundle(omni_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("omni-bundle") / "bundle"
    assert run_cli("build", omni_ckpt, "--gpu", "sm120", "--out", out) == 0
    return out


def test_omni_bundle(omni_bundle):
    out = omni_bundle
    check_golden("tiny-omni-nvfp4_sm120_bundle", {n.replace("/", "__"): (out / n).read_text() for n in
                                                  ("llm_api_options.yaml", "serve.sh", "bench.sh", "encoders/trtexec.sh")})
    manifest = json.loads((out / "build.json").read_text())
    assert manifest["checkpoint"]["is_omni"] and manifest["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert manifest["quantization"]["layer_groups"]["routed_experts"] == {"NVFP4": 4 * 16 * 2}   # 4 MoE layers x 16 experts x (up, down)
    assert manifest["moe_backend"]["backend"] == "CUTLASS"
    opts = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    assert opts["trust_remote_code"] is True and "--trust_remote_code" in (out / "serve.sh").read_text()
    enc = manifest["encoders"]
    assert sorted(enc) == ["audio", "vision"]
    assert enc["vision"]["components"] == ["vision_tower", "vision_projector"]
    assert enc["audio"]["components"] == ["audio_encoder", "audio_projector"]
    for name, e in enc.items():
        v = e["verification"]
        assert v["vs_pytorch_module"]["max_rel_error"] <= v["limit_max_rel_error"] == 1e-3
        assert v["vs_checkpoint_bf16"]["max_rel_error"] < 1e-3      # BF16 -> FP16 weights are exact in range
        assert [s[0] for s in v["input_shapes"]] == [1, 3]
        for f in e["files"]:
            assert manifest["files"][f]["sha256"] == hashlib.sha256((out / f).read_bytes()).hexdigest()
        assert e["trtexec"] in (out / "encoders" / "trtexec.sh").read_text()
        assert f"--minShapes={e['input']['name']}:1x" in e["trtexec"] and "--fp16" in e["trtexec"]
    # the towers' bytes count whole on every GPU
    assert manifest["memory_per_gpu"]["weights"] >= sum(t.numel() * 2 for t in tower_weights(tiny_omni_config()).values())
    assert manifest["checkpoint"]["checksums_verified_against"] == "omniq.json"
    subprocess.run(["bash", "-n", str(out / "encoders" / "trtexec.sh")], check=True)
    assert "## Encoders (Omni)" in (out / "README.md").read_text()


def test_omni_onnx_files_stand_on_their_own(omni_bundle, omni_ckpt):
    """Read the ONNX files back without omniq's export code: FP16 weights, opset, a dynamic batch, and the
    checkpoint's towers reproduced at a batch size the export never saw."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from omniq.model import towers
    from omniq.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(omni_ckpt))
    cfg = ckpt.config
    cases = {"vision": (towers.image_embeds, towers.vision_spec(cfg), towers.vision_tensors,
                        lambda s: torch.rand(5, 3, s.image_size, s.image_size)),
             "audio": (towers.audio_embeds, towers.sound_spec(cfg), towers.sound_tensors,
                       lambda s: torch.randn(5, s.frames(s.clip_samples), s.mel_bins))}
    for name, (fn, spec, inventory, make_input) in cases.items():
        path = omni_bundle / "encoders" / f"{name}.onnx"
        model = onnx.load(str(path))
        assert model.opset_import[0].version >= 17
        dtypes = {i.data_type for i in model.graph.initializer if len(i.dims) >= 2}
        assert dtypes == {onnx.TensorProto.FLOAT16}
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value
        x = make_input(spec)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {
            model.graph.input[0].name: x.numpy()})[0]
        ref = fn(spec, ckpt.read(list(inventory(spec))), x).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_omni_with_vision_only_exports_one_encoder(quantized, tmp_path):
    cfg = tiny_omni_config(sound=False)
    ckpt = quantized("tiny-omni-vision-only", cfg, "omni-fp8", extra_tensors=tower_weights(cfg))
    assert run_cli("build", ckpt, "--gpu", "h100", "--out", tmp_path / "b") == 0
    manifest = json.loads((tmp_path / "b" / "build.json").read_text())
    assert sorted(manifest["encoders"]) == ["vision"]
    assert "audio" not in (tmp_path / "b" / "encoders" / "trtexec.sh").read_text()


def test_omni_refusals_write_nothing(omni_ckpt, tmp_path, capsys, monkeypatch):
    incomplete = _copy_checkpoint(omni_ckpt, tmp_path / "incomplete")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(incomplete / "model.safetensors"))
    tensors.pop("mlp1.3.weight")
    save_file(tensors, str(incomplete / "model.safetensors"))
    (incomplete / "omniq.json").unlink()
    assert run_cli("build", incomplete, "--gpu", "sm120", "--out", tmp_path / "a") == 2
    assert "mlp1.3.weight is missing" in capsys.readouterr().err

    huge = _copy_checkpoint(omni_ckpt, tmp_path / "huge")
    tensors = load_file(str(huge / "model.safetensors"))
    tensors["mlp1.1.weight"][0, 0] = 1e6
    save_file(tensors, str(huge / "model.safetensors"))
    (huge / "omniq.json").unlink()
    assert run_cli("build", huge, "--gpu", "sm120", "--out", tmp_path / "b") == 2
    assert "do not fit FP16" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert run_cli("build", omni_ckpt, "--gpu", "sm120", "--out", tmp_path / "c") == 2
    assert "pip install 'omniq[onnx]'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge", "incomplete"]


def test_omni_onnx_gate_fails_the_build(omni_ckpt, tmp_path, capsys, monkeypatch):
    from omniq.deploy import encoders

    monkeypatch.setattr(encoders, "MAX_REL_ERROR", 0.0)     # any rounding difference now fails the gate
    assert run_cli("build", omni_ckpt, "--gpu", "sm120", "--out", tmp_path / "out") == 1
    assert "onnxruntime differs from the PyTorch module" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_help_names_the_defaults(capsys):
    assert run_cli("build", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert trtllm.DEFAULT_TRTLLM_VERSION in text and str(trtllm.DEFAULT_MAX_SEQ_LEN) in text
    for target in ("hopper", "blackwell", "sm90", "sm100", "sm103", "sm120", "sm121"):
        assert target in text
        resolve_gpu(target)


@pytest.mark.parametrize("version", ["1.2.0", "1.2.1", "1.3.0rc5", "1.3.0rc7", "1.3.0rc18", "1.3.0rc27", "1.4.0rc4"])
def test_requested_release_is_always_inside_the_recorded_range(real, version):
    """Whatever needs a newer release is either refused or avoided (CUTLASS, no chunked prefill) for older ones."""
    from packaging.version import Version

    for recipe, gpu, tp, ep in (("fp8", "h100", 2, 1), ("nano3-nvfp4", "b200", 2, 1), ("nano3-nvfp4", "h200", 1, 1),
                                ("omni-nvfp4", "sm120", 2, 2)):
        try:
            dep = deploy(real[0], recipe, gpu, trtllm_version=version, tp=tp, ep=ep)
        except OmniqError as e:
            assert gpu == "h200" and Version(version) < Version(trtllm.HOPPER_NVFP4_VERSION), str(e)
            continue
        assert Version(dep.min_version) <= Version(version) < Version(trtllm.CHECKED_BELOW)


@pytest.mark.slow
def test_bundle_of_a_real_omniq_quantize_output(tmp_path):
    """`omniq quantize tiny` (ModelOpt calibration, minutes on CPU) then `omniq build` on its output."""
    ckpt = tmp_path / "q"
    assert run_cli("quantize", "tiny", "--recipe", "fp8", "--kv-cache", "fp8", "--out", ckpt) == 0
    out = tmp_path / "bundle"
    assert run_cli("build", ckpt, "--gpu", "h100", "--out", out) == 0
    manifest = json.loads((out / "build.json").read_text())
    assert manifest["checkpoint"]["checksums_verified_against"] == "omniq.json"
    assert manifest["quantization"]["kv_cache_dtype"] == "fp8" and manifest["moe_backend"]["backend"] == "CUTLASS"
    assert yaml.safe_load((out / "llm_api_options.yaml").read_text()) == \
        yaml.safe_load((GOLDEN / "tiny-fp8-kvfp8_hopper_bundle" / "llm_api_options.yaml").read_text())
