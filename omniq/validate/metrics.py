"""How far a candidate's next-token distributions are from the reference's, and how far its weights are.

Per evaluated token t (every position of every row, the target being the next token):
    KL(ref || cand)_t = sum_v p_ref(v) (log p_ref(v) - log p_cand(v))      (nats, computed in float64)
    top-1 agreement    = mean of [argmax p_ref == argmax p_cand]
    perplexity         = exp(mean negative log-likelihood of the target), for each model; ratio cand / ref.
Reported: mean and 95th percentile of the per-token KL, top-1 agreement, both perplexities and their ratio,
the token count, optionally the same split by position in the row (Mamba state drift shows as a KL that
grows with position), and per-layer weight SQNR = 10 log10(sum w_ref^2 / sum (w_ref - w_cand)^2) dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

POSITION_BUCKETS = (0, 128, 512, 2048)
ROW_BLOCK_BYTES = 2 * 2**20    # `compare_logits` on the CPU: float64 rows worked on at once (cache-sized)


def bucket_names(seq_len: int, edges=POSITION_BUCKETS) -> list[tuple[str, int, int]]:
    """Position buckets that overlap [0, seq_len): ("0-128", 0, 128), ..., the last one open-ended."""
    out = []
    bounds = list(edges) + [None]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo >= seq_len:
            break
        name = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        out.append((name, lo, seq_len if hi is None else min(hi, seq_len)))
    return out


@dataclass
class Comparison:
    """Running sums over evaluated tokens, kept on the logits' device until `summary`."""

    kl: list[torch.Tensor] = field(default_factory=list)          # per-token KL, float64, per chunk
    agree: list[torch.Tensor] = field(default_factory=list)       # per-token bool
    positions: list[torch.Tensor] = field(default_factory=list)   # per-token position in its row
    nll: list[torch.Tensor] = field(default_factory=list)         # per chunk: (reference, candidate) sums
    tokens: int = 0

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor,
            positions: torch.Tensor | None = None) -> None:
        """logits (b, L, vocab) of both models on the same input rows; targets (b, L) the next tokens (or
        (n, vocab) / (n,) flattened chunks with their `positions` in the row)."""
        lr = log_probs(ref_logits)
        self.add_log_probs(lr, log_probs(cand_logits), targets, positions)

    def add_log_probs(self, lr: torch.Tensor, lc: torch.Tensor, targets: torch.Tensor,
                      positions: torch.Tensor | None = None, pr: torch.Tensor | None = None) -> None:
        """The same from float64 log-probabilities (n, vocab): a reference's (and its probabilities `pr`,
        lr.exp()), computed once, can serve several candidates."""
        if positions is None:
            b, L = targets.shape
            positions = torch.arange(L, device=lr.device).repeat(b)
        t = targets.reshape(-1, 1)
        self.add_scores(((lr.exp() if pr is None else pr) * (lr - lc)).sum(-1).clamp_min(0.0),
                        lr.argmax(-1) == lc.argmax(-1), positions,
                        torch.stack([-lr.gather(1, t).sum(), -lc.gather(1, t).sum()]))

    def add_scores(self, kl: torch.Tensor, agree: torch.Tensor, positions: torch.Tensor,
                   nll: torch.Tensor) -> None:
        """Per-token KL (float64) and top-1 agreement of n tokens, their positions in the row, and the
        (reference, candidate) negative log-likelihood sums over them."""
        self.kl.append(kl)
        self.agree.append(agree)
        self.positions.append(positions.reshape(-1))
        self.nll.append(nll)
        self.tokens += kl.shape[0]

    @classmethod
    def merged(cls, parts: list["Comparison"]) -> "Comparison":
        """One comparison over the tokens of several (the text set over its reasoning on / off splits)."""
        out = cls()
        for p in parts:
            out.kl += p.kl
            out.agree += p.agree
            out.positions += p.positions
            out.nll += p.nll
            out.tokens += p.tokens
        return out

    @property
    def nll_ref(self) -> float:
        return sum(x[0].item() for x in self.nll)

    @property
    def nll_cand(self) -> float:
        return sum(x[1].item() for x in self.nll)

    def summary(self, position_buckets: bool = False) -> dict:
        if not self.tokens:
            raise ValueError("no tokens were evaluated")
        kl = torch.cat(self.kl).cpu()
        agree = torch.cat(self.agree).cpu()
        ppl_ref = math.exp(self.nll_ref / self.tokens)
        ppl_cand = math.exp(self.nll_cand / self.tokens)
        out = {
            "kl_mean": kl.mean().item(),
            "kl_p95": torch.quantile(kl, 0.95).item(),
            "top1_agreement": agree.double().mean().item(),
            "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand,
            "ppl_ratio": ppl_cand / ppl_ref,
            "tokens": self.tokens,
        }
        if position_buckets:
            pos = torch.cat(self.positions).cpu()
            seq_len = int(pos.max().item()) + 1
            out["positions"] = {}
            for name, lo, hi in bucket_names(seq_len):
                m = (pos >= lo) & (pos < hi)
                out["positions"][name] = {"kl_mean": kl[m].mean().item(),
                                          "kl_p95": torch.quantile(kl[m], 0.95).item(),
                                          "top1_agreement": agree[m].double().mean().item(),
                                          "tokens": int(m.sum().item())}
        return out


def compare_logits(ref_logits: torch.Tensor, cand_logits: dict[str, torch.Tensor], targets: torch.Tensor,
                   positions: torch.Tensor, into: dict[str, Comparison]) -> None:
    """Add float32 logits (n, vocab) of every candidate in `cand_logits` against the reference's, on the same
    n tokens (`targets` (n,), `positions` (n,)), to the Comparison of the same name in `into`: the same
    per-token numbers as `Comparison.add` (float64 log-softmax of each row, KL, argmax, target
    log-likelihood), and per candidate the same sums over the n tokens. On the CPU the rows are worked on a
    block of `ROW_BLOCK_BYTES` float64 rows at a time, so the float64 temporaries stay in the cache (the whole
    chunk at once streams several (n, vocab) float64 arrays through memory per candidate, more time than the
    lm_head's matmul); the reference's log-probabilities, probabilities and argmax are computed once for
    every candidate."""
    n, vocab = ref_logits.shape
    dev = ref_logits.device
    rows = max(1, ROW_BLOCK_BYTES // (8 * vocab)) if dev.type == "cpu" else max(n, 1)
    f64 = torch.float64
    kl = {s: torch.empty(n, dtype=f64, device=dev) for s in cand_logits}
    agree = {s: torch.empty(n, dtype=torch.bool, device=dev) for s in cand_logits}
    picked = {s: torch.empty(n, 1, dtype=f64, device=dev) for s in [None, *cand_logits]}    # None: reference
    t = targets.reshape(-1, 1)
    for a in range(0, n, rows):
        b = slice(a, a + rows)
        lr = log_probs(ref_logits[b])
        pr, top = lr.exp(), lr.argmax(-1)
        picked[None][b] = lr.gather(1, t[b])
        for s, logits in cand_logits.items():
            lc = log_probs(logits[b])
            kl[s][b] = (pr * (lr - lc)).sum(-1).clamp_min(0.0)
            agree[s][b] = top == lc.argmax(-1)
            picked[s][b] = lc.gather(1, t[b])
    ref_nll = -picked[None].sum()
    for s in cand_logits:
        into[s].add_scores(kl[s], agree[s], positions, torch.stack([ref_nll, -picked[s].sum()]))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab) logits -> (n, vocab) float64 log-softmax."""
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)


def sqnr_sums(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """(signal, noise) sums of squares in float64, on the tensors' device (no host copy: `sqnr_from_sums`
    turns them into dB once the run is over)."""
    ref = reference.double()
    return torch.stack([ref.pow(2).sum(), (ref - candidate.double()).pow(2).sum()])


def sqnr_from_sums(sums: torch.Tensor) -> float:
    signal, noise = (float(v) for v in sums.cpu())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of candidate against reference, in dB (inf when identical)."""
    return sqnr_from_sums(sqnr_sums(reference, candidate))


def layers_sqnr(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor],
                modules) -> dict[str, float]:
    """SQNR per module name (`X` for `X.weight`), for the modules given (the candidate's quantized ones)."""
    return {m: sqnr_db(reference[f"{m}.weight"], candidate[f"{m}.weight"]) for m in modules}
