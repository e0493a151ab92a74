"""The layer-streamed quantize reproduces the whole-model quantize byte for byte.

tests/data/golden/quantize_tiny.json holds the sha256 of every file of the artifacts `omniq quantize` wrote
before it was layer-streamed (whole model loaded, `mtq.quantize`, `export_hf_checkpoint`; recorded with
scripts/artifact_digests.py, 16 x 128 calibration tokens, one thread). The same CLI runs here, now streamed
(omniq/export/streamed.py), on the bundled tiny model re-saved in several shards (so the streamed reader
crosses shard boundaries mid-layer), and every file must hash the same (omniq.json without its time and the
source's path and file hashes; lint.json without its --out path).
"""

import json

import pytest
import torch

from conftest import QUANTIZE_CALIB, run_cli_in_subprocess
from reference_configs import DATA, REPO

GOLDEN = json.loads((DATA / "golden" / "quantize_tiny.json").read_text())


def _digests(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("artifact_digests", REPO / "scripts" / "artifact_digests.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.digests(path)


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory, tiny_dir):
    """The bundled tiny model's tensors re-saved into 4 shards (an index, one layer split across files)."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("tiny-sharded")
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    names = list(tensors)                         # file order: the layers interleave across shard boundaries
    parts = [names[k::4] for k in range(4)]
    weight_map = {}
    for k, part in enumerate(parts):
        f = f"model-{k + 1:05d}-of-00004.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for p in tiny_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copyfile(p, d / p.name)
    return d


def _quantize(model, name, out, extra=()):
    mixed = out.parent / "mixed.yaml"
    from conftest import MIXED_RECIPE

    mixed.write_text(MIXED_RECIPE)
    recipe = {"fp8": ["--recipe", "fp8"], "nvfp4": ["--recipe", "nvfp4"],
              "mixed-kv": ["--recipe", str(mixed), "--kv-cache", "fp8"],
              "omni-nvfp4": ["--recipe", "omni-nvfp4"]}[name]
    r = run_cli_in_subprocess(["quantize", str(model), *recipe, "--out", str(out), *QUANTIZE_CALIB, *extra],
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
    src = streamed.Source(ckpt)
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
