"""`omniq quantize` with `compensation: norm-tweak` through the CLI: the BF16 norms the fit changed are
written in place of the source's (everything else as without it), omniq.json records the fit per layer, the
artifact validates against the BF16 reference, and bad `compensation:` input exits 2 with nothing written."""

import json

import pytest
import torch

from checkpoint_dir import read_tensors
from conftest import run_cli_in_subprocess
from omniq.model.checkpoint import open_checkpoint

RECIPE = """name: nt-e2e
default: nvfp4
compensation: {name: norm-tweak, steps: 4, lr: 0.003, params: [norm, mixer-norm]}
"""
CALIB = ["--calib-samples", "8", "--calib-seq-len", "64", "--calib-seed", "1"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("nt")
    (root / "r.yaml").write_text(RECIPE)
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(root / "r.yaml"), "--out", str(root / "out"),
                                 *CALIB], one_thread=True)
    return dict(run, path=root / "out", root=root)


def test_norm_tweak_writes_fitted_norms_and_records_them(artifact, tiny_dir):
    assert artifact["rc"] == 0, artifact["stderr"][-2000:]
    m = json.loads((artifact["path"] / "omniq.json").read_text())
    assert "compensation: norm-tweak changed" in artifact["stdout"]
    assert m["recipe"]["compensation"] == {"name": "norm-tweak", "steps": 4, "lr": 0.003,
                                           "params": ["norm", "mixer-norm"]}
    rec = m["weight_calibration"]["compensation"]
    arch = open_checkpoint(str(tiny_dir)).arch
    assert [r["layer"] for r in rec["layers"]] == list(range(arch.num_layers))
    assert all(r["loss_after"] <= r["loss_before"] for r in rec["layers"])
    kept = [r for r in rec["layers"] if r["kept"]]
    assert kept and all(r["loss_after"] < r["loss_before"] and r["tensors"] >= 1 for r in kept)
    out, src = read_tensors(artifact["path"]), read_tensors(tiny_dir)
    changed = {n for n in src if n in out and out[n].dtype == src[n].dtype and not torch.equal(out[n], src[n])}
    fitted = {f"{arch.layer_prefix(r['layer'])}.norm.weight" for r in kept}
    assert fitted <= changed
    assert all(n.endswith("norm.weight") for n in changed)           # norms only: embeddings, conv, D, ... kept
    assert out[arch.embedding_weight].equal(src[arch.embedding_weight])


def test_compensated_artifact_validates(artifact):
    rep = artifact["root"] / "v.json"
    run = run_cli_in_subprocess(["validate", "tiny", str(artifact["path"]), "--samples", "2", "--seq-len", "64",
                                 "--report", str(rep), "--max-kl", "10", "--min-top1", "0", "--max-ppl-ratio", "100",
                                 "--no-noise-floor"], one_thread=True)
    assert run["rc"] == 0, run["stderr"][-2000:]
    v = json.loads(rep.read_text())
    assert 0 < v["kl_mean"] < 1


@pytest.mark.parametrize("comp, message", [
    ("bogus", "compensation 'bogus' is unknown"),
    ("{name: norm-tweak, steps: 0}", "compensation steps 0"),
    ("{name: norm-tweak, params: [router]}", "compensation param 'router' is unknown"),
    ("{name: norm-tweak, momentum: 1}", "compensation has unknown key 'momentum'"),
])
def test_bad_compensation_exits_2_one_line_nothing_written(tmp_path, comp, message):
    (tmp_path / "r.yaml").write_text(f"name: bad\ndefault: nvfp4\ncompensation: {comp}\n")
    out = tmp_path / "out"
    run = run_cli_in_subprocess(["quantize", "tiny", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out),
                                 *CALIB])
    assert run["rc"] == 2
    assert message in run["stderr"] and len(run["stderr"].strip().splitlines()) == 1
    assert not out.exists()
