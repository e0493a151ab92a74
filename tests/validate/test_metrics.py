"""metrics.compare_logits (the streamed validate's scoring, in cache-sized float64 row blocks) gives the same
per-token numbers and sums as Comparison.add on the whole chunk."""

from __future__ import annotations

import torch

from omniq.validate import metrics


def test_compare_logits_equals_scoring_the_whole_chunk(monkeypatch):
    monkeypatch.setattr(metrics, "ROW_BLOCK_BYTES", 8 * 1000 * 64)      # 64 rows a block: 5 blocks, one ragged
    g = torch.Generator().manual_seed(0)
    n, vocab = 300, 1000
    ref = torch.randn(n, vocab, generator=g) * 4
    cands = {"a": ref + 0.05 * torch.randn(n, vocab, generator=g), "b": ref + torch.randn(n, vocab, generator=g)}
    targets = torch.randint(0, vocab, (n,), generator=g)
    positions = torch.arange(n) % 37
    blocked = {s: metrics.Comparison() for s in cands}
    metrics.compare_logits(ref, cands, targets, positions, blocked)
    for s, logits in cands.items():
        whole = metrics.Comparison()
        whole.add(ref, logits, targets, positions)
        b = blocked[s]
        assert b.tokens == whole.tokens == n
        assert torch.equal(torch.cat(b.kl), torch.cat(whole.kl))
        assert torch.equal(torch.cat(b.agree), torch.cat(whole.agree))
        assert torch.equal(torch.cat(b.positions), torch.cat(whole.positions))
        assert torch.allclose(torch.stack(b.nll), torch.stack(whole.nll), rtol=1e-14, atol=0)
        assert b.summary(position_buckets=True) == whole.summary(position_buckets=True)
    assert not torch.equal(torch.cat(blocked["a"].kl), torch.cat(blocked["b"].kl))
