"""`omniq quantize tiny-omni --recipe omni-nvfp4` end to end through the CLI: only the language model is
quantized, every tower and projector tensor is the source's byte for byte (sha256 per tensor, read from the
files independently of the exporter), the configs name layers with the `language_model.` prefix and exclude the
towers, the model's own code and tokenizer travel, and omniq.json counts calibration tokens per modality per
quantized layer. Plus the raw tower copy on real-layout names (no ModelOpt, no real weights)."""

import hashlib
import json
import struct

import pytest

from omniq.model import omni
from omniq.model.checkpoint import open_checkpoint, read_safetensors_header
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan


@pytest.fixture(scope="module")
def source():
    return open_checkpoint("tiny-omni")


@pytest.fixture(scope="module")
def art(omni_quantized):
    a = omni_quantized["mm"]
    assert a["rc"] == 0, a["stderr"][-2000:]
    return a


def raw_tensor_sha256(folder) -> dict[str, tuple[str, str, tuple]]:
    """name -> (sha256 of the stored bytes, dtype, shape), read straight from the safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + hlen])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            out[name] = (hashlib.sha256(data[8 + hlen + a:8 + hlen + b]).hexdigest(), meta["dtype"],
                         tuple(meta["shape"]))
    return out


def test_cli_summary_reports_modalities(art):
    out = art["stdout"]
    assert out.startswith(f"wrote {art['path']}") and "MIXED_PRECISION" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("calibration tokens:"))
    for m in ("text", "image", "audio"):
        assert f"{m} " in line


def test_every_tower_tensor_is_byte_identical(art, source):
    src = raw_tensor_sha256(source.path)
    got = raw_tensor_sha256(art["path"])
    towers = [n for n in src if omni.component_of(n) in omni.TOWER_PREFIXES]
    assert len(towers) > 100
    for comp in omni.TOWER_PREFIXES:
        assert any(omni.component_of(n) == comp for n in towers), comp
    for name in towers:
        assert got[name] == src[name], name
    # nothing outside the language model was added or dropped
    assert {n for n in got if omni.component_of(n) != "language_model"} == set(towers)
    assert json.loads((art["path"] / "omniq.json").read_text())["source"]["dropped_tensors"] == []


def test_only_the_language_model_is_quantized(art, source):
    plan = make_plan(source.arch, recipes.load("omni-nvfp4"))
    got = raw_tensor_sha256(art["path"])
    for lin in plan.arch.linears:
        assert lin.name.startswith("language_model.")
        dtype = got[f"{lin.name}.weight"][1]
        assert dtype == {"nvfp4": "U8", "fp8": "F8_E4M3", "bf16": "BF16"}[plan.formats[lin.name]], lin.name
    quantized_dtypes = {"U8", "F8_E4M3"}
    assert not [n for n, (_, d, _) in got.items() if d in quantized_dtypes and not n.startswith("language_model.")]
    index = json.loads((art["path"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)


def test_configs_use_engine_names_and_exclude_the_towers(art, source):
    hq = json.loads((art["path"] / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "MIXED_PRECISION" and hq["kv_cache_quant_algo"] == "FP8"
    for wildcard in ("vision_model.*", "mlp1.*", "sound_encoder.*", "sound_projection.*"):
        assert wildcard in hq["exclude_modules"]
    lm_excludes = [m for m in hq["exclude_modules"] if not m.endswith("*")]
    assert lm_excludes and all(m.startswith("language_model.") for m in lm_excludes)
    assert "language_model.lm_head" in lm_excludes
    assert hq["quantized_layers"] and all(k.startswith("language_model.backbone.") for k in hq["quantized_layers"])
    cfg = json.loads((art["path"] / "config.json").read_text())
    want = dict(source.config)
    qc = cfg.pop("quantization_config")
    assert cfg == want                                   # the Omni top-level config, llm_config and towers kept
    assert qc["quant_algo"] == "MIXED_PRECISION"
    assert "vision_model.*" in qc["ignore"] or "vision_model.*" in json.dumps(qc)


def test_model_code_and_tokenizer_are_carried(art, source):
    for name in ("configuration_tiny_omni.py", "modeling_tiny_omni.py", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (art["path"] / name).read_bytes() == (source.path / name).read_bytes(), name


def test_calibration_tokens_per_modality_per_layer(art, source):
    manifest = json.loads((art["path"] / "omniq.json").read_text())
    cal = manifest["calibration"]
    assert cal["mix"] == {"text": 0.5, "image": 0.25, "audio": 0.25}
    assert cal["image"]["split"] == cal["audio"]["split"] == "calib"
    mt = cal["modality_tokens"]
    total = mt["total"]
    assert all(total[m] > 0 for m in ("text", "image", "audio"))
    plan = make_plan(source.arch, recipes.load("omni-nvfp4"))
    per_layer = mt["per_layer"]
    assert set(per_layer) == {lin.name for lin in plan.quantized}
    top_k = source.llm_config["num_experts_per_tok"]
    by_layer: dict[str, dict[str, int]] = {}
    for name, counts in per_layer.items():
        if ".experts." in name:
            if name.endswith("up_proj"):
                acc = by_layer.setdefault(name.split(".experts.")[0], dict.fromkeys(counts, 0))
                for m, n in counts.items():
                    acc[m] += n
        elif not name.endswith("lm_head"):
            assert counts == total, name                  # every token passes every non-routed layer
    # each token goes to top_k routed experts: a layer's experts together saw top_k x the tokens
    assert by_layer and all(acc == {m: n * top_k for m, n in total.items()} for acc in by_layer.values())


@pytest.mark.slow     # a second quantize run (about 20 s); benchmarks/omni_calib_mix.py also runs it
def test_text_only_calibration_on_an_omni_checkpoint(omni_quantized):
    a = omni_quantized["text"]
    assert a["rc"] == 0, a["stderr"][-2000:]
    mt = json.loads((a["path"] / "omniq.json").read_text())["calibration"]["modality_tokens"]
    assert mt["total"]["text"] > 0 and mt["total"]["image"] == mt["total"]["audio"] == 0


def test_raw_copy_on_real_layout_names(tmp_path):
    """The tower copy of the export on the real checkpoint's names and dtypes (stand-in values)."""
    import torch
    from safetensors.torch import save_file

    from omniq.export.hf_checkpoint import copy_raw_tensors, tower_tensors

    g = torch.Generator().manual_seed(0)
    names = {"vision_model.radio_model.model.blocks.0.attn.qkv.weight": torch.bfloat16,
             "vision_model.radio_model.input_conditioner.norm_mean": torch.float32,
             "mlp1.0.weight": torch.bfloat16, "mlp1.1.weight": torch.float16,
             "sound_encoder.encoder.layers.0.self_attn.linear_q.weight": torch.bfloat16,
             "sound_encoder.projection.weight": torch.bfloat16,
             "sound_projection.linear1.weight": torch.bfloat16}
    t = {n: torch.randn(3, 5, generator=g).to(d) for n, d in names.items()}
    t["language_model.backbone.norm_f.weight"] = torch.ones(4, dtype=torch.bfloat16)
    save_file(dict(list(t.items())[:4]), str(tmp_path / "a.safetensors"))
    save_file(dict(list(t.items())[4:]), str(tmp_path / "b.safetensors"))

    class Ckpt:
        is_omni = True
        headers = {}

    from omniq.model.checkpoint import TensorInfo

    for f in ("a", "b"):
        for n, meta in read_safetensors_header(tmp_path / f"{f}.safetensors").items():
            if n != "__metadata__":
                Ckpt.headers[n] = TensorInfo(meta["dtype"], tuple(meta["shape"]), tmp_path / f"{f}.safetensors")
    towers = tower_tensors(Ckpt)
    assert set(towers) == set(names)
    (tmp_path / "out").mkdir()
    copy_raw_tensors(Ckpt, sorted(towers), tmp_path / "out" / "towers.safetensors")
    src = {**raw_tensor_sha256(tmp_path)}
    got = raw_tensor_sha256(tmp_path / "out")
    assert got == {n: src[n] for n in names}
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "out" / "towers.safetensors"))
    assert all(torch.equal(back[n], t[n]) and back[n].dtype == t[n].dtype for n in names)


def test_real_layout_names_with_text_calibration(tmp_path):
    """A checkpoint in the real Nano Omni's shape (real config keys, tower tensors under the real prefixes, in
    several dtypes, towers omniq cannot run) around the tiny language model: the default mix stops with a
    one-line error, `--calib-mix text:1` quantizes it and carries every tower tensor byte for byte."""
    import shutil
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from reference_configs import omni_config

    tiny = open_checkpoint("tiny")
    src = tmp_path / "omni-real-names"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(omni_config(dict(tiny.config))))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny.path / name, src / name)
    lm = {f"language_model.{k}": v for k, v in load_file(str(tiny.path / "model.safetensors")).items()}
    g = torch.Generator().manual_seed(1)
    towers = {"vision_model.radio_model.model.blocks.0.attn.qkv.weight": torch.bfloat16,
              "vision_model.radio_model.input_conditioner.norm_mean": torch.float32,
              "mlp1.0.weight": torch.bfloat16, "mlp1.1.weight": torch.float16,
              "sound_encoder.encoder.layers.0.self_attn.linear_q.weight": torch.bfloat16,
              "sound_encoder.projection.weight": torch.bfloat16, "sound_projection.linear1.weight": torch.bfloat16}
    save_file(lm, str(src / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({n: torch.randn(8, 6, generator=g).to(d) for n, d in towers.items()},
              str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in lm},
                  **{n: "model-00002-of-00002.safetensors" for n in towers}}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def cli(*extra):
        args = ["quantize", str(src), "--recipe", "omni-nvfp4", "--out", str(tmp_path / "out"),
                "--calib", "tiny-calib", "--calib-samples", "8", "--calib-seq-len", "128", *extra]
        code = ("import sys, json, torch; torch.set_num_threads(1)\n"
                "from omniq.cli import main\n"
                "sys.exit(main(json.loads(sys.argv[1])))\n")
        return subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              timeout=900)

    p = cli()
    assert p.returncode == 2 and "--calib-mix text:1" in p.stderr and not (tmp_path / "out").exists()
    p = cli("--calib-mix", "text:1")
    assert p.returncode == 0, p.stderr[-3000:]
    got = raw_tensor_sha256(tmp_path / "out")
    want = raw_tensor_sha256(src)
    assert {n: got[n] for n in towers} == {n: want[n] for n in towers}
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert {"vision_model.*", "mlp1.*", "sound_encoder.*", "sound_projection.*"} <= set(hq["exclude_modules"])
