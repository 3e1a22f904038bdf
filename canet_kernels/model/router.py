"""The router: a light dense 1-layer transformer over a user's sequence whose
last position gives one logit per route."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CANetConfig


class Router(nn.Module):
    def __init__(self, cfg: CANetConfig):
        super().__init__()
        self.cfg = cfg
        W = cfg.router_width
        self.item_emb = nn.Embedding(cfg.n_items + 1, W, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, W)
        self.qkv = nn.Linear(W, 3 * W)
        self.out = nn.Linear(W, W)
        self.ln1 = nn.LayerNorm(W, eps=cfg.ln_eps)
        self.ff1 = nn.Linear(W, cfg.router_ffn)
        self.ff2 = nn.Linear(cfg.router_ffn, W)
        self.ln2 = nn.LayerNorm(W, eps=cfg.ln_eps)
        self.head = nn.Linear(W, cfg.num_routes)
        # optional features of user complexity (cfg.router_stats)
        self.stats = nn.Linear(2, W) if cfg.router_stats else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, items, lengths):
        """items [B, L] right-padded, lengths [B] -> route logits [B, R]."""
        cfg = self.cfg
        B, L = items.shape
        H, W = cfg.router_heads, cfg.router_width
        p = cfg.dropout if self.training else 0.0
        pos = torch.arange(L, device=items.device)
        h = F.dropout(self.item_emb(items) + self.pos_emb(pos)[None], p, self.training)
        valid = pos[None, :] < lengths[:, None]                        # [B, L]
        # Only the last position is read, and one layer deep it depends on the
        # other positions through their keys and values alone: one query per
        # user, and the FFN on one row per user.
        last = h[torch.arange(B, device=items.device), lengths - 1]     # [B, W]
        if self.stats is not None:
            last = last + self.stats(user_stats(items, lengths, cfg.max_len))
        wq, wkv = self.qkv.weight.split([W, 2 * W])
        bq, bkv = self.qkv.bias.split([W, 2 * W])
        q = F.linear(last, wq, bq).view(B, H, 1, W // H)
        k, v = F.linear(h, wkv, bkv).view(B, L, 2, H, W // H).permute(2, 0, 3, 1, 4)
        # bidirectional over the user's real items
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = self.ln1(last + F.dropout(self.out(ctx.reshape(B, W)), p, self.training))
        f = self.ff2(F.gelu(self.ff1(x)))
        x = self.ln2(x + F.dropout(f, p, self.training))
        return self.head(x)                                             # [B, R]


def user_stats(items, lengths, max_len):
    """[B, 2] features of a right-padded batch: log history length scaled to
    [0, 1] and the share of distinct items (low = a user who repeats)."""
    n = lengths.to(torch.float32)
    s = items.sort(1).values                                       # padding 0 first
    new = (s[:, 1:] != s[:, :-1]) & (s[:, 1:] > 0)
    distinct = new.sum(1) + (s[:, 0] > 0).long()
    return torch.stack([torch.log1p(n) / math.log1p(max_len),
                        distinct.to(torch.float32) / n.clamp_min(1)], 1)
