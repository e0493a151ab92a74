"""The export's own checks: hub-layout renaming, and `verify_tensors` refusing every way an export can be
wrong (run on tampered copies of a real `omniq quantize` artifact)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniq.errors import GateFailed
from omniq.export.hf_checkpoint import hub_names, verify_tensors
from omniq.model.arch import from_config
from omniq.model.checkpoint import open_checkpoint
from omniq.quant import recipe as recipes
from omniq.quant.plan import make_plan


def test_hub_names_undo_transformers_names():
    cfg = {"model_type": "nemotron_h", "hybrid_override_pattern": "ME", "hidden_size": 8, "vocab_size": 16,
           "mamba_num_heads": 2, "mamba_head_dim": 4, "ssm_state_size": 4, "n_routed_experts": 3,
           "num_experts_per_tok": 1, "moe_intermediate_size": 4}
    arch = from_config(cfg)
    emb = torch.zeros(16, 8)
    assert hub_names("backbone.embedding.weight", emb, arch) == [("backbone.embeddings.weight", emb)]
    assert hub_names("model.embeddings.weight", emb, arch)[0][0] == "backbone.embeddings.weight"
    assert hub_names("model.layers.0.mixer.in_proj.weight_scale", torch.ones(()), arch)[0][0] == \
        "backbone.layers.0.mixer.in_proj.weight_scale"
    fused = torch.arange(3 * 4 * 8, dtype=torch.float32).view(3, 4, 8)
    split = hub_names("model.layers.1.mixer.experts.up_proj", fused, arch)
    assert [n for n, _ in split] == [f"backbone.layers.1.mixer.experts.{e}.up_proj.weight" for e in range(3)]
    assert all(torch.equal(t, fused[e]) for e, (_, t) in enumerate(split))
    kept = hub_names("backbone.layers.1.mixer.experts.2.down_proj.weight", torch.zeros(8, 4), arch)
    assert kept[0][0] == "backbone.layers.1.mixer.experts.2.down_proj.weight"


@pytest.fixture(scope="module")
def fp8(quantized, tiny_dir):
    art = quantized["fp8"]
    ckpt = open_checkpoint(str(tiny_dir))
    plan = make_plan(ckpt.arch, recipes.load("fp8"))
    return art["path"], plan, ckpt


def _tampered(fp8, tmp_path, edit):
    path, plan, ckpt = fp8
    t = load_file(str(path / "model.safetensors"))
    edit(t)
    save_file(t, str(tmp_path / "model.safetensors"))
    return tmp_path, plan, ckpt


def test_intact_artifact_passes(fp8):
    path, plan, ckpt = fp8
    assert verify_tensors(path, plan, ckpt) == {f: n for f, n in plan.counts.items() if n}


E = "backbone.layers.1.mixer.experts"


def _swap_experts(t):
    for suffix in ("weight", "weight_scale", "input_scale"):
        a, b = f"{E}.0.up_proj.{suffix}", f"{E}.1.up_proj.{suffix}"
        t[a], t[b] = t[b], t[a]


def _set(name, value):
    def edit(t):
        t[name] = value(t[name])
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{E}.3.down_proj.input_scale"), "missing backbone.layers.1.mixer.experts.3.down_proj.input_scale"),
    (lambda t: t.update({"backbone.layers.0.mixer.conv1d.input_scale": torch.ones(())}), "unexpected tensor"),
    (_set("backbone.layers.0.mixer.out_proj.weight", lambda w: w.float()), "is F32"),
    (_set("backbone.layers.0.mixer.in_proj.input_scale", lambda s: s * 0), "non-finite or non-positive"),
    (_set("backbone.norm_f.weight", lambda w: w * 2), "differs from the source"),
    (_set("backbone.layers.1.mixer.gate.weight", lambda w: w.to(torch.bfloat16)), "is BF16"),
    (_swap_experts, "relative error"),
    (_set("backbone.layers.4.mixer.shared_experts.up_proj.weight_scale", lambda s: s * 4), "relative error"),
])
def test_tampered_artifacts_are_refused(fp8, tmp_path, edit, message):
    path, plan, ckpt = _tampered(fp8, tmp_path, edit)
    with pytest.raises(GateFailed) as e:
        verify_tensors(path, plan, ckpt)
    assert message in str(e.value) and e.value.exit_code == 1


@pytest.fixture(scope="module")
def nvfp4(quantized, tiny_dir):
    art = quantized["nvfp4"]
    ckpt = open_checkpoint(str(tiny_dir))
    return art["path"], make_plan(ckpt.arch, recipes.load("nvfp4")), ckpt


def _code(code):
    def edit(s):
        s = s.clone()
        s.view(torch.uint8).view(-1)[3] = code
        return s
    return edit


@pytest.mark.parametrize("code", [0x00, 0x7F, 0xB8])            # zero, NaN, -1.0
def test_nvfp4_block_scales_that_are_zero_nan_or_negative_are_refused(nvfp4, tmp_path, code):
    """The self-check reads E4M3 block scales by their codes (formats.e4m3_all_positive_finite)."""
    assert verify_tensors(*nvfp4)
    path, plan, ckpt = _tampered(nvfp4, tmp_path, _set(f"{E}.2.up_proj.weight_scale", _code(code)))
    with pytest.raises(GateFailed) as e:
        verify_tensors(path, plan, ckpt)
    assert "up_proj.weight_scale has non-finite or non-positive values" in str(e.value)


def test_self_check_reads_rows_of_quantized_weights_and_opens_each_shard_once(fp8, monkeypatch):
    """Work not done twice: no quantized weight is read whole (neither the packed one nor its source), and each
    output and source shard is opened once."""
    import safetensors

    from omniq.export import hf_checkpoint
    from omniq.model import checkpoint as ck

    path, plan, ckpt = fp8
    whole, opened = [], []
    real_get = ck.TensorReader.get
    real_open = safetensors.safe_open

    def get(self, name):
        whole.append(name)
        return real_get(self, name)

    class Handle:
        def __init__(self, f, *a, **k):
            opened.append(str(f))
            self._h = real_open(f, *a, **k)

        def get_tensor(self, name):
            whole.append(name)
            return self._h.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self._h, attr)

    real_fd = ck.TensorReader._fd

    def fd(self, f):                     # the source shards: TensorReader's own file descriptors
        if f not in self._fds:
            opened.append(str(f))
        return real_fd(self, f)

    monkeypatch.setattr(ck.TensorReader, "get", get)
    monkeypatch.setattr(ck.TensorReader, "_fd", fd)
    monkeypatch.setattr(safetensors, "safe_open", Handle)
    counts = hf_checkpoint.verify_tensors(path, plan, ckpt)
    assert counts["fp8"] == len(plan.quantized)
    weights = {f"{lin.name}.weight" for lin in plan.quantized}
    assert not weights & set(whole)
    assert len(opened) == len(set(opened))
    assert {str(f) for f in ckpt.weight_files} <= set(opened)        # the source was read, each shard opened once


def test_passthrough_comparison_is_bit_for_bit():
    """The self-check compares passthrough tensors by their bits: the sign of zero and a changed NaN payload
    differ, equal bits match whatever their alignment (odd byte counts and offsets included)."""
    import torch

    from omniq.export.hf_checkpoint import _same_bits

    a = torch.randn(7, 5, dtype=torch.bfloat16)
    assert _same_bits(a, a.clone()) and _same_bits(a[:, 1:], a[:, 1:].clone())
    assert not _same_bits(a, a.clone().mul_(1.01)) and not _same_bits(a, a.float())
    assert not _same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan = torch.tensor([float("nan")])
    assert _same_bits(nan, nan.clone())
    assert not _same_bits(nan, (nan.view(torch.int32) | 1).view(torch.float32))


def test_what_the_export_compared_as_it_wrote_is_not_read_again(fp8, monkeypatch):
    """`checked` (streamed.WriteCheck's names): those weights' source rows and those passthrough tensors are not
    read again by the final self-check; the rest of it still runs (a tampered scale is still refused)."""
    from omniq.export.hf_checkpoint import expected_tensors
    from omniq.model import checkpoint as ck

    path, plan, ckpt = fp8
    expected = expected_tensors(plan)
    weights = {n for n, e in expected.items() if e.kind == "weight"}
    outside = {ckpt.arch.embedding_weight, *ckpt.arch.final_tensors}
    rows, whole = [], []
    real_rows, real_get = ck.TensorReader.rows, ck.TensorReader.get
    monkeypatch.setattr(ck.TensorReader, "rows", lambda self, n, r: rows.append(n) or real_rows(self, n, r))
    monkeypatch.setattr(ck.TensorReader, "get", lambda self, n, out=None: whole.append(n) or real_get(self, n, out))
    assert verify_tensors(path, plan, ckpt, checked=weights | outside)
    assert rows == [] and not outside & set(whole) and whole      # the layers' own passthrough tensors still read
    assert verify_tensors(path, plan, ckpt) and set(rows) == weights and outside <= set(whole)
