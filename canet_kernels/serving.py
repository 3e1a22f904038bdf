"""Serving a trained CANet: one user's (or a small batch's) top-k items.

    rec = Recommender.load("runs/beauty")           # checkpoint read once
    r = rec.recommend([5, 17, 3, 99], k=10)         # one user -> Recommendation
    r.items, r.scores, r.route, r.hidden, r.depth
    rs = rec.recommend([[5, 17], [8, 2, 41]], k=10) # a small batch -> list

    crec = rec.compile("model.pt2")                  # export + AOTInductor; same API
    crec = CompiledRecommender("model.pt2")          # later: the package alone
    # examples/cpp_serving serves the same package from C++ (libtorch + libcanet)
    # python -m canet_kernels.serving export --ckpt runs/beauty --out model.pt2

Histories are lists of item ids in time order (1..n_items; 0 is padding and
is rejected, as are unknown ids and empty histories, with a ValueError naming
the history and position). The model reads the last `max_len` items;
`exclude_seen=True` removes every item of the given history from the ranking.
`route=` forces a route id (into `cfg.routes()`): the eager Recommender then
skips the router, a package still runs it.

Why one user costs less than through `CANet.recommend`: a single user has one
route, so there is no route plan (no argsorts, no host reads of the plan), no
gather into packed order and no unpack to [B, L, D]. The layers run on the
user's T tokens at the route's own width d ([T, d] activations; leading-block
weights copied contiguous once per width, so no op touches the zero tail of a
[T, D] buffer); the route's last layer computes its last position only
(LastRowOps: keys and values of every position, one query, one row through
the output projection, LayerNorms and FFN), the only row scoring reads; and
that row is scored by one GEMV against the contiguous [n_items + 1, d] block
of the output layer. Every layer still runs the model's one layer body,
`functional.routed_layer`, with an `ops` object (the canet ops, LastRowOps,
or PlainOps in the "plain" package).

The package (`export_package`, see `ServingGraph`) is the same path as one
graph without host syncs; AOTInductor compiles it (no Python per op), and in
the default "plain" variant it fuses the elementwise work of every width.

Thread safety: nothing is mutated after construction; every request allocates
its own tensors and runs under `torch.inference_mode`, so `recommend` may be
called from several threads at once (a package's calls from Python take
turns, see CompiledRecommender). The weight copies are a snapshot: build a new Recommender
after changing the model's weights.
"""
from __future__ import annotations

import copy
import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from numbers import Integral
from types import SimpleNamespace

import torch
import torch.nn as nn

from . import functional
from .data import pad_right

__all__ = ["Recommendation", "Recommender", "CompiledRecommender", "ServingGraph",
           "LastRowOps", "PlainOps", "VARIANTS", "export_package", "check_histories"]


@dataclass(frozen=True)
class Recommendation:
    """Top-k of one user: item ids and scores (best first), and the route
    that produced them (id into cfg.routes(), its widths and depth, and its
    FLOP ratio against the max route)."""
    items: list
    scores: list
    route: int
    emb: int
    hidden: int
    depth: int
    flop_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------- histories --

def _is_id(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _as_list(v):
    """Tensors and numpy arrays -> nested lists; anything else unchanged."""
    if torch.is_tensor(v):
        if v.is_floating_point() or v.is_complex():
            raise ValueError(f"history must hold integer item ids, got {v.dtype}")
        return v.tolist()
    if hasattr(v, "tolist") and hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
        return v.tolist()
    return v


def check_histories(history, n_items: int):
    """(list of histories as lists of ints, single) from one history (a list
    / tuple / 1-D tensor of ids) or a batch (a list of those, or a 2-D
    tensor). Raises ValueError naming the first bad history and position."""
    seq = _as_list(history)
    if not isinstance(seq, (list, tuple)):
        raise ValueError("history must be a list of item ids or a list of such lists, "
                         f"got {type(history).__name__}")
    seq = [_as_list(v) for v in seq]
    single = not any(isinstance(v, (list, tuple)) for v in seq)
    hists = [seq] if single else seq
    out = []
    for b, h in enumerate(hists):
        where = "history" if single else f"history[{b}]"
        if not isinstance(h, (list, tuple)):
            raise ValueError(f"{where} must be a list of item ids, got {h!r}")
        if not h:
            raise ValueError(f"{where} is empty: a recommendation needs at least one item")
        h = list(h)
        if not all(type(v) is int for v in h) or min(h) < 1 or max(h) > n_items:
            for i, v in enumerate(h):
                if not _is_id(v):
                    raise ValueError(f"{where}[{i}] = {v!r} is not an integer item id")
                if not 1 <= v <= n_items:
                    raise ValueError(f"{where}[{i}] = {v}: item ids must be in 1..{n_items} "
                                     "(0 is padding)")
            h = [int(v) for v in h]
        out.append(h)
    return out, single


def _check_route(route, num_routes: int, n: int, single: bool):
    """None or a list of n route ids."""
    if route is None:
        return None
    routes = [route] * n if _is_id(route) or single else list(route)
    if len(routes) != n:
        raise ValueError(f"route: {len(routes)} route ids for {n} histories")
    for r in routes:
        if not _is_id(r) or not 0 <= r < num_routes:
            raise ValueError(f"route must be a route id in 0..{num_routes - 1}, got {r!r}")
    return [int(r) for r in routes]


def _n_valid(hist, n_items, exclude_seen):
    return n_items - len(set(hist)) if exclude_seen else n_items


# ------------------------------------------------------ ops objects ------

class PlainOps:
    """An `ops` object for `functional.routed_layer` on ONE sequence whose
    tensors are all at one width w (x [T, w] and weights cut to width w, see
    `slice_layer`): plain PyTorch (F.linear, F.scaled_dot_product_attention,
    F.layer_norm), which AOTInductor fuses and compiles. cu_seqlens and the
    widths are not read (the width is the tensors' own)."""

    @staticmethod
    def sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias=None):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def sliced_attention(x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads,
                         causal=True):
        F = torch.nn.functional
        T, w = x.shape
        qkv = F.linear(x, w_qkv.reshape(3 * w, w), b_qkv.reshape(3 * w))
        q, k, v = qkv.view(T, 3, num_heads, w // num_heads).permute(1, 2, 0, 3)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # [H, T, hd]
        return F.linear(ctx.transpose(0, 1).reshape(T, w), w_o, b_o)

    @staticmethod
    def sliced_ffn(x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4):
        F = torch.nn.functional
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    @staticmethod
    def sliced_add_layernorm(x, residual, cu_seqlens, widths, weight, bias, eps=1e-5):
        return torch.nn.functional.layer_norm(x + residual, (x.shape[-1],), weight, bias,
                                              eps)


class LastRowOps:
    """An `ops` object for `functional.routed_layer` on ONE sequence that
    returns the layer's output at its last position only ([1, D] instead of
    [T, D]): all that scoring reads when the layer is the route's last.
    Keys and values still come from every position; the query, the output
    projection, both add+LayerNorms and the FFN run on one row, through
    `base` (the canet ops by default: sliced_linear etc. at the sample's
    width; or PlainOps). Only the attention core of the one query (softmax
    over all T keys, head i owning features [i*w/H, (i+1)*w/H)) is written
    here, on per-head feature masks so that the width may be a tensor
    (torch.export).

    head_masks: optional {D: ([H, D] float mask, scale)} for tensors of
    feature width D computed once (known widths); without it they come
    from `widths`."""

    def __init__(self, head_masks: dict | None = None, base=None):
        self.head_masks = head_masks or {}
        self.base = functional if base is None else base

    @staticmethod
    def head_mask(width, num_heads: int, D: int, dtype=torch.float32):
        """([H, D] mask: head i owns features [i*w/H, (i+1)*w/H), scale
        1/sqrt(w/H)) for a width given as an int or a [1] tensor."""
        feat = torch.arange(D)
        w = torch.as_tensor(width).reshape(1)
        hd = w // num_heads
        owner = feat // hd                                                 # [D]
        mask = (owner[None, :] == torch.arange(num_heads)[:, None]) & (feat < w)[None]
        return mask.to(dtype), hd.to(dtype).rsqrt()

    def sliced_attention(self, x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads,
                         causal=True):
        T, D = x.shape
        o, cu1 = self.base, _CU1.to(x.device)
        got = self.head_masks.get(D)
        hmask, scale = got if got is not None else self.head_mask(widths, num_heads, D,
                                                                   x.dtype)
        q = o.sliced_linear(x[T - 1:], cu1, widths, widths, w_qkv[0], b_qkv[0])   # [1, D]
        k = o.sliced_linear(x, cu_seqlens, widths, widths, w_qkv[1], b_qkv[1])    # [T, D]
        v = o.sliced_linear(x, cu_seqlens, widths, widths, w_qkv[2], b_qkv[2])
        s = torch.mm(q * hmask, k.t()) * scale                            # [H, T]
        p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s,
                          dim=-1).to(x.dtype)
        ctx = (torch.mm(p, v) * hmask).sum(0, keepdim=True)               # [1, D]
        return o.sliced_linear(ctx, cu1, widths, widths, w_o, b_o)

    def sliced_add_layernorm(self, x, residual, cu_seqlens, widths, weight, bias,
                             eps=1e-5):
        n = residual.shape[0]
        return self.base.sliced_add_layernorm(x, residual[n - 1:], _CU1.to(x.device),
                                              widths, weight, bias, eps)

    def sliced_ffn(self, x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4):
        return self.base.sliced_ffn(x, _CU1.to(x.device), widths, w1, b1, w2, b2, ratio)


_CU1 = torch.tensor([0, 1], dtype=torch.int64)


# ----------------------------------------------------------- eager path --

def slice_layer(p: dict, w: int, ffn_ratio: int) -> dict:
    """A layer's weights (functional.LAYER_PARAMS at the maximal width) cut
    to their leading blocks at width w, contiguous (shared when w is the
    full width)."""
    r = ffn_ratio * w
    cut = {"w_qkv": p["w_qkv"][:, :w, :w], "b_qkv": p["b_qkv"][:, :w],
           "w_o": p["w_o"][:w, :w], "b_o": p["b_o"][:w],
           "ln1_w": p["ln1_w"][:w], "ln1_b": p["ln1_b"][:w],
           "w1": p["w1"][:r, :w], "b1": p["b1"][:r],
           "w2": p["w2"][:w, :r], "b2": p["b2"][:w],
           "ln2_w": p["ln2_w"][:w], "ln2_b": p["ln2_b"][:w]}
    return {k: v.detach().contiguous() for k, v in cut.items()}


def prepare_weights(model):
    """The weights of every width, cut once and contiguous (the full-width
    ones shared with the model): embeddings per embedding width, projection
    per (emb width, hidden width) and per hidden width from all E features,
    layers, output layer per hidden width."""
    cfg, net = model.cfg, model.net
    with torch.no_grad():
        emb, pos = net.item_emb.weight.detach(), net.pos_emb.weight.detach()
        wp, wout = net.w_p.detach(), net.out_weight.detach()
        return SimpleNamespace(
            emb={e: emb[:, :e].contiguous() for e in cfg.emb_widths},
            pos={e: pos[:, :e].contiguous() for e in cfg.emb_widths},
            wp={(e, d): wp[:d, :e].contiguous()
                for e in cfg.emb_widths for d in cfg.hidden_widths},
            wp_full={d: wp[:d].contiguous() for d in cfg.hidden_widths},
            bp={d: net.b_p.detach()[:d].contiguous() for d in cfg.hidden_widths},
            layers={d: [slice_layer(layer.params(), d, cfg.ffn_ratio) for layer in net.layers]
                    for d in cfg.hidden_widths},
            res=[None if layer.res_scale is None else layer.res_scale.detach()
                 for layer in net.layers],
            wout={d: wout[:, :d].contiguous() for d in cfg.hidden_widths},
            bout=net.b_out.detach())


class Recommender:
    """Top-k recommendations from a CANet (see the module docstring).

    Recommender(model) or Recommender.load(run_dir). One user runs the
    single-route path; a batch of several runs the model's packed routed
    path (one route plan for the batch) and scores only the last positions.
    """

    def __init__(self, model):
        model.eval()
        self.model = model
        cfg = self.cfg = model.cfg
        self.n_items, self.max_len = cfg.n_items, cfg.max_len
        self.table = cfg.routes()
        self.ratios = cfg.route_flop_ratios()
        prep = prepare_weights(model)
        self._emb, self._pos, self._wp, self._bp = prep.emb, prep.pos, prep.wp, prep.bp
        self._layers, self._res = prep.layers, prep.res
        self._wout, self._bout = prep.wout, prep.bout
        self._last_ops = LastRowOps({d: LastRowOps.head_mask(d, cfg.num_heads, d)
                                     for d in cfg.hidden_widths})
        # read-only index tensors, shared by every request
        self._cu = [torch.tensor([0, n], dtype=torch.int64) for n in range(self.max_len + 1)]
        self._len = [torch.tensor([n], dtype=torch.int64) for n in range(self.max_len + 1)]
        self._width = {w: torch.tensor([w], dtype=torch.int64)
                       for w in set(cfg.emb_widths) | set(cfg.hidden_widths)}

    @classmethod
    def load(cls, run_dir: str, which: str = "best") -> "Recommender":
        """From a `canet train` run directory (config + safetensors)."""
        from .train import load_model
        model, _ = load_model(run_dir, which)
        return cls(model)

    # -------------------------------------------------------------- API --
    def recommend(self, history, k: int = 10, exclude_seen: bool = True, route=None):
        """Top-k of one history (-> Recommendation) or of a batch of
        histories (-> list of Recommendation, in order)."""
        hists, single = check_histories(history, self.n_items)
        if not _is_id(k) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        routes = _check_route(route, self.cfg.num_routes, len(hists), single)
        with torch.inference_mode():
            if len(hists) == 1:
                out = [self._one(hists[0], k, exclude_seen,
                                 None if routes is None else routes[0])]
            else:
                out = self._batch(hists, k, exclude_seen, routes)
        return out[0] if single else out

    def route(self, history):
        """The router's route id for one history (or a list for a batch),
        without running the supernet."""
        hists, single = check_histories(history, self.n_items)
        with torch.inference_mode():
            items, lengths = pad_right([h[-self.max_len:] for h in hists],
                                       max(min(len(h), self.max_len) for h in hists))
            r = self.model.route(items, lengths).routes.tolist()
        return r[0] if single else r

    def export(self, path: str, k: int = 10, variant: str = "plain", **kwargs) -> str:
        """An AOTInductor package of the routed inference path (see
        `export_package`)."""
        return export_package(self.model, path, k=k, variant=variant, **kwargs)

    def compile(self, path: str, k: int = 10, variant: str = "plain") -> "CompiledRecommender":
        """`export` to `path`, then the package's CompiledRecommender (the
        same API; minutes for the full-size model on a 2-core CPU)."""
        return CompiledRecommender(self.export(path, k=k, variant=variant))

    # ------------------------------------------------------------ paths --
    def _make(self, r, ids, scores, n_valid) -> Recommendation:
        e, d, depth = self.table[r]
        ids, scores = ids[:n_valid], scores[:n_valid]
        return Recommendation(ids, scores, r, e, d, depth, self.ratios[r])

    def _one(self, hist, k, exclude_seen, route):
        """One user: its route's widths and depth are known on the host."""
        cfg, T = self.cfg, min(len(hist), self.max_len)
        seen = torch.tensor(hist, dtype=torch.int64)
        x = seen[-T:]
        if route is None:
            route = int(self.model.route(x[None], self._len[T]).routes[0])
        e, d, depth = self.table[route]
        cu, wd = self._cu[T], self._width[d]
        h = torch.nn.functional.embedding(x, self._emb[e]) + self._pos[e][:T]   # [T, e]
        h = functional.sliced_linear(h, cu, self._width[e], wd, self._wp[e, d],
                                     self._bp[d])                               # [T, d]
        layers = self._layers[d]
        for l in range(depth):
            # the route's last layer: its last position only (LastRowOps)
            ops = functional if l < depth - 1 else self._last_ops
            h = functional.routed_layer(h, cu, wd, layers[l], cfg.num_heads, cfg.ffn_ratio,
                                        cfg.ln_eps, self._res[l], ops=ops)
        s = torch.addmv(self._bout, self._wout[d], h[-1])                      # [n + 1]
        s[0] = -math.inf
        if exclude_seen:
            s.index_fill_(0, seen, -math.inf)
        n_valid = _n_valid(hist, self.n_items, exclude_seen)
        top = s.topk(min(k, max(n_valid, 1)))
        return self._make(route, top.indices.tolist(), top.values.tolist(), n_valid)

    def _batch(self, hists, k, exclude_seen, routes):
        """Several users: one packed routed pass (route plan), last rows only."""
        model, net = self.model, self.model.net
        B = len(hists)
        items, lengths = pad_right([h[-self.max_len:] for h in hists],
                                   max(min(len(h), self.max_len) for h in hists))
        if routes is None:
            rid = model.route(items, lengths).routes
        else:
            rid = torch.tensor(routes, dtype=torch.int64)
        r, _ = net.resolve_routes(rid, B, items.device)
        h, plan = net.encode_routed(items, lengths, r, dropout=False)
        s = net.score_rows(h[plan.cu_seqlens[1:] - 1], plan.widths)[plan.inverse]
        s[:, 0] = -math.inf
        if exclude_seen:
            seen, _ = pad_right(hists, max(len(h) for h in hists))
            s.scatter_(1, seen, -math.inf)          # padding 0 is -inf already
        top = s.topk(min(k, self.n_items), dim=1)
        ids, vals, rid = top.indices.tolist(), top.values.tolist(), rid.tolist()
        return [self._make(rid[b], ids[b], vals[b],
                           min(k, _n_valid(hists[b], self.n_items, exclude_seen)))
                for b in range(B)]


# ---------------------------------------------------------------- export --

VARIANTS = ("plain", "ops")


class ServingGraph(nn.Module):
    """The routed inference path of one user as one graph without host
    syncs, for torch.export / AOTInductor: router -> route id -> route table
    (tensors) -> embeddings -> projection -> layers -> scoring of the last
    position at the route's hidden width -> exclude seen -> top-k. Layer l
    runs under torch.cond: the layer if the route is deeper, the layer at
    the last position only (LastRowOps) if l is the route's last, nothing
    past it. Both variants run the layers through functional.routed_layer:

    * "ops": the canet ops on [T, D] with the widths as tensors (their
      outputs' shapes do not depend on them); one copy of the weights; the
      compiled graph calls torch.ops.canet.* (libcanet.so in C++).
    * "plain": one branch per hidden width (torch.cond on the route's
      width) whose layers run PlainOps on [T, w] with weights cut to w once
      (buffers of the graph), so AOTInductor sees static shapes and fuses
      the elementwise work; no custom ops.

    forward(items [T] int64 (the last <= max_len ids, 1 <= T), seen [S] int64
    (ids to exclude; pass [0] for none), route [1] int64 (-1 = the router's
    choice)) -> (top ids [K], top scores [K], route [1], emb [1], hidden [1],
    depth [1]). Scores of excluded items are -inf."""

    def __init__(self, model, k: int = 10, variant: str = "plain"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.model, self.variant = model, variant
        self.rungs = model.has_rungs     # fixed when traced
        self.k = min(int(k), model.cfg.n_items)
        if variant == "plain":
            prep = prepare_weights(model)
            self.widths = _WidthSwitch([_WidthNet(model, prep, d)
                                        for d in model.cfg.hidden_widths])

    def forward(self, items, seen, route):
        m = self.model
        net, cfg = m.net, m.cfg
        T = items.shape[0]
        lengths = torch.ones_like(items).sum().reshape(1)                 # [1] = T
        if self.rungs:   # the router runs only if the rungs cut on its score
            logits = m.router(items[None], lengths) if cfg.rung_signal == "router" else None
            picked = m.rung_pick(logits, lengths)
        else:   # pick's argmax, without its Python branch on the bias
            logits = m.router(items[None], lengths)
            picked = (logits.double() - m.cost_bias * m.route_ratio[None]).argmax(-1)
        r = torch.where(route >= 0, route, picked)
        e, d, depth = m.route_emb[r], m.route_hid[r], m.route_depth[r]
        x = net.item_emb(items) + net.pos_emb.weight[:T]                  # [T, E]
        if self.variant == "plain":
            # the route's embedding width: the features below e
            x = x * (torch.arange(cfg.E) < e).to(x.dtype)
            s = self.widths(x, d, depth)                                   # [n + 1]
        else:
            zero = torch.zeros_like(lengths)
            cu = torch.cat([zero, lengths])
            h = functional.sliced_linear(x, cu, e, d, net.w_p, net.b_p)  # [T, D]
            for l, layer in enumerate(net.layers):
                h = torch.cond(depth[0] > l + 1, _LayerBranch(layer),
                               _LastOrSkip(_LayerBranch(layer, LastRowOps()), l + 1),
                               (h, cu, d, depth))
            cu1 = torch.cat([zero, torch.ones_like(lengths)])
            n1 = torch.full_like(d, cfg.n_items + 1)
            s = functional.sliced_linear(h[T - 1:], cu1, d, n1, net.out_weight,
                                         net.b_out)[0]                     # [n + 1]
        mask = torch.zeros(s.shape[0], dtype=torch.bool).index_fill(0, seen, True)
        mask = mask.index_fill(0, torch.zeros_like(lengths), True)       # padding id
        s = s.masked_fill(mask, float("-inf"))
        top = s.topk(self.k)
        return top.indices, top.values, r, e, d, depth


def _last_row(h, y):
    """h with its last row replaced by y [1, D] (the rows above are not read
    again: the layer was the route's last)."""
    rows = torch.arange(h.shape[0], device=h.device)[:, None]
    return torch.where(rows == h.shape[0] - 1, y, h)


class _LayerBranch(nn.Module):
    """A RoutedLayer as a torch.cond branch (the module's own forward), or
    with `ops` (LastRowOps) at the last position only."""

    def __init__(self, layer, ops=None):
        super().__init__()
        self.layer, self.ops = layer, ops

    def forward(self, h, cu, d, depth=None):
        if self.ops is None:
            return self.layer(h, cu, d, dropout=False)
        lay = self.layer
        y = functional.routed_layer(h, cu, d, lay.params(), lay.num_heads, lay.ffn_ratio,
                                    lay.ln_eps, lay.res_scale, ops=self.ops)
        return _last_row(h, y)


class _LastOrSkip(nn.Module):
    """`last` if the route's depth is `depth`, else nothing (past it)."""

    def __init__(self, last, depth: int):
        super().__init__()
        self.last, self.depth = last, depth

    def forward(self, h, *args):
        depth = args[-1]
        return torch.cond(depth[0] == self.depth, _Drop(self.last), _skip, (h,) + args)


class _Drop(nn.Module):
    """Calls `fn` without the trailing depth operand."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args[:-1])


def _skip(h, *args):
    return h.clone()


class _PlainLayer(nn.Module):
    """Layer l of a _WidthNet through PlainOps (or, `last`, LastRowOps over
    PlainOps at the last position only)."""

    def __init__(self, net, l: int, last: bool = False):
        super().__init__()
        object.__setattr__(self, "_net", net)   # the parent; not a child module
        self.l, self.last = l, last

    def forward(self, h):
        n, cfg = self._net, self._net.cfg
        ops = n.last_ops if self.last else PlainOps
        y = functional.routed_layer(h, None, None, n.layer_params(self.l), cfg.num_heads,
                                    cfg.ffn_ratio, cfg.ln_eps, n.res_scale(self.l), ops=ops)
        return _last_row(h, y) if self.last else y


class _WidthNet(nn.Module):
    """The supernet at one hidden width d for the "plain" graph: projection
    from the (masked) embeddings, the layers (depth by torch.cond) and the
    scores, with weights cut to width d once and held as buffers."""

    def __init__(self, model, prep, d: int):
        super().__init__()
        self.cfg, self.d = model.cfg, d
        # copies: no buffer aliases a parameter of the model
        self.register_buffer("wp", prep.wp_full[d].clone())
        self.register_buffer("bp", prep.bp[d].clone())
        self.register_buffer("wout", prep.wout[d].clone())
        self.register_buffer("bout", prep.bout.clone())
        for l, p in enumerate(prep.layers[d]):
            for k, v in p.items():
                self.register_buffer(f"l{l}_{k}", v.clone())
            if prep.res[l] is not None:
                self.register_buffer(f"l{l}_res", prep.res[l].clone())
        self.last_ops = LastRowOps({d: LastRowOps.head_mask(d, model.cfg.num_heads, d)},
                                   base=PlainOps)
        self.full = nn.ModuleList(_PlainLayer(self, l) for l in range(model.cfg.L))
        self.lasts = nn.ModuleList(_LastOrSkip(_PlainLayer(self, l, last=True), l + 1)
                                   for l in range(model.cfg.L))

    def layer_params(self, l):
        return {k: getattr(self, f"l{l}_{k}") for k in functional.LAYER_PARAMS}

    def res_scale(self, l):
        return getattr(self, f"l{l}_res", None)

    def forward(self, x, depth):
        h = torch.nn.functional.linear(x, self.wp, self.bp)                # [T, d]
        for l in range(self.cfg.L):
            h = torch.cond(depth[0] > l + 1, _Drop(self.full[l]), self.lasts[l], (h, depth))
        return torch.nn.functional.linear(h[-1], self.wout, self.bout)    # [n + 1]


class _WidthSwitch(nn.Module):
    """Runs the _WidthNet of the route's hidden width (nested torch.cond)."""

    def __init__(self, nets, i: int = 0):
        super().__init__()
        self.net = nets[i]
        self.rest = _WidthSwitch(nets, i + 1) if i + 1 < len(nets) else None

    def forward(self, x, d, depth):
        if self.rest is None:
            return self.net(x, depth)
        return torch.cond(d[0] == self.net.d, _Drop(self.net), _SwapRest(self.rest),
                          (x, depth, d))


class _SwapRest(nn.Module):
    def __init__(self, rest):
        super().__init__()
        self.rest = rest

    def forward(self, x, depth, d):
        return self.rest(x, d, depth)


def package_metadata(cfg, k: int, variant: str) -> dict:
    """What a package's user needs besides the graph (strings, as AOTI
    metadata)."""
    return {"canet.format": "1", "canet.variant": variant, "canet.n_items": str(cfg.n_items),
            "canet.max_len": str(cfg.max_len), "canet.k": str(min(k, cfg.n_items)),
            "canet.num_routes": str(cfg.num_routes),
            "canet.routes": json.dumps(cfg.routes()),
            "canet.flop_ratios": json.dumps(cfg.route_flop_ratios())}


def export_package(model, path: str, k: int = 10, variant: str = "plain",
                   inductor_configs: dict | None = None, max_seen: int = 1 << 20) -> str:
    """torch.export of `ServingGraph(model, k, variant)` (dynamic history
    length 1..max_len, dynamic number of excluded ids) compiled by
    AOTInductor into a .pt2 package at `path`. Load it with
    `CompiledRecommender(path)` in Python or with
    `torch::inductor::AOTIModelPackageLoader` in C++ after loading
    libcanet.so (which registers the canet ops the "ops" variant calls; see
    examples/cpp_serving). The package holds the weights and code compiled
    for this machine's CPU. Returns the path."""
    cfg = model.cfg
    if cfg.max_len < 2:
        raise ValueError("export_package needs max_len >= 2")
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    graph = ServingGraph(m, k, variant).eval()
    T = min(3, cfg.max_len)
    example = (torch.arange(1, T + 1, dtype=torch.int64) % cfg.n_items + 1,
               torch.tensor([1, 2, 3, 4], dtype=torch.int64) % cfg.n_items + 1,
               torch.tensor([-1], dtype=torch.int64))
    dims = ({0: torch.export.Dim("T", min=1, max=cfg.max_len)},
            {0: torch.export.Dim("S", min=1, max=max_seen)}, None)
    with torch.no_grad():
        ep = torch.export.export(graph, example, dynamic_shapes=dims, strict=False)
    configs = {"aot_inductor.metadata": package_metadata(cfg, k, variant)}
    configs.update(inductor_configs or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return torch._inductor.aoti_compile_and_package(ep, package_path=path,
                                                    inductor_configs=configs)


class CompiledRecommender:
    """The `Recommender` API over an AOTInductor package made by
    `export_package`: no model code at run time (the canet ops must be
    registered: importing canet_kernels does it). One history per call of
    the compiled graph (a batch runs them in turn).

    Threads: torch's Python binding of the package runner holds the GIL
    while the graph runs, so calls from Python threads cannot overlap
    anyway; they take turns on one runner behind a lock. (With several
    runners a thread could wait inside the runner for a free one while
    holding the GIL, which another thread's run may need to free an input
    tensor: a deadlock.) The inputs stay referenced until the call returns,
    so a run never frees a Python-owned tensor. For requests that overlap,
    use the eager Recommender (its ops release the GIL) or C++."""

    def __init__(self, path: str):
        from . import ops as _ops  # noqa: F401  registers torch.ops.canet
        self._model = torch._inductor.aoti_load_package(path)
        meta = self._model.get_metadata()
        if "canet.n_items" not in meta:
            raise ValueError(f"{path}: not a canet serving package (no canet metadata)")
        self.path = path
        self.n_items, self.max_len = int(meta["canet.n_items"]), int(meta["canet.max_len"])
        self.k_max = int(meta["canet.k"])
        self.variant = meta.get("canet.variant", "ops")
        self.table = [tuple(r) for r in json.loads(meta["canet.routes"])]
        self.ratios = json.loads(meta["canet.flop_ratios"])
        loader = getattr(self._model, "loader", None)
        self._run = (loader.boxed_run if loader is not None and
                     hasattr(loader, "boxed_run") else lambda a: self._model(*a))
        self._lock = threading.Lock()

    def recommend(self, history, k: int = 10, exclude_seen: bool = True, route=None):
        hists, single = check_histories(history, self.n_items)
        if not _is_id(k) or not 1 <= k <= self.k_max:
            raise ValueError(f"k must be in 1..{self.k_max} (the package's k), got {k!r}")
        routes = _check_route(route, len(self.table), len(hists), single)
        out = []
        with torch.inference_mode():
            for b, hist in enumerate(hists):
                seen = torch.tensor(hist, dtype=torch.int64)
                inputs = [seen[-self.max_len:],
                          seen if exclude_seen else torch.zeros(1, dtype=torch.int64),
                          torch.tensor([-1 if routes is None else routes[b]])]
                with self._lock:
                    ids, vals, rt, *_ = self._run(list(inputs))
                del inputs
                n = min(k, _n_valid(hist, self.n_items, exclude_seen))
                rid = int(rt[0])
                e, d, depth = self.table[rid]
                out.append(Recommendation(ids[:n].tolist(), vals[:n].tolist(), rid, e, d,
                                          depth, self.ratios[rid]))
        return out[0] if single else out


# ------------------------------------------------------------------ main --

def main(argv=None) -> int:
    """python -m canet_kernels.serving export --ckpt RUN --out model.pt2
    python -m canet_kernels.serving recommend --package model.pt2 --seq "1 2 3"
    """
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m canet_kernels.serving",
                                 description="export a CANet run for serving, or serve "
                                             "a package")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="AOTInductor package of a `canet train` run")
    e.add_argument("--ckpt", required=True, help="run directory")
    e.add_argument("--out", required=True, help="package path (.pt2)")
    e.add_argument("-k", type=int, default=10, help="items the package returns (max k)")
    e.add_argument("--variant", choices=VARIANTS, default="plain")
    r = sub.add_parser("recommend", help="top-k from a package")
    r.add_argument("--package", required=True)
    r.add_argument("--seq", action="append", required=True,
                   help='item ids, e.g. "1 2 3" (repeatable)')
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--route", type=int, default=None, help="force a route id")
    r.add_argument("--keep-seen", action="store_true")
    r.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.command == "export":
            path = Recommender.load(args.ckpt).export(args.out, k=args.k,
                                                      variant=args.variant)
            print(path)
            return 0
        crec = CompiledRecommender(args.package)
        seqs = [[int(v) for v in s.replace(",", " ").split()] for s in args.seq]
        recs = crec.recommend(seqs, k=args.k, exclude_seen=not args.keep_seen,
                              route=args.route)
    except (ValueError, FileNotFoundError) as exc:
        print(f"canet serving: error: {exc}", file=sys.stderr)
        return 2
    for s, rec in zip(seqs, recs):
        if args.json:
            print(json.dumps(dict(rec.to_dict(), sequence=s)))
        else:
            print(f"{' '.join(map(str, s[-10:]))} -> {' '.join(map(str, rec.items))}   "
                  f"[route {rec.route}: emb {rec.emb} hidden {rec.hidden} depth {rec.depth}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
