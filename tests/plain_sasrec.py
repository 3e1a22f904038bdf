"""A plain SASRec forward for one route, written from the weights alone
(nothing from canet's model, functional or routing code): the independent
reference the module tests compare against.

Route (e, d, k): item and position embeddings cut to their first e
features, projection W_p[:d, :e], k post-LN layers at width d with the
leading blocks of every weight, `heads` heads of width d / heads, causal
softmax attention, exact GELU, each sublayer's output times its residual
scale before the add, output layer W_out[:, :d].
"""
from __future__ import annotations

import math

import torch


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def one_user(state, seq, e, d, k, heads, eps=1e-5, prefix="net."):
    """Hidden states [n, d] of one user's item ids `seq` (list, time order)
    on route (e, d, k), from a state dict with canet's parameter names."""
    S = {n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)}
    n = len(seq)
    ids = torch.tensor(seq)
    x = S["item_emb.weight"][ids, :e] + S["pos_emb.weight"][:n, :e]
    h = x @ S["w_p"][:d, :e].T + S["b_p"][:d]
    hd = d // heads
    causal = torch.ones(n, n).tril().bool()
    for i in range(k):
        L = {n_[len(f"layers.{i}."):]: v for n_, v in S.items()
             if n_.startswith(f"layers.{i}.")}
        scale = L.get("res_scale", torch.ones(2, dtype=h.dtype))
        q, kk, v = (h @ L["w_qkv"][j, :d, :d].T + L["b_qkv"][j, :d] for j in range(3))
        ctx = torch.empty_like(h)
        for a in range(heads):
            sl = slice(a * hd, (a + 1) * hd)
            s = (q[:, sl] @ kk[:, sl].T) / math.sqrt(hd)
            s = s.masked_fill(~causal, float("-inf"))
            ctx[:, sl] = torch.softmax(s, -1) @ v[:, sl]
        att = ctx @ L["w_o"][:d, :d].T + L["b_o"][:d]
        h = _ln(h + scale[0] * att, L["ln1_w"][:d], L["ln1_b"][:d], eps)
        r = L["w1"].shape[0] // L["w1"].shape[1]
        f = _gelu(h @ L["w1"][:r * d, :d].T + L["b1"][:r * d])
        f = f @ L["w2"][:d, :r * d].T + L["b2"][:d]
        h = _ln(h + scale[1] * f, L["ln2_w"][:d], L["ln2_b"][:d], eps)
    return h


def scores(state, last, d, prefix="net."):
    """Scores [n_items + 1] of a last hidden state [d]."""
    w = state.get(prefix + "w_out")
    if w is None:                      # tied: the item table
        w = state[prefix + "item_emb.weight"]
    return last @ w[:, :d].T + state[prefix + "b_out"]
