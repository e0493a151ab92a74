"""The Mamba-2 scan used everywhere on CPU is right at every sequence length."""

import torch

from omniq.model.mamba2 import mixer_scan, ssd_chunked, ssd_recurrent


def _inputs(L, b=2, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = torch.rand(b, L, h, generator=gen) * 0.3
    A = -torch.rand(h, generator=gen) * 2 - 0.05
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


def test_chunked_matches_recurrence_past_chunk_size():
    for L in (1, 7, 32, 33, 150):  # below, at and well past chunk_size 32, with a ragged tail
        args = _inputs(L)
        y1, s1 = ssd_chunked(*args, chunk_size=32)
        y2, s2 = ssd_recurrent(*args)
        assert y1.shape == y2.shape
        rel = ((y1 - y2).abs().max() / y2.abs().max()).item()
        assert rel < 1e-5, (L, rel)
        assert torch.allclose(s1, s2, rtol=1e-4, atol=1e-4)


def test_chunked_carries_initial_state():
    args = _inputs(70)
    state0 = torch.randn(2, 4, 8, 16)
    y1, _ = ssd_chunked(*args, chunk_size=16, initial_state=state0)
    y2, _ = ssd_recurrent(*args, initial_state=state0)
    assert ((y1 - y2).abs().max() / y2.abs().max()).item() < 1e-5


def test_splitting_a_sequence_in_two_equals_one_pass():
    x, dt, A, B, C, D = _inputs(90)
    y, _ = ssd_chunked(x, dt, A, B, C, D, chunk_size=32)
    ya, sa = ssd_chunked(x[:, :50], dt[:, :50], A, B[:, :50], C[:, :50], D, chunk_size=32)
    yb, _ = ssd_chunked(x[:, 50:], dt[:, 50:], A, B[:, 50:], C[:, 50:], D, chunk_size=32, initial_state=sa)
    assert torch.allclose(torch.cat([ya, yb], 1), y, rtol=1e-4, atol=1e-4)


def test_mixer_scan_chunked_equals_recurrent():
    gen = torch.Generator().manual_seed(1)
    heads, hd, g, n, k = 4, 8, 2, 8, 4
    inner = heads * hd
    conv_dim = inner + 2 * g * n
    zxbcdt = torch.randn(1, 100, inner + conv_dim + heads, generator=gen)
    params = dict(conv_weight=torch.randn(conv_dim, 1, k, generator=gen) * 0.5,
                  conv_bias=torch.randn(conv_dim, generator=gen) * 0.1,
                  A_log=torch.log(torch.arange(1, heads + 1).float()), D=torch.ones(heads),
                  dt_bias=torch.randn(heads, generator=gen) * 0.1 - 2, norm_weight=torch.ones(inner))
    kw = dict(num_heads=heads, head_dim=hd, n_groups=g, state_size=n, chunk_size=16, eps=1e-5)
    a = mixer_scan(zxbcdt, *params.values(), **kw)
    b = mixer_scan(zxbcdt, *params.values(), **kw, recurrent=True)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
