"""The layer-streamed quantize reproduces the whole-model quantize byte for byte.

tests/data/golden/quantize_tiny.json holds the sha256 of every file of the artifacts `omniq quantize` wrote
before it was layer-streamed (whole model loaded, `mtq.quantize`, `export_hf_checkpoint`; recorded with
scripts/artifact_digests.py, 16 x 128 calibration tokens, one thread). The same CLI runs here, now streamed
(omniq/export/streamed.py), on the bundled tiny model re-saved in several shards (so the streamed reader
crosses shard boundaries mid-layer), and every file must hash the same (omniq.json without its time and the
source's path and file hashes; lint.json without its --out path).

The digests depend on the CPU's BF16 matmul kernels (calibration runs in BF16, and the amax, scales and expert
routing follow its rounding): on a CPU with AMX (oneDNN's AMX BF16 kernels; seen from session 6 on, this kind's
bf16 matmul rate went from about 217 to 530-670 GFLOP/s) the same code writes other bytes for the NVFP4 and KV
parts and another routing count in omniq.json. quantize_tiny_amx.json holds the digests recorded on such a CPU
(session 6, with the code of 698dd21, which the whole-model golden above passed on the CPU without AMX, and
again with main: the same digests); each machine is held to the golden of its own kernels.
"""

import json

import pytest
import torch

from checkpoint_dir import by_layer_shards, resave_sharded
from conftest import QUANTIZE_CALIB, run_cli_in_subprocess
from reference_configs import DATA, REPO, cpu_has_amx_bf16

GOLDEN = json.loads((DATA / "golden" / ("quantize_tiny_amx.json" if cpu_has_amx_bf16()
                                        else "quantize_tiny.json")).read_text())


def _digests(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("artifact_digests", REPO / "scripts" / "artifact_digests.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.digests(path)


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory, tiny_dir):
    """The bundled tiny model's tensors re-saved into 4 shards (an index, one layer split across files)."""
    d = tmp_path_factory.mktemp("tiny-sharded")
    resave_sharded(tiny_dir, d, lambda names: [names[k::4] for k in range(4)])   # layers interleave across shards
    return d


def _quantize(model, name, out, extra=()):
    mixed = out.parent / "mixed.yaml"
    from reference_configs import MIXED_RECIPE

    mixed.write_text(MIXED_RECIPE)
    recipe = {"fp8": ["--recipe", "fp8"], "nvfp4": ["--recipe", "nvfp4"],
              "mixed-kv": ["--recipe", str(mixed), "--kv-cache", "fp8"],
              "omni-nvfp4": ["--recipe", "omni-nvfp4"]}[name]
    r = run_cli_in_subprocess(["quantize", str(model), *recipe, "--out", str(out), "--calib", "tiny-calib", *QUANTIZE_CALIB, *extra],
                              one_thread=True)
    assert r["rc"] == 0, r["stderr"][-3000:]
    return r


@pytest.mark.parametrize("name", ["fp8", "mixed-kv", pytest.param("nvfp4", marks=pytest.mark.slow)])
def test_streamed_artifact_is_byte_identical_to_the_whole_model_one(sharded_tiny, tmp_path, name):
    _quantize(sharded_tiny, name, tmp_path / name)
    assert _digests(tmp_path / name) == GOLDEN[name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no stage left


@pytest.mark.slow
def test_streamed_omni_artifact_is_byte_identical(tmp_path):
    _quantize("tiny-omni", "omni-nvfp4", tmp_path / "omni")
    assert _digests(tmp_path / "omni") == GOLDEN["omni-nvfp4"]


def test_materialized_layers_equal_transformers_load(tiny_dir):
    """Every tensor the streamed path gives a layer equals (dtype and bits) what from_pretrained loads (with
    the router weight back in F32), the embeddings too."""
    import warnings

    from transformers import NemotronHForCausalLM

    from omniq.export import streamed
    from omniq.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(tiny_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NemotronHForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16, use_mamba_kernels=False)
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    skel = streamed.build_skeleton(ckpt)
    src = streamed.TensorReader(ckpt)
    streamed.materialize(skel.model.embeddings, "model.embeddings", src)
    for i in range(ckpt.arch.num_layers):
        streamed.materialize(skel.model.layers[i], f"model.layers.{i}", src)
    got = {**dict(skel.model.named_parameters(prefix="model")), **dict(skel.model.named_buffers(prefix="model"))}
    assert [n for n, t in got.items() if t.is_meta] == ["model.norm_f.weight"]     # copied, never run
    for name, t in got.items():
        if t.is_meta:
            continue
        w = want[name]
        if name.endswith("gate.weight"):
            assert t.dtype == torch.float32
            w = ckpt.read([f"backbone{name[len('model'):]}"])[f"backbone{name[len('model'):]}"]
        assert t.dtype == w.dtype and torch.equal(t, w), name
    assert set(got) == {n for n in want if not n.startswith("lm_head")}


# ----- bad input mid-run: nothing at --out, no temporary left -----------------------------------------------
def test_shard_missing_mid_run(tmp_path, tiny_dir):
    """The last shard disappears once the run has started writing (its stage exists): exit 2, one line naming
    the shard, nothing at --out, the stage removed."""
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    late = by_layer_shards(tiny_dir, src)
    outdir = tmp_path / "outs"
    outdir.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "omniq.cli", "quantize", str(src), "--recipe", "fp8",
                          "--out", str(outdir / "a"), "--calib", "tiny-calib", *QUANTIZE_CALIB],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(q.name.startswith(".a.omniq-") for q in outdir.iterdir()):
        assert p.poll() is None and time.time() < deadline, "the run ended before its stage appeared"
        time.sleep(0.05)
    late.unlink()
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model-00002-of-00002.safetensors" in lines[0] and "missing" in lines[0]
    assert list(outdir.iterdir()) == []


def test_disk_full_during_export(tmp_path):
    """--out on a 6 MiB tmpfs (the artifact is about 15 MiB): exit 1, one line, nothing left on the tmpfs."""
    import subprocess
    import sys

    from small_disk import left_on, small_tmpfs

    with small_tmpfs(tmp_path, "6m") as mnt:
        p = subprocess.run([sys.executable, "-m", "omniq.cli", "quantize", "tiny", "--recipe", "fp8",
                            "--out", str(mnt / "a"), *QUANTIZE_CALIB], capture_output=True, text=True, timeout=600)
        assert p.returncode == 1, p.stderr[-2000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0], lines
        assert left_on(mnt) == []


HOOK_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from omniq.calib import data as calib_data
from omniq.export import streamed
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import recipe as recipes
from omniq.quant.modelopt_config import enabled_quantizers, modelopt_config
from omniq.quant.plan import make_plan
ckpt = open_checkpoint("tiny")
plan = make_plan(ckpt.arch, recipes.load("fp8"))
rows = calib_data.load(calib_data.DEFAULT, ckpt.tokenizer, samples=4, seq_len=32).rows
seen = []
def hook(i, tensors):
    seen.append(i)
    name = f"backbone.layers.{i}.mixer.out_proj.weight_scale"
    if name in tensors:
        tensors[name] = tensors[name] * float(sys.argv[2])
    return tensors
final = Path(sys.argv[1])
final.mkdir()
r = streamed.run(ckpt, plan, modelopt_config(plan), enabled_quantizers(plan), [rows], final, layer_tensors_hook=hook)
print(json.dumps({"seen": seen, "files": r.files}))
"""


def test_layer_tensors_hook_sees_every_layer_and_its_tensors_are_written(tmp_path):
    """The weight-calibration hook point: called once per layer, in order; what it returns is what the shard
    holds."""
    import subprocess
    import sys

    from safetensors import safe_open

    p = subprocess.run([sys.executable, "-c", HOOK_SCRIPT, str(tmp_path / "final"), "1.0625"], capture_output=True,
                       text=True, timeout=900)   # a scale still within the self-check's error bound
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["seen"] == list(range(10)) and doc["files"] == ["model.safetensors"]
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        in_scale = f.get_tensor("backbone.layers.0.mixer.out_proj.input_scale")
        w = f.get_tensor("backbone.layers.0.mixer.out_proj.weight").float()
        scale = f.get_tensor("backbone.layers.0.mixer.out_proj.weight_scale")
    assert in_scale.dtype == torch.float32
    # ModelOpt's FP8 per-tensor weight scale is amax / 448: the written one is 1.0625 x that (the hook's)
    from omniq.model.checkpoint import open_checkpoint

    ref = open_checkpoint("tiny").read(["backbone.layers.0.mixer.out_proj.weight"])["backbone.layers.0.mixer.out_proj.weight"]
    src = ref.float().abs().max() / 448
    assert torch.allclose(scale, 1.0625 * src, rtol=1e-6) and w.abs().max() <= 448


def test_a_weight_the_hook_garbles_fails_as_its_layer_is_written(tmp_path):
    """The self-check of quantized weights runs as each layer is written (`streamed.WriteCheck`, rows read back
    from the shard against the source rows copied when the layer was read): a weight scale twice ModelOpt's
    fails the run at that layer, naming the weight."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", HOOK_SCRIPT, str(tmp_path / "final"), "2"], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode != 0
    assert "backbone.layers.0.mixer.out_proj.weight (fp8) dequantizes to relative error 0.99" in p.stderr or \
        "backbone.layers.0.mixer.out_proj.weight (fp8) dequantizes to relative error 1.00" in p.stderr, p.stderr[-2000:]
    assert "seen" not in p.stdout


def test_shard_writer_writes_what_save_file_writes(tmp_path):
    """The planned layout (header first, tensors written at their offsets in any order) is byte for byte the
    file safetensors' save_file writes for the same tensors; shards split in model order at the limit."""
    from safetensors.torch import save_file

    from omniq.errors import GateFailed
    from omniq.export.streamed import ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(6, 8, generator=g).to(torch.bfloat16),
               "b.weight_scale": torch.tensor(0.5), "a.weight": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
               "a.packed": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8),
               "a.input_scale": torch.tensor(1.5), "z.router": torch.randn(3, 8, generator=g)}
    layout = {n: ({torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
                   torch.uint8: "U8"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()}
    w = ShardWriter(tmp_path, layout, limit=1 << 20)
    for name in reversed(list(tensors)):
        w.add({name: tensors[name]})
    # read back as written: whole, by rows, compared bit for bit (a chunk smaller than the tensor too)
    assert all(w.holds(n, t, chunk=5) for n, t in tensors.items())
    assert not w.holds("b.weight", tensors["b.weight"].clone().view(torch.int16).add_(1).view(torch.bfloat16))
    assert torch.equal(w.read("b.weight"), tensors["b.weight"])
    assert torch.equal(w.read_rows("a.packed", [0, 3]), tensors["a.packed"][[0, 3]])
    assert w.finish() == ["model.safetensors"]
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    d = tmp_path / "split"
    d.mkdir()
    w = ShardWriter(d, layout, limit=100)
    w.add(tensors)
    names = w.finish()
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    with pytest.raises(GateFailed, match="expected BF16"):
        ShardWriter(d, layout).add({"b.weight": torch.zeros(6, 8)})
    with pytest.raises(GateFailed, match="unexpected tensor"):
        ShardWriter(d, layout).add({"c": torch.zeros(1)})
    with pytest.raises(GateFailed, match="missing"):
        ShardWriter(d, layout).finish()


def test_shard_writer_hashes_each_shard_once_it_is_complete(tmp_path, monkeypatch):
    """Each shard's sha256 is read in the background once its last tensor is written, so the manifest's
    `sha256_file` of the finished shards reads none of them again; the digests are the files' own."""
    import hashlib

    from omniq import checksums
    from omniq.export.streamed import ShardWriter

    g = torch.Generator().manual_seed(1)
    tensors = {f"layers.{i}.{k}": torch.randn(16, 32, generator=g).to(torch.bfloat16)
               for i in range(4) for k in ("a", "b")}
    layout = {n: ("BF16", tuple(t.shape)) for n, t in tensors.items()}
    w = ShardWriter(tmp_path, layout, limit=3 * 16 * 32 * 2)            # 3 tensors a shard: 3 shards
    for i in range(4):
        w.add({n: t for n, t in tensors.items() if n.startswith(f"layers.{i}.")})
        complete = [s for s in w.shards if len(s.written) == len(s.names)]
        assert all(s.digest is not None for s in complete) and len(complete) >= (2 * (i + 1)) // 3
    files = w.finish()
    assert len(files) == 3

    def no_read(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(checksums, "read_digest", no_read)
    for name in files:
        assert checksums.sha256_file(tmp_path / name) == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_a_failed_export_abandons_its_shards_digests(tmp_path):
    """A run that fails before `finish` (the stage is about to be removed) leaves no background read holding
    a shard open."""
    from omniq.export.streamed import ShardWriter

    tensors = {f"t{i}": torch.zeros(8, 8, dtype=torch.bfloat16) for i in range(4)}
    w = ShardWriter(tmp_path, {n: ("BF16", (8, 8)) for n in tensors}, limit=128)
    w.add({n: tensors[n] for n in ("t0", "t1", "t2")})
    soons = [s.digest for s in w.shards if s.digest is not None]
    assert len(soons) == 3
    w.close()
    assert all(s.future.done() for s in soons) and all(s.digest is None for s in w.shards)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_the_finite_check_finds_every_nan_and_inf(dtype):
    """`streamed._all_finite` (one aminmax pass) finds a NaN / inf / -inf wherever it sits, in 2-D and 3-D."""
    from omniq.export.streamed import _all_finite

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (4, 37, 64), (1, 1), (130, 2049)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        assert _all_finite(x)
        n = x.numel()
        bad = [float("nan"), float("inf"), float("-inf")] if dtype != torch.float8_e4m3fn else [float("nan")]
        for pos in {0, 1, n // 2, n - 1, 15, 16}:
            for v in bad:
                if pos < n:
                    y = x.clone()
                    y.view(-1)[pos] = v
                    assert not _all_finite(y), (shape, pos, v)
    assert _all_finite(torch.empty(0, 4, dtype=dtype))
