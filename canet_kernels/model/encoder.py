"""The module layer: a routed SASRec layer, the routed encoder (the
weight-sliced supernet without an output layer), its dense max-size variant,
and the CANet encoder (router + routed encoder).

    op (torch.ops.canet.*) -> functional (canet_kernels.functional)
        -> modules (RoutedLayer, RoutedEncoder, DenseEncoder, CANetEncoder)

Encoders take a padded batch in the caller's layout (item ids [B, L] or
embeddings [B, L, E]; right or left padding, given by lengths, a padding mask
or the padding id 0) and return per-position hidden states [B, L, D] in that
same layout, zeros at padding and beyond each route's hidden width, the last
real position's state [B, D], and the routes used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from .. import ops as _ops
from ..routing import gather_tokens, plan_routes, run_layers, run_masked_layers
from .config import CANetConfig
from .router import Router

# The op implementations the routed path calls; tests may swap in
# canet_kernels.reference (same signatures, plain PyTorch).
ops = functional


def _init_(w):
    nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)


class RoutedLayer(nn.Module):
    """One post-LN transformer layer whose weights are at the maximal width
    `dim`; each sample runs on the leading blocks at its own width.

    forward(x [T, dim] packed, cu_seqlens [B + 1], widths [B]) -> [T, dim],
    zero beyond each sample's width. `masked(h [B, L, dim], ctx)` is the same
    layer in the paper's masked formulation (parity checks)."""

    def __init__(self, dim: int, num_heads: int = 4, ffn_ratio: int = 4,
                 dropout: float = 0.0, ln_eps: float = 1e-5,
                 residual_scale_init: float | None = 1e-8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.ffn_ratio = num_heads, ffn_ratio
        self.dropout, self.ln_eps = dropout, ln_eps
        D = dim
        # [attention, FFN] output scales; None = plain post-LN
        self.res_scale = (None if residual_scale_init is None else
                          nn.Parameter(torch.full((2,), float(residual_scale_init))))
        self.w_qkv = nn.Parameter(torch.empty(3, D, D))      # [3, out, in]
        self.b_qkv = nn.Parameter(torch.zeros(3, D))
        self.w_o = nn.Parameter(torch.empty(D, D))
        self.b_o = nn.Parameter(torch.zeros(D))
        self.ln1_w = nn.Parameter(torch.ones(D))
        self.ln1_b = nn.Parameter(torch.zeros(D))
        self.w1 = nn.Parameter(torch.empty(ffn_ratio * D, D))
        self.b1 = nn.Parameter(torch.zeros(ffn_ratio * D))
        self.w2 = nn.Parameter(torch.empty(D, ffn_ratio * D))
        self.b2 = nn.Parameter(torch.zeros(D))
        self.ln2_w = nn.Parameter(torch.ones(D))
        self.ln2_b = nn.Parameter(torch.zeros(D))
        for w in (self.w_qkv, self.w_o, self.w1, self.w2):
            _init_(w)

    def params(self) -> dict:
        return {n: getattr(self, n) for n in functional.LAYER_PARAMS}

    def forward(self, x, cu_seqlens, widths, dropout: bool = True):
        return functional.routed_layer(
            x, cu_seqlens, widths, self.params(), self.num_heads, self.ffn_ratio,
            self.ln_eps, self.res_scale, self.dropout if dropout else 0.0,
            self.training, ops=ops)

    def masked(self, h, ctx: functional.MaskedContext, dropout: bool = True):
        return functional.masked_layer(h, self.params(), ctx, self.ln_eps, self.res_scale,
                                       self.dropout if dropout else 0.0, self.training)


class Routes(NamedTuple):
    """Per-sample route [B] tensors: embedding width, hidden width, depth."""
    emb: torch.Tensor
    hidden: torch.Tensor
    depth: torch.Tensor


@dataclass
class Routing:
    routes: torch.Tensor              # [B] route ids
    gate: torch.Tensor | None         # [B] straight-through weight (1 in forward)
    logits: torch.Tensor | None       # [B, R] router logits


@dataclass
class EncoderOutput:
    hidden: torch.Tensor                  # [B, L, D] caller's layout
    last: torch.Tensor                    # [B, D] last real position
    routes: Routes                        # the widths and depths used
    route_ids: torch.Tensor | None        # [B] ids into cfg.routes(), when known
    logits: torch.Tensor | None = None    # [B, R] router logits (CANetEncoder)
    gate: torch.Tensor | None = None      # [B] straight-through weight (training)


# ----------------------------------------------------------- input layout --

def _padding_side(valid):
    """'right' or 'left' from a [B, L] real-token mask; error otherwise."""
    n = valid.sum(1, keepdim=True)
    pos = torch.arange(valid.shape[1], device=valid.device)[None]
    if bool((valid == (pos < n)).all()):
        return False
    if bool((valid == (pos >= valid.shape[1] - n)).all()):
        return True
    raise ValueError("padding must be contiguous at one end of every row (all right "
                     "or all left padded); got real tokens on both sides of padding")


def _shift(x, lengths, left_to_right: bool):
    """Moves each row's real tokens between left and right padding."""
    B, L = x.shape[:2]
    pos = torch.arange(L, device=x.device)[None]
    off = (L - lengths.to(pos.dtype))[:, None]
    idx = (pos + off) % L if left_to_right else (pos - off) % L
    idx = idx.view(B, L, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


class RoutedEncoder(nn.Module):
    """The weight-sliced SASRec supernet without an output layer.

    RoutedEncoder(cfg) or RoutedEncoder(n_items=..., **CANetConfig fields).
    Route (e, d, k) embeds items at width e (the leading e features of the
    item and position tables), projects to hidden width d with W_p[:d, :e]
    and runs the first k layers at width d."""

    def __init__(self, cfg: CANetConfig | None = None, **kwargs):
        super().__init__()
        if cfg is None:
            cfg = CANetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a CANetConfig or its fields, not both")
        self.cfg = cfg
        E, D = cfg.E, cfg.D
        self.item_emb = nn.Embedding(cfg.n_items + 1, E, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, E)
        self.w_p = nn.Parameter(torch.empty(D, E))
        self.b_p = nn.Parameter(torch.zeros(D))
        self.layers = nn.ModuleList(
            RoutedLayer(D, cfg.num_heads, cfg.ffn_ratio, cfg.dropout, cfg.ln_eps,
                        cfg.residual_scale_init) for _ in range(cfg.L))
        for w in (self.item_emb.weight, self.pos_emb.weight, self.w_p):
            _init_(w)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        table = torch.tensor(cfg.routes(), dtype=torch.int64)            # [R, 3]
        self.register_buffer("route_table", table, persistent=False)

    # ------------------------------------------------------------- inputs --
    def layout(self, items=None, lengths=None, padding_mask=None, left_padded=None,
               embeddings=None):
        """Checks a batch and returns (x, lengths [B] int64, left_padded):
        x is the ids [B, L] or the embeddings [B, L, E] as given."""
        cfg = self.cfg
        if (items is None) == (embeddings is None):
            raise ValueError("pass exactly one of items (ids [B, L]) and embeddings "
                             "([B, L, E])")
        if items is not None:
            x = items
            if not torch.is_tensor(items) or items.dim() != 2:
                raise ValueError("items must be a [B, L] tensor of item ids, got "
                                 f"{_describe(items)}; pass embeddings= for [B, L, E]")
            if items.is_floating_point() or items.dtype == torch.bool:
                raise ValueError(f"items must be integer item ids, got {items.dtype}; "
                                 "pass embeddings= for [B, L, E] inputs")
            if items.numel() and (int(items.min()) < 0 or int(items.max()) > cfg.n_items):
                raise ValueError(f"items: ids must lie in [0, {cfg.n_items}] (0 = padding), "
                                 f"got [{int(items.min())}, {int(items.max())}]")
        else:
            x = embeddings
            if not torch.is_tensor(x) or x.dim() != 3 or not x.is_floating_point():
                raise ValueError("embeddings must be a float [B, L, E] tensor, got "
                                 f"{_describe(x)}")
            if x.shape[2] != cfg.E:
                raise ValueError(f"embeddings: last dim must be E = {cfg.E}, got {x.shape[2]}")
        B, L = x.shape[:2]
        if L > cfg.max_len:
            raise ValueError(f"sequences of {L} positions exceed max_len {cfg.max_len}; "
                             "keep the last max_len items")
        if lengths is not None and padding_mask is not None:
            raise ValueError("pass lengths or padding_mask, not both")
        if padding_mask is not None:
            if padding_mask.shape != (B, L) or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be bool [{B}, {L}] (True = padding), "
                                 f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
            valid = ~padding_mask
        elif lengths is None:
            if items is None:
                raise ValueError("embeddings need lengths or a padding_mask")
            valid = items != 0
        if lengths is None:
            side = _padding_side(valid)
            if left_padded is not None and left_padded != side and not bool(valid.all()):
                raise ValueError(f"left_padded={left_padded} but the padding is on the "
                                 f"{'left' if side else 'right'}")
            left_padded = side
            lengths = valid.sum(1)
        else:
            if not torch.is_tensor(lengths) or lengths.shape != (B,):
                raise ValueError(f"lengths must be a [{B}] tensor, got {_describe(lengths)}")
            if lengths.is_floating_point():
                raise ValueError(f"lengths must be integers, got {lengths.dtype}")
            left_padded = bool(left_padded)
        lengths = lengths.to(torch.int64)
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > L):
            raise ValueError(f"lengths must lie in [1, {L}], got "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        if items is not None and B:
            pos = torch.arange(L, device=items.device)[None]
            n = lengths[:, None]
            real = pos >= L - n if left_padded else pos < n
            if bool((items.eq(0) & real).any()):
                b = int((items.eq(0) & real).any(1).nonzero()[0])
                raise ValueError(
                    f"items[{b}] has the padding id 0 inside its first lengths[{b}] = "
                    f"{int(lengths[b])} positions" + ("" if left_padded else
                                                      "; left-padded input needs left_padded=True"))
        return x, lengths, left_padded

    def resolve_routes(self, routes, B, device):
        """(Routes of [B] tensors, route ids or None) from route ids [B] (into
        cfg.routes()), a Routes / (emb, hidden, depth) tuple of [B] tensors or
        ints, or None (the max route)."""
        cfg = self.cfg
        if routes is None:
            routes = torch.full((B,), cfg.max_route, dtype=torch.int64, device=device)
        if torch.is_tensor(routes):
            if routes.shape != (B,) or routes.is_floating_point():
                raise ValueError(f"routes must be [{B}] integer route ids, got "
                                 f"{_describe(routes)}")
            if B and (int(routes.min()) < 0 or int(routes.max()) >= cfg.num_routes):
                raise ValueError(f"routes: ids must lie in [0, {cfg.num_routes - 1}]")
            t = self.route_table.to(device)[routes]
            return Routes(t[:, 0], t[:, 1], t[:, 2]), routes
        if len(routes) != 3:
            raise ValueError("routes must be route ids [B] or (emb, hidden, depth)")
        vals = []
        for name, v, hi in zip(Routes._fields, routes, (cfg.E, cfg.D, cfg.L)):
            v = torch.as_tensor(v, device=device, dtype=torch.int64)
            v = v.expand(B).contiguous() if v.dim() == 0 else v
            if v.shape != (B,):
                raise ValueError(f"routes.{name} must be [{B}] or a scalar")
            if B and (int(v.min()) < 1 or int(v.max()) > hi):
                raise ValueError(f"routes.{name} must lie in [1, {hi}]")
            vals.append(v)
        if B and bool((vals[1] % cfg.num_heads).any()):
            raise ValueError(f"routes.hidden must be divisible by num_heads {cfg.num_heads}")
        return Routes(*vals), None

    # ------------------------------------------------------------- paths --
    def _drop(self, x, dropout):
        p = self.cfg.dropout if dropout else 0.0
        return F.dropout(x, p, self.training) if p > 0 else x

    def encode_routed(self, x, lengths, routes: Routes, gate=None, dropout=True,
                      left_padded=False):
        """canet ops on a route-sorted packed batch. x: ids [B, L] or
        embeddings [B, L, E]. Returns (h [T, D] packed in plan order, zero
        beyond each width; the plan)."""
        cfg = self.cfg
        plan = plan_routes(lengths, routes.hidden, routes.depth, routes.emb,
                           num_layers=cfg.L)
        tok = gather_tokens(x, lengths, plan, left_padded)              # [T] or [T, E]
        starts = torch.repeat_interleave(plan.cu_seqlens[:-1], plan.lengths)
        pos = torch.arange(tok.shape[0], device=tok.device) - starts    # [T]
        emb = self.item_emb(tok) if x.dim() == 2 else tok
        # sliced_linear reads only x[:, :e_b]: no need to zero the rest.
        h = self._drop(emb + self.pos_emb(pos), dropout)                 # [T, E]
        with _ops.shared_plans():   # one tile plan per route layout, not per op
            h = ops.sliced_linear(h, plan.cu_seqlens, plan.emb_widths, plan.widths,
                                  self.w_p, self.b_p)                    # [T, D]
            h = run_layers(plan, h, self.layers,
                           lambda layer, h, cu, w: layer(h, cu, w, dropout))
        if gate is not None:
            h = h * torch.repeat_interleave(gate[plan.order], plan.lengths)[:, None]
        return h, plan

    def encode_masked(self, x, lengths, routes: Routes, gate=None, dropout=True):
        """The same network at full width with per-sample masks, on a
        right-padded batch. Returns h [B, L, D] (padded positions are junk)."""
        cfg = self.cfg
        B, L = x.shape[:2]
        dt, dev = self.w_p.dtype, x.device
        pos = torch.arange(L, device=dev)
        emask = (torch.arange(cfg.E, device=dev) < routes.emb[:, None]).to(dt)[:, None, :]
        emb = self.item_emb(x) if x.dim() == 2 else x
        h = self._drop((emb + self.pos_emb(pos)[None]) * emask, dropout)
        m = functional.MaskedContext(routes.hidden, cfg.num_heads, cfg.D, cfg.ffn_ratio,
                                     L, dt)
        h = F.linear(h, self.w_p, self.b_p) * m.fmask                    # [B, L, D]
        h = run_masked_layers(h, routes.depth, self.layers,
                              lambda layer, h: layer.masked(h, m, dropout))
        if gate is not None:
            h = h * gate[:, None, None]
        return h

    def encode(self, x, lengths, left_padded, routes: Routes, gate=None,
               path="routed", dropout=True, hidden=True):
        """(hidden [B, L, D] in the caller's layout, zero at padding and
        beyond widths, or None with hidden=False (scoring reads only the
        last position: no unpack); last [B, D])."""
        B, L = x.shape[:2]
        if path == "routed":
            h, plan = self.encode_routed(x, lengths, routes, gate, dropout, left_padded)
            last = h[plan.cu_seqlens[1:] - 1][plan.inverse]
            if not hidden:
                return None, last
            return functional.unpack(h, plan.lengths, L, left_padded)[plan.inverse], last
        if path != "masked":
            raise ValueError(f"path must be 'routed' or 'masked', got {path!r}")
        xr = _shift(x, lengths, True) if left_padded else x
        h = self.encode_masked(xr, lengths, routes, gate, dropout)
        pos = torch.arange(L, device=h.device)
        h = h * (pos[None, :] < lengths[:, None])[..., None]
        last = h[torch.arange(B, device=h.device), lengths - 1]
        return (_shift(h, lengths, False) if left_padded else h), last

    def forward(self, items=None, lengths=None, routes=None, *, embeddings=None,
                padding_mask=None, left_padded=None, path="routed") -> EncoderOutput:
        """items [B, L] ids (0 = padding) or embeddings= [B, L, E]; lengths
        [B], padding_mask= [B, L] (True = padding) or neither (padding = id
        0); left_padded: None = detect (from a mask or the ids), else as
        given with lengths. routes: ids [B], a Routes / (emb, hidden, depth)
        tuple, or None (the max route). path: "routed" (canet ops) or
        "masked" (the paper's formulation)."""
        x, lengths, left = self.layout(items, lengths, padding_mask, left_padded,
                                       embeddings)
        r, ids = self.resolve_routes(routes, x.shape[0], x.device)
        hidden, last = self.encode(x, lengths, left, r, path=path)
        return EncoderOutput(hidden, last, r, ids)


class DenseEncoder(RoutedEncoder):
    """The max-size model of the same supernet (every sample on the max
    route): a plain SASRec stand-in for fair comparisons in host code."""

    def forward(self, items=None, lengths=None, *, embeddings=None, padding_mask=None,
                left_padded=None, path="routed") -> EncoderOutput:
        return super().forward(items, lengths, None, embeddings=embeddings,
                               padding_mask=padding_mask, left_padded=left_padded,
                               path=path)


def _describe(v):
    if torch.is_tensor(v):
        return f"{v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__


# ------------------------------------------------------------------ CANet --

class CANetEncoder(nn.Module):
    """Router + routed encoder: each user's history picks its own route.

    In training the route is a straight-through hard Gumbel-softmax sample
    and each sample's hidden states are multiplied by its gate (1 in the
    forward pass; the router's gradient path). At inference the route is
    argmax(logits - cost_bias * FLOP ratio), deterministic. A host adds
    `router_loss(out)` to its own loss."""

    net_cls = RoutedEncoder

    def __init__(self, cfg: CANetConfig | None = None, **kwargs):
        super().__init__()
        if cfg is None:
            cfg = CANetConfig(**kwargs)
        self.cfg = cfg
        self.router = Router(cfg)
        self.net = self.net_cls(cfg)
        self.register_buffer("route_ratio", torch.tensor(cfg.route_flop_ratios(),
                                                         dtype=torch.float64),
                             persistent=False)
        # inference-time price of compute per unit of FLOP ratio
        self.register_buffer("cost_bias", torch.zeros((), dtype=torch.float64))
        if cfg.rungs:
            # the consolidated routes (set_rungs): cut points of the expected
            # FLOP ratio and each rung's route; -1 = not consolidated yet
            self.register_buffer("rung_cuts", torch.zeros(cfg.rungs - 1, dtype=torch.float64))
            self.register_buffer("rung_routes", torch.full((cfg.rungs,), -1, dtype=torch.int64))
            self.register_load_state_dict_post_hook(lambda m, _keys: m.read_rungs())
        self._rungs_set = False           # host copy of "rung_routes >= 0": no device sync
        self.tau = cfg.tau                # Gumbel temperature now (see anneal)
        self.noise = 1.0                  # Gumbel noise scale now (see anneal)

    def anneal(self, progress: float):
        """Sets the Gumbel temperature for training progress in [0, 1]:
        geometric from cfg.tau to cfg.tau_end (constant without tau_end),
        and the Gumbel noise scale, linear from 1 to cfg.noise_end."""
        cfg = self.cfg
        p = min(max(progress, 0.0), 1.0)
        if cfg.tau_end is not None:
            self.tau = cfg.tau * (cfg.tau_end / cfg.tau) ** p
        if cfg.noise_end is not None:
            self.noise = 1.0 + (cfg.noise_end - 1.0) * p

    # ------------------------------------------------------------ routing --
    @property
    def has_rungs(self) -> bool:
        """The routes are consolidated into cfg.rungs fixed rungs."""
        return self._rungs_set

    def read_rungs(self):
        """Re-reads `has_rungs` from the buffers (done on load_state_dict; call
        it after writing them in place, e.g. a broadcast)."""
        self._rungs_set = bool(self.cfg.rungs) and int(self.rung_routes[0]) >= 0

    def route(self, items, lengths) -> Routing:
        """Routes of a right-padded batch: straight-through hard
        Gumbel-softmax in training, argmax at inference; once consolidated
        (set_rungs), the rung of each user in both, with no gate or logits
        (the router is frozen and has no loss)."""
        if self.has_rungs:
            return Routing(self.rung_pick(self.frozen_logits(items, lengths), lengths),
                           None, None)
        logits = self.router(items, lengths)
        if self.training:
            if self.noise == 1.0:
                g = F.gumbel_softmax(logits, tau=self.tau, hard=True)   # [B, R]
            else:  # the same straight-through sample with scaled noise
                noise = -torch.empty_like(logits).exponential_().log()
                soft = ((logits + self.noise * noise) / self.tau).softmax(-1)
                hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
                g = hard - soft.detach() + soft
            routes = g.argmax(-1)
            return Routing(routes, g.gather(1, routes[:, None]).squeeze(1), logits)
        return Routing(self.pick(logits), None, logits)

    @torch.no_grad()
    def frozen_logits(self, items, lengths):
        """The consolidated router's logits, always in eval mode: without
        dropout a training row's rung is the one its user is served on.
        None when the rungs do not read the router (rung_signal "length")."""
        if self.cfg.rung_signal == "length":   # the router is not read
            return None
        if not self.router.training:      # inference: nothing to switch (export, compile)
            return self.router(items, lengths)
        self.router.eval()
        try:
            return self.router(items, lengths)
        finally:
            self.router.train()

    def pick(self, logits, cost_bias=None, lengths=None):
        """Deterministic inference routes: argmax of the logits less the
        price of each route's FLOP ratio (the rungs once consolidated; the
        users' `lengths` [N] are needed when they are cut by length)."""
        if self.has_rungs:
            return self.rung_pick(logits, lengths)
        c = self.cost_bias if cost_bias is None else cost_bias
        if float(c) == 0.0:
            return logits.argmax(-1)
        adj = logits.double() - float(c) * self.route_ratio[None]
        return adj.argmax(-1)

    def expected_ratio(self, logits):
        """[N] FLOP ratio the router expects for each user: its softmax over
        the routes times their FLOP ratios (float64). What orders users
        from cheap to costly for the rungs."""
        return logits.double().softmax(-1) @ self.route_ratio

    def rung_score(self, logits, lengths=None):
        """[N] float64 what orders users into the rungs' groups
        (cfg.rung_signal): the expected FLOP ratio of their router `logits`
        [N, R], or their history `lengths` [N]."""
        if self.cfg.rung_signal == "length":
            if lengths is None:
                raise ValueError("rung_signal 'length': the users' lengths are needed")
            return torch.as_tensor(lengths).reshape(-1).to(self.rung_cuts.device,
                                                           torch.float64)
        return self.expected_ratio(logits)

    def rung_of(self, logits, lengths=None):
        """[N] each user's rung index: the interval of the cut points that
        holds its rung_score (0 = the cheapest group)."""
        return torch.bucketize(self.rung_score(logits, lengths), self.rung_cuts, right=True)

    def rung_pick(self, logits, lengths=None):
        """Consolidated routes [N]: the route of each user's rung."""
        return self.rung_routes[self.rung_of(logits, lengths)]

    @torch.no_grad()
    def lifted_rungs(self, items, lengths, u, share: float):
        """Training routes [B] on the rungs, with a `share` of the users below
        the top rung on a costlier rung instead (lift_rungs; u [B, 2]
        uniforms in [0, 1)), so that every rung also learns the users of
        the rungs below it: a router that sends a user up by mistake must
        not cost that user its accuracy."""
        g = self.rung_of(self.frozen_logits(items, lengths), lengths)
        return self.rung_routes[lift_rungs(g, u.to(g.device), share, self.cfg.rungs)]

    @torch.no_grad()
    def set_rungs(self, logits, routes=None, lengths=None, cuts=None) -> list:
        """Consolidates the router's routes into cfg.rungs rungs from held-out
        (validation) users' logits [N, R] (and history `lengths` [N]): the
        users are cut into equal groups at quantiles of their rung_score
        (rung_groups), or at the given `cuts` [K - 1] of it (ascending),
        and each group's rung is `routes[g]` if given, else
        the route the current inference pick (argmax less the cost bias)
        gives most of them (if these overshoot cfg.flop_target: the routes
        within it that hold the routes of most of them; rung_votes).
        Returns the rung routes."""
        K = self.cfg.rungs
        if not K:
            raise ValueError("set_rungs: the model was built with rungs=0")
        if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] != self.cfg.num_routes:
            raise ValueError(f"set_rungs: logits must be [N > 0, {self.cfg.num_routes}], "
                             f"got {tuple(logits.shape)}")
        if routes is not None:
            routes = torch.as_tensor(routes, dtype=torch.int64).cpu()
            if routes.shape != (K,) or bool((routes < 0).any()) or \
                    bool((routes >= self.cfg.num_routes).any()):
                raise ValueError(f"set_rungs: routes must be {K} route ids in "
                                 f"[0, {self.cfg.num_routes}), got {routes.tolist()}")
        if lengths is not None and torch.as_tensor(lengths).numel() != logits.shape[0]:
            raise ValueError(f"set_rungs: lengths must be [{logits.shape[0]}], "
                             f"got {tuple(torch.as_tensor(lengths).shape)}")
        if cuts is not None:
            cuts = torch.as_tensor(cuts, dtype=torch.float64).cpu()
            if cuts.shape != (K - 1,) or bool((cuts.diff() < 0).any()):
                raise ValueError(f"set_rungs: cuts must be {K - 1} ascending cut points, "
                                 f"got {cuts.tolist()}")
        score = self.rung_score(logits, lengths).cpu()   # checked before the rungs change
        self.rung_routes.fill_(-1)                  # pick below: the router's own routes
        self._rungs_set = False
        cuts, group = rung_groups(score, K, cuts)
        rung = rung_votes(self.pick(logits).cpu(), group, K, self.route_ratio.cpu(),
                          self.cfg.flop_target, route_nesting(self.cfg.routes())) \
            if routes is None else routes
        self.rung_cuts.copy_(cuts)
        self.rung_routes.copy_(rung)
        self._rungs_set = True
        return rung.tolist()

    def forward(self, items, lengths=None, routes=None, *, padding_mask=None,
                left_padded=None, path="routed") -> EncoderOutput:
        """As RoutedEncoder.forward (item ids only: the router reads them);
        routes default to the router's choice."""
        return self.encode(items, lengths, routes, padding_mask=padding_mask,
                           left_padded=left_padded, path=path)

    def encode(self, items, lengths=None, routes=None, *, padding_mask=None,
               left_padded=None, path="routed", dropout=True) -> EncoderOutput:
        x, lengths, left = self.net.layout(items, lengths, padding_mask, left_padded)
        logits = gate = None
        if routes is None:
            rt = self.route(_shift(x, lengths, True) if left else x, lengths)
            routes, gate, logits = rt.routes, rt.gate, rt.logits
        r, ids = self.net.resolve_routes(routes, x.shape[0], x.device)
        hidden, last = self.net.encode(x, lengths, left, r, gate, path, dropout)
        return EncoderOutput(hidden, last, r, ids, logits, gate)

    # ------------------------------------------------------- router losses --
    def router_losses(self, out: EncoderOutput, hit=None) -> dict:
        """The router's auxiliary losses, unweighted: `uniform` (KL of the
        batch-mean route distribution from uniform), `budget` (expected FLOP
        ratio above cfg.flop_target) and, given `hit` [B] bool (the smallest
        route ranks the target in its top guide_topk, see
        `smallest_route_hits`), `guide`. Empty without router logits."""
        if out.logits is None:
            return {}
        return self.logit_losses(out.logits, hit, out.route_ids if out.gate is not None
                                 else None)

    def logit_losses(self, logits, hit=None, routes=None) -> dict:
        """`router_losses` of router logits [B, R]; `routes` [B], the hard
        routes taken (cfg.balance "switch" counts them; default: the argmax)."""
        cfg = self.cfg
        probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                              else logits, dim=-1)
        exp_ratio = (probs * self.route_ratio.to(probs.dtype)).sum(-1).mean()
        t = cfg.flop_target
        if t is None:
            budget = exp_ratio * 0
        elif cfg.budget_shape == "two_sided":
            budget = (exp_ratio - t).abs()
        else:
            budget = torch.relu(exp_ratio - t)
        if cfg.balance == "switch":
            balance = switch_loss(probs, probs.argmax(-1) if routes is None else routes)
        elif cfg.balance == "mi":
            balance = uniform_loss(probs) + mean_entropy(probs)
        else:
            balance = uniform_loss(probs)
        losses = {"uniform": balance, "budget": budget, "exp_ratio": exp_ratio.detach()}
        if hit is not None:
            losses["guide"] = guide_loss(self.cfg, probs, hit)
        return losses

    def router_loss(self, out: EncoderOutput, hit=None):
        """Weighted sum of `router_losses` (0 without router logits), to add
        to a host's own loss."""
        return self.weighted_router_loss(self.router_losses(out, hit), out.last)

    def weighted_router_loss(self, losses: dict, like):
        """cfg's weighted sum of `losses` (from `router_losses`), in like's
        dtype; 0 when empty."""
        if not losses:
            return like.new_zeros(())
        cfg = self.cfg
        total = cfg.uniform_weight * losses["uniform"] + cfg.budget_weight * losses["budget"]
        if "guide" in losses:
            total = total + cfg.guide_weight * losses["guide"]
        return total.to(like.dtype)

    @torch.no_grad()
    def smallest_route_hits(self, items, lengths, target, score_fn=None, left_padded=None,
                            route: int = 0):
        """[B] bool: the smallest route (or route id `route`) ranks `target`
        [B] in its top guide_topk. `score_fn(last [B, D]) -> [B, n_items + 1]`
        scores a hidden state; default: the item embedding table (tied
        scoring)."""
        x, lengths, left = self.net.layout(items, lengths, None, left_padded)
        small = torch.full((x.shape[0],), route, dtype=torch.int64, device=x.device)
        r, _ = self.net.resolve_routes(small, x.shape[0], x.device)
        _, last = self.net.encode(x, lengths, left, r, dropout=False, hidden=False)
        if score_fn is None:
            score_fn = self.tied_scores
        s = score_fn(last).clone()
        s[:, 0] = float("-inf")
        ts = s.gather(1, target[:, None])
        return (s > ts).sum(-1) < self.cfg.guide_topk

    def tied_scores(self, last):
        """Scores [B, n_items + 1] of hidden states against the item
        embedding table (needs E >= D)."""
        cfg = self.cfg
        if cfg.E < cfg.D:
            raise ValueError("tied scoring needs max(emb_widths) >= max(hidden_widths)")
        return last @ self.net.item_emb.weight[:, :cfg.D].T

    # -------------------------------------------------------- calibration --
    @torch.no_grad()
    def router_logits(self, batches, with_lengths: bool = False):
        """Router logits [N, R] (eval mode) over an iterable of (items,
        lengths) batches, any padding the encoder accepts; with
        `with_lengths`, (logits, the users' lengths [N])."""
        was = self.training
        self.eval()
        out, ns = [], []
        try:
            for items, lengths in batches:
                x, n, left = self.net.layout(items, lengths)
                out.append(self.router(_shift(x, n, True) if left else x, n))
                ns.append(n.reshape(-1))
        finally:
            self.train(was)
        if not out:
            raise ValueError("calibrate: no batches given")
        return (torch.cat(out), torch.cat(ns)) if with_lengths else torch.cat(out)

    def consolidate(self, batches) -> list:
        """Consolidates the routes into cfg.rungs rungs from held-out users
        (an iterable of (items, lengths), as `calibrate` takes; calibrate
        first, the votes are the deployed routes'): set_rungs of their
        router logits and lengths. Returns the rung routes."""
        logits, lengths = self.router_logits(batches, with_lengths=True)
        return self.set_rungs(logits, lengths=lengths)

    def calibrate(self, batches, target: float | None = None, spend: bool = False) -> float:
        """Sets `cost_bias` from held-out users (an iterable of (items,
        lengths), never test users) so that the argmax routes' mean FLOP
        ratio meets `target` (default cfg.flop_target). Returns the bias."""
        target = self.cfg.flop_target if target is None else target
        if target is None:
            return float(self.cost_bias)
        return self.calibrate_cost_bias(self.router_logits(batches), target, spend=spend)

    @torch.no_grad()
    def calibrate_cost_bias(self, logits, target: float, iters: int = 50,
                            spend: bool = False) -> float:
        """Sets `cost_bias` from `logits` [N, R] and returns it: the smallest
        value >= 0 whose routes have mean FLOP ratio <= target. With `spend`,
        a router whose own argmax stays below the target gets the most
        negative bias that still meets it instead, so the routes use the
        budget. The chosen route's FLOP ratio does not increase with the
        bias, so bisection applies. Consolidated rungs ignore the bias: it
        is left as it is."""
        if self.has_rungs:
            return float(self.cost_bias)
        ratio = self.route_ratio

        def mean_ratio(c):
            return float(ratio[self.pick(logits, c)].mean())

        if mean_ratio(0.0) > target:
            c = lowest_price(mean_ratio, target, 0.0, iters)
        elif spend:
            lo = -1.0
            while mean_ratio(lo) <= target and lo > -1e6:
                lo *= 2
            c = bisect_price(mean_ratio, target, lo, 0.0, iters) \
                if mean_ratio(lo) > target else lo
        else:
            c = 0.0
        self.cost_bias.fill_(c)
        return c


def bisect_price(mean_ratio, target: float, lo: float, hi: float, iters: int = 50) -> float:
    """For a `mean_ratio(price)` that does not increase with the price, and
    mean_ratio(lo) > target >= mean_ratio(hi): the lowest price that meets
    the target, to (hi - lo) / 2**iters (the upper end of the bracket)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mean_ratio(mid) <= target else (mid, hi)
    return hi


def lowest_price(mean_ratio, target: float, lo: float, iters: int = 50) -> float:
    """The lowest price >= lo whose `mean_ratio` meets `target` (lo itself if
    it does): the upper end doubles from max(2 lo, 1) until it meets it (or
    reaches 1e6), then bisect_price."""
    if mean_ratio(lo) <= target:
        return lo
    hi = max(2 * lo, 1.0)
    while mean_ratio(hi) > target and hi < 1e6:
        hi *= 2
    return bisect_price(mean_ratio, target, lo, hi, iters)


def rung_groups(score, k: int, cuts=None):
    """(cut points [k - 1], group [N]) of users with scores [N]: k equal
    groups at the score's quantiles (ties share a group), or at the given
    ascending `cuts` (a score on a cut goes up)."""
    score = score.double()
    if cuts is None:
        q = torch.arange(1, k, dtype=torch.float64) / k
        cuts = torch.quantile(score, q) if k > 1 else score.new_zeros(0)
    else:
        cuts = torch.as_tensor(cuts, dtype=torch.float64).to(score.device)
    return cuts, torch.bucketize(score, cuts, right=True)


def length_cuts(lengths, k: int):
    """[k - 1] cut points of integer `lengths` [N] into k groups as equal as
    ties allow (a length on a cut goes up, as in rung_groups): each cut in
    turn is the length with the share of users below it nearest i / k,
    above the previous cut and leaving a length for each cut after it
    (two equally near: the lower, so the tied length goes up). A
    length held by many users (Beauty: 32% have the shortest) then starts
    or ends a group instead of leaving the group below it empty, as the
    quantiles do. Fewer distinct lengths than groups: the last cuts repeat
    (empty groups)."""
    L = torch.as_tensor(lengths).reshape(-1).double()
    vals, counts = L.unique(return_counts=True)
    below = ((counts.cumsum(0) - counts).double() / len(L)).tolist()
    cuts, lo = [], 1                      # vals[0] cannot start a group
    for i in range(1, k):
        hi = min(len(vals) - (k - i), len(vals) - 1)
        if lo > hi:                       # no length left: an empty group
            cuts.append(cuts[-1] if cuts else float(vals[-1]))
            continue
        j = min(range(lo, hi + 1), key=lambda j: (abs(below[j] - i / k), j))
        cuts.append(float(vals[j]))
        lo = j + 1
    return torch.tensor(cuts, dtype=torch.float64)


def lift_rungs(group, u, share: float, k: int):
    """Rung indices [N] of `group` [N] (of k) with each user below the top
    rung moved, when u[:, 0] < share, to a costlier rung drawn uniformly
    from those above it by u[:, 1]. u [N, 2] uniforms in [0, 1)."""
    above = k - 1 - group
    step = 1 + (u[:, 1] * above).long().clamp_max((above - 1).clamp_min(0))
    return torch.where((u[:, 0] < share) & (above > 0), group + step, group)


def rung_votes(picked, group, k: int, ratio=None, target: float | None = None,
               nests=None):
    """[k] each group's most common route of `picked` [N] (a group left
    empty by ties: the overall most common; ties: the cheaper route). With
    the routes' FLOP `ratio` [R] and a `target` that these modes overshoot
    (a group's most common route can cost more than its users' mean): with
    `nests` [R, R] (route_nesting), the routes within the target that hold
    the picked routes of most users (choose_under_target on that share), as
    a route holding a user's route keeps every width and layer the router
    gave it; without, the most votes within the target, which can be a
    small minority's cheap route."""
    R = int(picked.max()) + 1 if ratio is None else len(ratio)
    counts = torch.zeros(k, R, dtype=torch.float64)
    counts.index_put_((group, picked), torch.ones(len(picked), dtype=torch.float64),
                      accumulate=True)
    n = counts.sum(1)
    share = torch.where(n[:, None] > 0, counts / n.clamp_min(1)[:, None],
                        counts.sum(0) / n.sum())    # an empty group: the overall vote
    ratio = torch.zeros(R, dtype=torch.float64) if ratio is None else ratio.double().cpu()
    modes = choose_under_target(share, n, ratio, None)
    if target is None or nests is None or \
            float((n * ratio[modes]).sum() / n.sum()) <= target:
        return choose_under_target(share, n, ratio, target)     # the modes when they fit
    return choose_under_target(share @ nests.double().cpu(), n, ratio, target)


def route_nesting(routes) -> torch.Tensor:
    """[R, R] bool: route r nests in route s (its embedding width, hidden
    width and depth each at most s's), for `routes` [(emb, hidden, depth)]."""
    t = torch.as_tensor(routes)
    return (t[:, None, :] <= t[None, :, :]).all(-1)


def choose_under_target(metric, n, ratio, target: float | None, floor: float = 0.0,
                        rising: bool = False):
    """[K] one route per group for the most total metric (metric [K, R] per
    user, n [K] users per group) whose mean FLOP ratio meets `target`, each
    route having to buy at least `floor` of metric per unit of FLOP ratio:
    argmax_r metric[g, r] - price * ratio[r] (cheaper routes first on ties)
    at the lowest price >= floor that meets the target (None: the floor),
    then, as a Lagrangian misses the routes that are best at no price (off
    a group's convex hull), the budget left is filled greedily. `rising`:
    the routes' FLOP ratios must rise strictly from group 0 to group K - 1
    (rising_routes instead of the argmax)."""
    order = ratio.argsort(stable=True)

    def choose(price):
        if rising:
            return rising_routes(metric - price * ratio[None], n, ratio)
        return order[(metric - price * ratio[None])[:, order].argmax(1)]

    def mean_ratio(price):
        return float((n * ratio[choose(price)]).sum() / n.sum().clamp_min(1))

    if target is None:
        return choose(floor)
    return fill_budget(metric - floor * ratio[None], n, ratio, target,
                       choose(lowest_price(mean_ratio, target, floor)), rising)


def rising_routes(value, n, ratio):
    """[K] the routes, one per group, of strictly rising FLOP `ratio` [R]
    from group 0 to group K - 1 with the most total n_g * value[g, r]
    (value [K, R] per user): dynamic programming over the groups in order,
    cheaper routes first on ties."""
    K, R = value.shape
    order = ratio.argsort(stable=True).tolist()
    rs = [float(ratio[j]) for j in order]
    if len(set(rs)) < K:
        raise ValueError(f"rising routes: {K} groups need {K} routes of distinct FLOP "
                         f"ratios, the routes have {len(set(rs))}")
    w = (n.double()[:, None] * value.double())[:, order].tolist()   # by rising ratio
    best, back = w[0], []
    for g in range(1, K):
        # best[j]: the most total of groups 0..g with group g on the j-th cheapest route
        new, arg, run, run_i, i = [], [], -math.inf, -1, 0
        for j in range(R):
            while i < R and rs[i] < rs[j]:
                if best[i] > run:
                    run, run_i = best[i], i
                i += 1
            new.append(run + w[g][j])
            arg.append(run_i)
        best = new
        back.append(arg)
    j = max(range(R), key=lambda j: (best[j], -j))
    pick = [j]
    for arg in reversed(back):
        j = arg[j]
        pick.append(j)
    return torch.tensor([order[j] for j in reversed(pick)])


def fill_budget(value, n, ratio, target: float, pick, rising: bool = False):
    """Greedy improvement of the routes `pick` [K] under the target: while
    some group can move to a route of higher `value` [K, R] (per user) and
    the mean FLOP ratio still meets `target` (and with `rising`, the ratios
    still rise strictly from group to group), the move that adds the most
    n_g * value is made."""
    pick, budget = pick.clone(), target * float(n.sum())
    while True:
        room = budget - float((n * ratio[pick]).sum())
        gain = n[:, None] * (value - value.gather(1, pick[:, None]))
        extra = n[:, None] * (ratio[None] - ratio[pick][:, None])
        ok = (gain > 1e-12) & (extra <= room + 1e-9)
        if rising:                        # between the neighbours' ratios
            r = ratio[pick]
            inf = r.new_full((1,), math.inf)
            ok &= (ratio[None] > torch.cat([-inf, r[:-1]])[:, None]) & \
                (ratio[None] < torch.cat([r[1:], inf])[:, None])
        if not bool(ok.any()):
            return pick
        g, r = divmod(int(torch.where(ok, gain, -math.inf).argmax()), value.shape[1])
        pick[g] = r


def guide_loss(cfg: CANetConfig, probs, hit):
    """Cross-entropy between per-axis soft labels and the router's
    marginals over (embedding width, hidden width, depth). probs [B, R]; hit
    [B] bool: a hit pushes each marginal towards small choices, a miss
    towards large ones."""
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


def uniform_loss(probs):
    """KL(mean router distribution || uniform)."""
    R = probs.shape[-1]
    mean = probs.mean(0)
    return (mean * torch.log((mean * R).clamp_min(1e-12))).sum()


def switch_loss(probs, routes):
    """Switch Transformer load balancing: R * sum_r f_r * P_r, f_r the
    share of the batch routed to r (hard, no gradient), P_r the mean router
    probability of r. 1 when balanced; it lowers the probability of the
    routes that take too many samples, so it acts on the choices made, not
    only on the average distribution."""
    R = probs.shape[-1]
    f = torch.bincount(routes, minlength=R).to(probs.dtype) / max(routes.shape[0], 1)
    return R * (f * probs.mean(0)).sum()


def mean_entropy(probs):
    """Mean entropy of each user's router distribution (low = confident)."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
