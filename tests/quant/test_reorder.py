"""Channel reordering folded into a checkpoint (omniq.quant.reorder): the same function, values only moved."""

from dataclasses import replace

import pytest
import torch

from omniq.model import forward
from omniq.quant import reorder


@pytest.fixture(scope="module")
def tiny():
    from omniq.validate.artifact import read_artifact

    ref = read_artifact("tiny")
    return ref.arch, {n: ref.weights[n] for n in ref.base_names}


def _random_orders(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    spans = {key: length for entries in reorder.layout(arch).values() for _, _, length, key in entries}
    orders = {}
    for key, length in spans.items():
        if isinstance(key, tuple) and key[0] == "inner":
            hd = arch.mamba_head_dim
            orders[key] = torch.cat([torch.randperm(hd, generator=g) + h * hd for h in range(length // hd)])
        else:
            orders[key] = torch.randperm(length, generator=g)
    return orders


def test_every_span_is_ordered(tiny):
    arch, _ = tiny
    keys = set(_random_orders(arch))
    mamba = arch.layers_of("M")
    assert keys == ({reorder.HIDDEN} | {reorder.inner_key(i) for i in mamba}
                    | {reorder.intermediate_key(lin.name) for lin in arch.linears if lin.role in reorder.UPS})


def test_reordered_tiny_computes_the_same_logits(tiny):
    arch, w = tiny
    orders = _random_orders(arch)
    pw = reorder.permute(arch, w, orders)
    assert set(pw) == set(w)
    for n, t in w.items():
        assert pw[n].shape == t.shape and pw[n].dtype == t.dtype
        assert torch.equal(pw[n].flatten().sort().values, t.flatten().sort().values)     # only moved
    lp = f"{arch.layer_prefix(0)}.mixer"
    assert not torch.equal(pw[f"{lp}.in_proj.weight"], w[f"{lp}.in_proj.weight"])
    assert torch.equal(pw[f"{lp}.A_log"], w[f"{lp}.A_log"])                       # per-head tensors stay
    x = torch.randint(0, arch.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))   # past chunk_size 64
    a, b = forward.logits(arch, w, x), forward.logits(arch, pw, x)
    assert (a - b).abs().max() < 1e-5 * a.abs().max()


@pytest.mark.parametrize("group", ["hidden", "inner", "intermediate"])
def test_each_kind_of_order_alone_keeps_the_function(tiny, group):
    arch, w = tiny
    orders = {k: p for k, p in _random_orders(arch, 1).items()
              if (k == reorder.HIDDEN) == (group == "hidden") and (not isinstance(k, tuple) or k[0] == group)}
    assert orders
    x = torch.randint(0, arch.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    a, b = forward.logits(arch, w, x), forward.logits(arch, reorder.permute(arch, w, orders), x)
    assert (a - b).abs().max() < 1e-5 * a.abs().max()
    # an order applied to one side only is not the same function: the layout's pairing matters
    key = next(iter(orders))
    lay = reorder.layout(arch)
    one = next(n for n, entries in lay.items() if any(e[3] == key for e in entries))
    half = dict(w)
    half[one] = reorder.permute_tensor(lay[one], w[one], {key: orders[key]})
    assert (forward.logits(arch, half, x) - a).abs().max() > 1e-3 * a.abs().max()


def test_tied_embeddings_stay_tied_and_the_same_function(tiny):
    arch, w = tiny
    tied = replace(arch, tie_word_embeddings=True)
    w = {n: t for n, t in w.items() if n != f"{arch.lm_head}.weight"}
    pw = reorder.permute(tied, w, {reorder.HIDDEN: torch.randperm(arch.hidden_size)})
    x = torch.randint(0, arch.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    a, b = forward.logits(tied, w, x), forward.logits(tied, pw, x)
    assert (a - b).abs().max() < 1e-5 * a.abs().max()


def test_bad_orders_are_refused(tiny):
    arch, _ = tiny
    mamba = arch.layers_of("M")[0]
    swap_heads = torch.arange(arch.mamba_inner)
    swap_heads[[0, arch.mamba_head_dim]] = swap_heads[[arch.mamba_head_dim, 0]]
    with pytest.raises(ValueError, match="between Mamba heads"):
        reorder.check(arch, {reorder.inner_key(mamba): swap_heads})
    with pytest.raises(ValueError, match="not a permutation"):
        reorder.check(arch, {reorder.HIDDEN: torch.zeros(arch.hidden_size, dtype=torch.long)})
    with pytest.raises(ValueError, match="not a channel span"):
        reorder.check(arch, {reorder.inner_key(arch.layers_of("E")[0]): torch.arange(arch.mamba_inner)})
    with pytest.raises(ValueError, match="projectors"):
        reorder.check(arch.with_prefix("language_model."), {})
