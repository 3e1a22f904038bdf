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
  distill  (CANetConfig.distill > 0, off by default) the max route's CE plus
           distill * KL(max route's detached softmax || routed softmax) on
           the labelled positions: in-place distillation (slimmable networks)
CANetConfig's router switches (guide_signal, guide_labels, balance, tau_end,
noise_end, budget_shape, router_stats, distill) change one of these at a
time; the defaults are the above, and benchmarks/router_ablation.py
measures each.

Inference routes are argmax(logits - cost_bias * FLOP ratio). The budget loss
constrains the *soft* distribution seen in training, but the deployed argmax
can sit far above it (near-uniform softmax, argmax on the large routes), so
`cost_bias` (a buffer, 0 by default, saved with the weights) is set after
training on validation users by `calibrate_cost_bias` to the smallest value
whose argmax routes meet the FLOP target (optionally a negative one, so that
routes below the target spend the budget). With cfg.rungs = K the routes are
consolidated during training into K fixed rungs (CANetEncoder.set_rungs,
train.consolidate): from then on a user's route is the rung of the FLOP
ratio the router expects for it (or of its history length, with
cfg.rung_signal = "length"), in training and at inference, and only the CE
trains.

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

import torch
import torch.nn.functional as F

from ..routing import gather_tokens
from .config import CANetConfig
from .encoder import CANetEncoder, Routing, _shift  # noqa: F401  (Routing re-exported)
from .supernet import Supernet

PATHS = ("routed", "masked")


class CANet(CANetEncoder):
    """The CANet recommender: router, routed supernet and item scorer."""

    net_cls = Supernet

    def __init__(self, cfg: CANetConfig):
        super().__init__(cfg)
        table = self.net.route_table
        self.register_buffer("route_emb", table[:, 0].clone(), persistent=False)
        self.register_buffer("route_hid", table[:, 1].clone(), persistent=False)
        self.register_buffer("route_depth", table[:, 2].clone(), persistent=False)

    def fixed_routes(self, batch: int, route: int | None = None, device=None):
        """Every sample on one route (default: the max, i.e. the dense model)."""
        r = self.cfg.max_route if route is None else route
        return torch.full((batch,), r, dtype=torch.int64, device=device)

    # ------------------------------------------------------------ forward --
    def hidden(self, items, lengths, routes, gate=None, path="routed", dropout=True,
               left_padded=False):
        """Final hidden states [B, L, D] in the caller's order and padding
        (zeros at padding and beyond each route's width)."""
        _check_path(path)
        x, lengths, left = self.net.layout(items, lengths, None, left_padded)
        r, _ = self.net.resolve_routes(routes, x.shape[0], x.device)
        return self.net.encode(x, lengths, left, r, gate, path, dropout)[0]

    def last_scores(self, items, lengths, routes, gate=None, path="routed",
                    dropout=True, left_padded=False):
        """Full-ranking scores of each sample's last position [B, n_items + 1]
        in the caller's order (item 0, the padding, is scored too)."""
        return self._scores(items, lengths, routes, gate, path, dropout, left_padded)[0]

    def forward(self, items, lengths, routes=None, path="routed", left_padded=False):
        """Inference: (scores [B, n_items + 1], routes [B]). Routes come from
        the router (argmax) unless given."""
        return self._scores(items, lengths, routes, None, path, True, left_padded)

    def _scores(self, items, lengths, routes, gate, path, dropout, left_padded):
        """(last-position scores, routes); routes None = the router's."""
        _check_path(path)
        x, lengths, left = self.net.layout(items, lengths, None, left_padded)
        if routes is None:
            routes = self.route(_shift(x, lengths, True) if left else x, lengths).routes
        r, _ = self.net.resolve_routes(routes, x.shape[0], x.device)
        _, last = self.net.encode(x, lengths, left, r, gate, path, dropout, hidden=False)
        if path == "masked":
            return self.net.score_masked(last), routes
        return self.net.score_rows(last, r.hidden), routes

    @torch.no_grad()
    def recommend(self, items, lengths, k=10, routes=None, path="routed",
                  mask_seen=False, left_padded=False):
        """Top-k item ids [B, k] (and scores, routes) for each sequence."""
        scores, routes = self(items, lengths, routes, path, left_padded)
        scores[:, 0] = float("-inf")
        if mask_seen:
            scores.scatter_(1, items, float("-inf"))
        top = scores.topk(min(k, self.cfg.n_items), dim=-1)
        return top.indices, top.values, routes

    # --------------------------------------------------------------- loss --
    def loss(self, items, lengths, targets, routes=None, path="routed",
             left_padded=False, table=None):
        """Next-item cross-entropy plus, when the router picks the routes,
        its guide, uniform and budget losses. items [B, L]; targets [B, L]
        (targets[b, t] is the item after items[b, t]; 0 = no label) or [B]
        (the item after the last position only, as in RecBole's CE). Only
        labelled positions are scored. With `routes` given the router is
        bypassed and only the CE is returned. `table`: scores against an
        item table held elsewhere (distributed.ShardedTable: `cross_entropy`
        per row, `count_ahead` for the guide's hits) instead of the model's
        own output layer; routed path only. Returns (loss, dict of floats)."""
        _check_path(path)
        x, lengths, left = self.net.layout(items, lengths, None, left_padded)
        B, L = x.shape
        if targets.shape not in ((B, L), (B,)) or targets.is_floating_point():
            raise ValueError(f"targets must be integer [{B}, {L}] or [{B}], got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if left:  # everything below runs right-padded
            x = _shift(x, lengths, True)
            targets = _shift(targets, lengths, True) if targets.dim() == 2 else targets
        held = None
        if routes is None and self.cfg.guide_signal == "holdout" and targets.dim() == 2:
            # the guide's target is kept out of the CE, so the smallest route's
            # hit on it is a held-out one (a one-item sequence keeps its label)
            b = torch.arange(B, device=x.device)
            held = targets[b, lengths - 1]
            keep = lengths >= 2
            targets = targets.clone()
            targets[b[keep], lengths[keep] - 1] = 0
        routing = self.route(x, lengths) if routes is None else None
        if routing is not None:
            routes = routing.routes
        gate = routing.gate if routing is not None else None
        r, _ = self.net.resolve_routes(routes, B, x.device)
        logits, ce, key = self._labelled(x, lengths, targets, r, gate, path, table)
        ratio = self.route_ratio[routes].mean()
        stats = {"ce": ce.item(), "flop_ratio": ratio.item()}
        total = ce
        if routing is None or routing.logits is None:   # given or consolidated routes
            stats["loss"] = total.item()
            return total, stats

        last_t = held if held is not None else targets if targets.dim() == 1 else \
            targets[torch.arange(B, device=x.device), lengths - 1]
        hit = self._route_hits(x, lengths, last_t, 0, table)
        if self.cfg.guide_labels == "sandwich":
            # DS-Net's gate labels: a user even the max route misses is
            # hopeless, so it is sent small too; only the rest are "hard"
            hit = hit | ~self._route_hits(x, lengths, last_t, self.cfg.max_route, table)
        ls = self.logit_losses(routing.logits, hit, routes)
        total = ce + self.weighted_router_loss(ls, ce)
        if self.cfg.distill > 0:
            # in-place distillation (slimmable networks, DS-Net): the max route
            # runs on the batch too, trained on the CE, and the routed logits
            # learn its detached softmax at every labelled position
            if table is not None:
                raise ValueError("loss: distill needs the model's own output layer")
            top, _ = self.net.resolve_routes(self.fixed_routes(B, device=x.device), B, x.device)
            t_logits, t_ce, t_key = self._labelled(x, lengths, targets, top, None, path, None)
            kd = F.kl_div(logits[key.argsort()].float().log_softmax(-1),
                          t_logits[t_key.argsort()].detach().float().log_softmax(-1),
                          reduction="batchmean", log_target=True)
            total = total + t_ce + self.cfg.distill * kd
            stats.update(ce_max=t_ce.item(), distill=kd.item())
        stats.update(guide=ls["guide"].item(), uniform=ls["uniform"].item(),
                     budget=ls["budget"].item(), exp_ratio=ls["exp_ratio"].item(),
                     small_hit=hit.float().mean().item(), loss=total.item())
        return total, stats

    def _labelled(self, x, lengths, targets, r, gate, path, table):
        """(logits [N, n_items + 1] of the labelled positions, or None with
        `table`; their CE; key [N], each row's b * L + t, in the row order,
        which is the route plan's on the routed path). x, targets right-padded."""
        B, L = x.shape
        if path == "routed":
            h, plan = self.net.encode_routed(x, lengths, r, gate)
            if targets.dim() == 2:
                t = gather_tokens(targets, lengths, plan)                  # [T]
                rows = t.nonzero().squeeze(1)
                widths = torch.repeat_interleave(plan.widths, plan.lengths)[rows]
                pos = torch.arange(B * L, device=x.device).view(B, L)
                key = gather_tokens(pos, lengths, plan)[rows]
                t = t[rows]
            else:
                rows = plan.cu_seqlens[1:] - 1
                t, widths, key = targets[plan.order], plan.widths, plan.order
            if table is not None:
                return None, table.cross_entropy(h[rows], widths, t).mean(), key
            logits = self.net.score_rows(h[rows], widths)
            return logits, F.cross_entropy(logits, t), key
        if table is not None:
            raise ValueError("loss: a sharded table scores the routed path only")
        h = self.net.encode_masked(x, lengths, r, gate)
        if targets.dim() == 2:
            pos = torch.arange(L, device=x.device)
            sel = (targets != 0) & (pos[None] < lengths[:, None])
            h, t = h[sel], targets[sel]
            key = torch.arange(B * L, device=x.device).view(B, L)[sel]
        else:
            h, t = h[torch.arange(B, device=x.device), lengths - 1], targets
            key = torch.arange(B, device=x.device)
        logits = self.net.score_masked(h)
        return logits, F.cross_entropy(logits, t), key

    def route_value_loss(self, items, lengths, targets, candidates):
        """Router regression on measured route values: the cross-entropy of
        each sample's last target under each candidate route [K] (route ids,
        run on the current supernet without gradients or dropout), centred
        per sample, is what the router's logits (centred the same way) learn
        to predict, negated: logit_r - mean ~ -(ce_r - mean). At inference
        argmax(logits - cost_bias * FLOP ratio) then picks, per user, the
        route with the best predicted loss for its price. targets [B]."""
        B = items.shape[0]
        with torch.no_grad():
            ce = torch.stack([
                F.cross_entropy(self.last_scores(items, lengths,
                                                 self.fixed_routes(B, int(r), items.device),
                                                 dropout=False), targets, reduction="none")
                for r in candidates.tolist()], 1)                           # [B, K]
            want = -(ce - ce.mean(1, keepdim=True))
        pred = self.router(items, lengths)[:, candidates]
        pred = pred - pred.mean(1, keepdim=True)
        return F.mse_loss(pred.float(), want.float())

    @torch.no_grad()
    def _route_hits(self, x, lengths, target, route, table=None):
        """[B] bool: route id `route` ranks `target` in its top guide_topk,
        scored by the output layer at the route's hidden width (or by
        `table`, a sharded one)."""
        if table is None:
            width = self.cfg.routes()[route][1]

            def score(last):
                w = torch.full((last.shape[0],), width, dtype=torch.int64, device=last.device)
                return self.net.score_rows(last, w)
            return self.smallest_route_hits(x, lengths, target, score, route=route)
        r, _ = self.net.resolve_routes(torch.full((x.shape[0],), route, dtype=torch.int64,
                                                  device=x.device), x.shape[0], x.device)
        _, last = self.net.encode(x, lengths, False, r, dropout=False, hidden=False)
        return table.count_ahead(last, r.hidden, target, strict=True) < self.cfg.guide_topk


def _check_path(path):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
