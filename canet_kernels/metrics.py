"""Full-ranking metrics over all items, as tensor ops over a batch of users.

scores [B, n_items + 1]: column 0 is the padding id and is never ranked.
targets [B] (one held-out item, leave-one-out) or [B, M] (several relevant
items, 0 = none).

Single target: rank = number of other items scoring >= the target (ties
count against the target, so a constant model scores 0, not 1);
HR@K = Recall@K = [rank < K], NDCG@K = 1 / log2(rank + 2) if rank < K.
Several targets: each relevant item is ranked as a single target is (every
other item scoring >= it counts ahead, other relevant items included), a hit
is rank < K; Recall@K = hits / #relevant, HR@K = [hits > 0],
NDCG@K = sum of 1 / log2(rank + 2) over hits / ideal DCG@K.
"""
from __future__ import annotations

import torch

METRICS = ("recall", "ndcg", "hr")


def mask_scores(scores, seen=None):
    """A copy of scores with the padding column and, optionally, each user's
    seen items ([B, H] ids, 0-padded) set to -inf."""
    s = scores.clone()
    s[:, 0] = float("-inf")
    if seen is not None:
        s.scatter_(1, seen.to(torch.int64), float("-inf"))
    return s


def target_rank(scores, targets):
    """0-based rank of each target [B] among all items (pessimistic on ties)."""
    t = scores.gather(1, targets[:, None])                           # [B, 1]
    ahead = (scores >= t).sum(-1) - 1                                 # exclude itself
    return ahead


def full_ranking(scores, targets, ks=(10, 20), seen=None):
    """Per-user metric values {f"{metric}@{k}": [B] float} over all items."""
    s = mask_scores(scores, seen)
    if targets.dim() == 1:
        return rank_metrics(target_rank(s, targets).to(torch.float64), ks)
    out = {}
    rel = targets > 0                                                # [B, M]
    n_rel = rel.sum(-1).to(torch.float64)
    # Ranks by counting, not by positions in a topk list: topk orders tied
    # items arbitrarily, so a target tied with others could land in the top K
    # (all-zero scores gave HR@5 = 1 for [[5]] and 0 for [5]). Counting among
    # the largest max(ks) + 1 scores gives every rank up to max(ks) exactly
    # and larger ones as max(ks): enough for rank < k with any k in ks.
    t = s.gather(1, targets.to(torch.int64))                         # [B, M]
    top = s.topk(min(max(ks) + 1, s.shape[1]), dim=-1).values        # [B, K+1]
    rank = ((top[:, None, :] >= t[:, :, None]).sum(-1) - 1).to(torch.float64)
    disc = 1.0 / torch.log2(torch.arange(max(ks), dtype=torch.float64,
                                         device=s.device) + 2)       # [K]
    for k in ks:
        h = ((rank < k) & rel).to(torch.float64)                     # [B, M]
        n_hit = h.sum(-1)
        out[f"recall@{k}"] = n_hit / n_rel.clamp_min(1)
        out[f"hr@{k}"] = (n_hit > 0).to(torch.float64)
        ideal = torch.cumsum(disc[:k], 0)                            # ideal DCG by #rel
        idcg = ideal[(n_rel.clamp(1, k) - 1).long()]
        out[f"ndcg@{k}"] = (h / torch.log2(rank + 2)).sum(-1) / idcg
    return out


def rank_metrics(rank, ks=(10, 20)):
    """Per-user metric values of single targets from their 0-based ranks
    [B] (float64): what full_ranking gives for targets [B]."""
    out = {}
    for k in ks:
        hit = (rank < k).to(torch.float64)
        out[f"recall@{k}"] = hit
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(rank + 2)
    return out


class MetricAccumulator:
    """Sums per-user values batch by batch; `result()` gives the means."""

    def __init__(self):
        self.sums: dict = {}
        self.count = 0

    def update(self, values: dict):
        n = None
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
            n = v.shape[0]
        self.count += n or 0

    def result(self) -> dict:
        return {k: v / max(self.count, 1) for k, v in sorted(self.sums.items())}


def format_metrics(m: dict, keys=None) -> str:
    keys = keys or [f"{name}@{k}" for k in (10, 20) for name in METRICS]
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)

