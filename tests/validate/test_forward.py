"""The forward validate runs for both models is right: against a token-by-token Mamba-2 recurrence past
chunk_size, and against transformers' NemotronHForCausalLM where transformers' CPU path is right."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from omniq.model import forward
from omniq.validate.artifact import read_artifact


def _rows(tokenizer, n_tokens: int) -> torch.Tensor:
    from omniq.calib import docstrings

    ids: list[int] = []
    for doc in docstrings.texts("eval"):
        ids += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= 2 * n_tokens:
            break
    return torch.tensor(ids[: 2 * n_tokens]).view(2, n_tokens)


@pytest.fixture(scope="module")
def reference():
    return read_artifact("tiny")


@pytest.fixture(scope="module")
def transformers_model(tiny_dir):
    from transformers import NemotronHForCausalLM

    return NemotronHForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_forward_matches_token_by_token_recurrence_past_chunk_size(reference):
    L = reference.arch.chunk_size * 2 + 22          # two full chunks and a ragged third
    x = _rows(reference.tokenizer, L)
    with torch.inference_mode():
        chunked = forward.logits(reference.arch, reference.weights, x)
        recurrent = forward.logits(reference.arch, reference.weights, x, recurrent=True)
    assert _rel(chunked, recurrent) < 1e-5


def test_forward_matches_transformers_below_chunk_size(reference, transformers_model):
    x = _rows(reference.tokenizer, 40)              # shorter than chunk_size, where transformers' CPU path is right
    # transformers' CPU path clamps dt at time_step_min; the CUDA kernels (and omniq) use time_step_limit
    arch = replace(reference.arch, time_step_limit=(0.001, float("inf")))
    with torch.inference_mode():
        theirs = transformers_model(input_ids=x, use_cache=False).logits
        ours = forward.logits(arch, reference.weights, x)
    assert _rel(ours, theirs) < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_transformers_cpu_path_is_wrong_past_chunk_size_and_ours_is_not(reference, transformers_model):
    """Why validate does not use transformers on CPU: past chunk_size its torch_forward drifts away from the
    recurrence (transformers issue #47246); omniq's chunked scan stays on it."""
    cs = reference.arch.chunk_size
    x = _rows(reference.tokenizer, cs * 2 + 22)
    arch = replace(reference.arch, time_step_limit=(0.001, float("inf")))
    with torch.inference_mode():
        theirs = transformers_model(input_ids=x, use_cache=False).logits
        truth = forward.logits(arch, reference.weights, x, recurrent=True)
        ours = forward.logits(arch, reference.weights, x)
    assert _rel(theirs[:, :cs], truth[:, :cs]) < 1e-4          # right inside the first chunk
    assert _rel(theirs[:, cs:], truth[:, cs:]) > 1e-2          # measured: 10 % of the logits' scale
    assert _rel(ours, truth) < 1e-5


class _EachCall:
    """A hook doing what `inner` does, call by call, without `input_key`: the forward then quantizes every
    expert's (and q / k / v's) input in its own call, the definition the shared quantization must equal."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, name, x):
        return self.inner(name, x)


@pytest.mark.parametrize("differ", [None, "experts.3.down_proj", "shared_experts.up_proj", "k_proj"])
def test_input_quantized_once_equals_quantizing_each_linear(reference, differ):
    """forward.moe / attention quantize a layer input once for all linears whose `input_key` is equal (and
    each alone where it is not): bit-identical to quantizing each linear's input in its own call."""
    from omniq.validate.artifact import EngineLinear, Layer
    from omniq.validate.stream import layer_names

    arch = reference.arch
    x = torch.randn(2, 96, arch.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in (arch.kinds.index("E"), arch.kinds.index("*")):
        u = reference.unit(layer_names(reference, i), keep_float32_below=2**40)
        modules = [n[: -len(".weight")] for n in u if n.endswith(".weight") and "norm" not in n and "gate" not in n]
        layers = {m: Layer(m, "bf16", "nvfp4", torch.tensor(0.002 if differ and m.endswith(differ) else 0.001))
                  for m in modules}
        engine = EngineLinear(layers, u)
        with torch.inference_mode():
            once = forward.decoder_layer(arch, u, i, x, linear=engine)
            each = forward.decoder_layer(arch, u, i, x, linear=_EachCall(engine))
            unquantized = forward.decoder_layer(arch, u, i, x)
        assert torch.equal(once, each), (i, differ)
        assert not torch.equal(once, unquantized)
