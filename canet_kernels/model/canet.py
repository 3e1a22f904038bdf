"""CANet: router + weight-sliced supernet, the CANet losses and a compute
budget.

Losses (weights in CANetConfig):
  ce       next-item cross-entropy at every position (padding ignored)
  guide    soft labels per route axis (embedding width, hidden width, depth)
           from whether the smallest sub-network ranks the sequence's last
           target in its top-k: a hit pushes the router's marginal of each
           axis towards small choices, a miss towards large ones
  uniform  KL(batch-mean router distribution || uniform over routes)
  budget   relu(E[FLOP ratio] - target), the expectation under the router's
           softmax of each route's analytic FLOP ratio (route / max route)

Inference routes are argmax(logits - cost_bias * FLOP ratio). The budget loss
constrains the *soft* distribution seen in training, but the deployed argmax
can sit far above it (near-uniform softmax, argmax on the large routes), so
`cost_bias` (a buffer, 0 by default, saved with the weights) is set after
training on validation users by `calibrate_cost_bias` to the smallest value
whose argmax routes meet the FLOP target (optionally a negative one, so that
routes below the target spend the budget).

Router gradient: the routes are hard (straight-through Gumbel-softmax one-hot
in training), so each sample's final hidden state is multiplied by the
straight-through weight of its chosen route. The value is 1 in the forward
pass; in the backward pass d(loss)/d(weight) reaches the router logits
through the soft Gumbel probabilities. That signal says whether scaling
the chosen route's output up would lower the loss, not how the route compares
with the others (those were not run), so on its own it tends to reinforce
whatever is chosen; the guide, uniform and budget losses act on the router's
softmax directly and carry the route preferences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..routing import gather_tokens
from .config import CANetConfig
from .router import Router
from .supernet import Supernet

PATHS = ("routed", "masked")


@dataclass
class Routing:
    routes: torch.Tensor              # [B] route ids
    gate: torch.Tensor | None         # [B] straight-through weight (1 in forward)
    logits: torch.Tensor | None       # [B, R] router logits


class CANet(nn.Module):
    def __init__(self, cfg: CANetConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.net = Supernet(cfg)
        table = torch.tensor(cfg.routes(), dtype=torch.int64)            # [R, 3]
        self.register_buffer("route_emb", table[:, 0].clone(), persistent=False)
        self.register_buffer("route_hid", table[:, 1].clone(), persistent=False)
        self.register_buffer("route_depth", table[:, 2].clone(), persistent=False)
        self.register_buffer("route_ratio", torch.tensor(cfg.route_flop_ratios(),
                                                         dtype=torch.float64),
                             persistent=False)
        # inference-time price of compute per unit of FLOP ratio (see module doc)
        self.register_buffer("cost_bias", torch.zeros((), dtype=torch.float64))

    # ------------------------------------------------------------ routing --
    def route(self, items, lengths) -> Routing:
        """Straight-through hard Gumbel-softmax in training, argmax at
        inference (deterministic)."""
        self._check_batch(items, lengths)
        logits = self.router(items, lengths)
        if self.training:
            g = F.gumbel_softmax(logits, tau=self.cfg.tau, hard=True)   # [B, R]
            routes = g.argmax(-1)
            gate = g.gather(1, routes[:, None]).squeeze(1)
            return Routing(routes, gate, logits)
        return Routing(self.pick(logits), None, logits)

    def pick(self, logits, cost_bias=None):
        """Deterministic inference routes: argmax of the logits less the
        price of each route's FLOP ratio."""
        c = self.cost_bias if cost_bias is None else cost_bias
        if float(c) == 0.0:
            return logits.argmax(-1)
        adj = logits.double() - float(c) * self.route_ratio[None]
        return adj.argmax(-1)

    @torch.no_grad()
    def calibrate_cost_bias(self, logits, target: float, iters: int = 50,
                            spend: bool = False) -> float:
        """Sets `cost_bias` from `logits` [N, R] (router outputs of held-out
        users, not test users) and returns it: the smallest value >= 0 whose
        routes have mean FLOP ratio <= target. With `spend`, a router whose
        own argmax stays below the target gets the most negative bias that
        still meets it instead, so the routes use the budget (towards larger
        routes in the router's own order). The chosen route's FLOP ratio does
        not increase with the bias, so bisection applies."""
        ratio = self.route_ratio

        def mean_ratio(c):
            return float(ratio[self.pick(logits, c)].mean())

        def bisect(lo, hi):  # mean_ratio(lo) > target >= mean_ratio(hi)
            for _ in range(iters):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if mean_ratio(mid) <= target else (mid, hi)
            return hi

        if mean_ratio(0.0) > target:
            hi = 1.0
            while mean_ratio(hi) > target and hi < 1e6:
                hi *= 2
            c = bisect(0.0, hi)
        elif spend:
            lo = -1.0
            while mean_ratio(lo) <= target and lo > -1e6:
                lo *= 2
            c = bisect(lo, 0.0) if mean_ratio(lo) > target else lo
        else:
            c = 0.0
        self.cost_bias.fill_(c)
        return c

    def fixed_routes(self, batch: int, route: int | None = None, device=None):
        """Every sample on one route (default: the max, i.e. the dense model)."""
        r = self.cfg.max_route if route is None else route
        return torch.full((batch,), r, dtype=torch.int64, device=device)

    def _check_batch(self, items, lengths):
        B, L = items.shape
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if L > self.cfg.max_len:
            raise ValueError(f"sequences of {L} positions exceed max_len "
                             f"{self.cfg.max_len}; keep the last max_len items")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > L):
            raise ValueError(f"lengths must lie in [1, {L}]")

    def _route_args(self, routes):
        return self.route_emb[routes], self.route_hid[routes], self.route_depth[routes]

    # ------------------------------------------------------------ forward --
    def hidden(self, items, lengths, routes, gate=None, path="routed", dropout=True):
        """Final hidden states as a padded batch [B, L, D] in the caller's
        order (zeros at padding on the routed path)."""
        self._check_batch(items, lengths)
        e, d, depth = self._route_args(routes)
        if path == "masked":
            return self.net.encode_masked(items, lengths, e, d, depth, gate, dropout)
        _check_path(path)
        h, plan = self.net.encode_routed(items, lengths, e, d, depth, gate, dropout)
        out = functional.unpack(h, plan.lengths, items.shape[1])
        return out[plan.inverse]

    def last_scores(self, items, lengths, routes, gate=None, path="routed",
                    dropout=True):
        """Full-ranking scores of each sample's last position [B, n_items + 1]
        in the caller's order (item 0, the padding, is scored too)."""
        self._check_batch(items, lengths)
        e, d, depth = self._route_args(routes)
        if path == "masked":
            h = self.net.encode_masked(items, lengths, e, d, depth, gate, dropout)
            last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
            return self.net.score_masked(last)
        _check_path(path)
        h, plan = self.net.encode_routed(items, lengths, e, d, depth, gate, dropout)
        return self.net.score_last_routed(h, plan)[plan.inverse]

    def forward(self, items, lengths, routes=None, path="routed"):
        """Inference: (scores [B, n_items + 1], routes [B]). Routes come from
        the router (argmax) unless given."""
        if routes is None:
            routes = self.route(items, lengths).routes
        return self.last_scores(items, lengths, routes, path=path), routes

    @torch.no_grad()
    def recommend(self, items, lengths, k=10, routes=None, path="routed",
                  mask_seen=False):
        """Top-k item ids [B, k] (and scores, routes) for each sequence."""
        scores, routes = self(items, lengths, routes, path)
        scores[:, 0] = float("-inf")
        if mask_seen:
            scores.scatter_(1, items, float("-inf"))
        top = scores.topk(min(k, self.cfg.n_items), dim=-1)
        return top.indices, top.values, routes

    # --------------------------------------------------------------- loss --
    def loss(self, items, lengths, targets, routes=None, path="routed"):
        """items, targets [B, L] right-padded (targets[b, t] is the item after
        items[b, t]; 0 = ignore), lengths [B]. With `routes` given the router
        is bypassed and only the CE is returned.
        Returns (total loss, dict of floats)."""
        _check_path(path)
        self._check_batch(items, lengths)
        cfg = self.cfg
        routing = None
        if routes is None:
            routing = self.route(items, lengths)
            routes = routing.routes
        gate = routing.gate if routing is not None else None
        e, d, depth = self._route_args(routes)
        if path == "routed":
            h, plan = self.net.encode_routed(items, lengths, e, d, depth, gate)
            logits = self.net.score_routed(h, plan.cu_seqlens, plan.widths)  # [T, N+1]
            ce = F.cross_entropy(logits, gather_tokens(targets, lengths, plan),
                                 ignore_index=0)
        else:
            h = self.net.encode_masked(items, lengths, e, d, depth, gate)
            logits = self.net.score_masked(h)                              # [B, L, N+1]
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                 ignore_index=0)
        ratio = self.route_ratio[routes].mean()
        stats = {"ce": ce.item(), "flop_ratio": ratio.item()}
        total = ce
        if routing is None or routing.logits is None:
            stats["loss"] = total.item()
            return total, stats

        lg = routing.logits
        probs = torch.softmax(lg.float() if lg.dtype in (torch.float16, torch.bfloat16)
                              else lg, dim=-1)                             # [B, R]
        hit = self._smallest_hits(items, lengths, targets, path)
        guide = self.guide_loss(probs, hit)
        uniform = self.uniform_loss(probs)
        exp_ratio = (probs * self.route_ratio.to(probs.dtype)).sum(-1).mean()
        budget = (torch.relu(exp_ratio - cfg.flop_target) if cfg.flop_target is not None
                  else exp_ratio.new_zeros(()))
        total = (ce + cfg.guide_weight * guide.to(ce.dtype)
                 + cfg.uniform_weight * uniform.to(ce.dtype)
                 + cfg.budget_weight * budget.to(ce.dtype))
        stats.update(guide=guide.item(), uniform=uniform.item(),
                     budget=budget.item(), exp_ratio=exp_ratio.item(),
                     small_hit=hit.float().mean().item(), loss=total.item())
        return total, stats

    @torch.no_grad()
    def _smallest_hits(self, items, lengths, targets, path):
        """[B] bool: the smallest sub-network ranks the last target in its top-k."""
        B = items.shape[0]
        small = self.fixed_routes(B, 0, items.device)
        s = self.last_scores(items, lengths, small, path=path, dropout=False)
        s[:, 0] = float("-inf")
        t = targets[torch.arange(B, device=items.device), lengths - 1]
        ts = s.gather(1, t[:, None])
        rank = (s > ts).sum(-1)
        return rank < self.cfg.guide_topk

    def guide_loss(self, probs, hit):
        """Cross-entropy between per-axis soft labels and the router's
        marginals. probs [B, R]; hit [B] bool."""
        cfg = self.cfg
        nE, nD, nL = len(cfg.emb_widths), len(cfg.hidden_widths), len(cfg.depths)
        p = probs.view(-1, nE, nD, nL)
        loss = probs.new_zeros(())
        for axis, k in ((1, nE), (2, nD), (3, nL)):
            dims = tuple(a for a in (1, 2, 3) if a != axis)
            marg = p.sum(dims)                                             # [B, k]
            up = torch.arange(1, k + 1, dtype=probs.dtype, device=probs.device)
            up = up / up.sum()
            target = torch.where(hit[:, None], up.flip(0)[None], up[None])
            loss = loss - (target * torch.log(marg.clamp_min(1e-9))).sum(-1).mean()
        return loss

    @staticmethod
    def uniform_loss(probs):
        """KL(mean router distribution || uniform)."""
        R = probs.shape[-1]
        mean = probs.mean(0)
        return (mean * torch.log((mean * R).clamp_min(1e-12))).sum()


def _check_path(path):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
