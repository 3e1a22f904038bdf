"""The weight-sliced SASRec-style supernet and its two execution paths.

Every route (e_b, d_b, L_b) uses the leading blocks of one set of weights:
item/position embeddings sliced to e_b, a projection W_p[:d_b, :e_b], L_b
post-LN transformer layers at width d_b (head dim d_b / heads, LayerNorm over
the first d_b features; each sublayer output times a learnable residual
scale before the add, initialised near 0 as in the CANet code) and an item
scorer W_out[:, :d_b].

* `routed`: the canet ops on a route-sorted packed batch (`plan_routes`);
  layer l runs on the prefix of samples deeper than l, rows that stop early
  are put back by `run_layers`. Real savings.
* `masked`: the paper's formulation, full width and every layer with
  per-sample feature masks; the reference for the routed path.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..routing import gather_tokens, plan_routes, run_layers
from .config import CANetConfig

_HALF = (torch.float16, torch.bfloat16)

# The op implementations the routed path calls; tests may swap in
# canet_kernels.reference (same signatures, plain PyTorch).
ops = functional


class Layer(nn.Module):
    """Weights of one post-LN transformer layer at the maximal width D."""

    def __init__(self, D: int, ratio: int, residual_scale_init=None):
        super().__init__()
        # [attention, FFN] output scales; None = plain post-LN
        self.res_scale = (None if residual_scale_init is None else
                          nn.Parameter(torch.full((2,), float(residual_scale_init))))
        self.w_qkv = nn.Parameter(torch.empty(3, D, D))      # [3, out, in]
        self.b_qkv = nn.Parameter(torch.zeros(3, D))
        self.w_o = nn.Parameter(torch.empty(D, D))
        self.b_o = nn.Parameter(torch.zeros(D))
        self.ln1_w = nn.Parameter(torch.ones(D))
        self.ln1_b = nn.Parameter(torch.zeros(D))
        self.w1 = nn.Parameter(torch.empty(ratio * D, D))
        self.b1 = nn.Parameter(torch.zeros(ratio * D))
        self.w2 = nn.Parameter(torch.empty(D, ratio * D))
        self.b2 = nn.Parameter(torch.zeros(D))
        self.ln2_w = nn.Parameter(torch.ones(D))
        self.ln2_b = nn.Parameter(torch.zeros(D))
        for w in (self.w_qkv, self.w_o, self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)


def masked_layer_norm(x, mask, width, weight, bias, eps):
    """LayerNorm over the features where mask is 1 (the first `width`), zero
    elsewhere. x [B, L, D]; mask [B, 1, D]; width [B, 1, 1]."""
    mean = (x * mask).sum(-1, keepdim=True) / width
    xc = (x - mean) * mask
    var = (xc * xc).sum(-1, keepdim=True) / width
    return (xc * torch.rsqrt(var + eps) * weight + bias) * mask


class Supernet(nn.Module):
    def __init__(self, cfg: CANetConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.E, cfg.D
        self.item_emb = nn.Embedding(cfg.n_items + 1, E, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, E)
        self.w_p = nn.Parameter(torch.empty(D, E))
        self.b_p = nn.Parameter(torch.zeros(D))
        self.layers = nn.ModuleList(Layer(D, cfg.ffn_ratio, cfg.residual_scale_init) for _ in range(cfg.L))
        self.w_out = nn.Parameter(torch.empty(cfg.n_items + 1, D))
        self.b_out = nn.Parameter(torch.zeros(cfg.n_items + 1))
        for w in (self.item_emb.weight, self.pos_emb.weight, self.w_p, self.w_out):
            nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _drop(self, x, dropout):
        p = self.cfg.dropout if dropout else 0.0
        return F.dropout(x, p, self.training) if p > 0 else x

    def _sub(self, x, layer, i, dropout):
        """Sublayer output i (0 attention, 1 FFN) as added to the residual."""
        x = self._drop(x, dropout)
        return x if layer.res_scale is None else x * layer.res_scale[i]

    # ------------------------------------------------------------ routed --
    def encode_routed(self, items, lengths, emb_w, hid_w, depth, gate=None,
                      dropout=True):
        """items [B, L] right-padded, lengths [B]; per-sample route widths
        and depths [B]; gate [B] or None. Returns (h [T, D] packed in plan
        order, zero beyond each sample's width; the plan)."""
        cfg = self.cfg
        plan = plan_routes(lengths, hid_w, depth, emb_w, num_layers=cfg.L)
        tok = gather_tokens(items, lengths, plan)                      # [T]
        starts = torch.repeat_interleave(plan.cu_seqlens[:-1], plan.lengths)
        pos = torch.arange(tok.shape[0], device=tok.device) - starts  # [T]
        # sliced_linear reads only x[:, :e_b]: no need to zero the rest.
        x = self._drop(self.item_emb(tok) + self.pos_emb(pos), dropout)  # [T, E]
        h = ops.sliced_linear(x, plan.cu_seqlens, plan.emb_widths, plan.widths,
                              self.w_p, self.b_p)                     # [T, D]

        def run(layer, h, cu, w):
            a = ops.sliced_attention(h, cu, w, layer.w_qkv, layer.b_qkv, layer.w_o,
                                     layer.b_o, cfg.num_heads, True)
            h = ops.sliced_add_layernorm(self._sub(a, layer, 0, dropout), h, cu, w,
                                         layer.ln1_w, layer.ln1_b, cfg.ln_eps)
            f = ops.sliced_ffn(h, cu, w, layer.w1, layer.b1, layer.w2, layer.b2,
                               cfg.ffn_ratio)
            return ops.sliced_add_layernorm(self._sub(f, layer, 1, dropout), h, cu, w,
                                            layer.ln2_w, layer.ln2_b, cfg.ln_eps)

        h = run_layers(plan, h, self.layers, run)                      # [T, D]
        if gate is not None:
            h = h * torch.repeat_interleave(gate[plan.order], plan.lengths)[:, None]
        return h, plan

    def score_routed(self, h, cu_seqlens, widths):
        """Full-ranking scores [T, n_items + 1] of packed rows h [T, D]."""
        full = torch.full_like(widths, self.cfg.n_items + 1)
        return ops.sliced_linear(h, cu_seqlens, widths, full, self.w_out, self.b_out)

    def score_last_routed(self, h, plan):
        """Scores of each sample's last token [B, n_items + 1], plan order."""
        last = plan.cu_seqlens[1:] - 1
        B = last.shape[0]
        cu = torch.arange(B + 1, device=h.device, dtype=torch.int64)
        return self.score_routed(h[last], cu, plan.widths)

    # ------------------------------------------------------------ masked --
    def encode_masked(self, items, lengths, emb_w, hid_w, depth, gate=None,
                      dropout=True):
        """The same network at full width with per-sample masks.
        Returns h [B, L, D] (caller order; padded positions are junk)."""
        cfg = self.cfg
        B, L = items.shape
        H, D, dt = cfg.num_heads, cfg.D, self.w_p.dtype
        dev = items.device
        feat = torch.arange(D, device=dev)
        fmask = (feat < hid_w[:, None]).to(dt)[:, None, :]                # [B, 1, D]
        width = hid_w.to(dt)[:, None, None]                               # [B, 1, 1]
        emask = (torch.arange(cfg.E, device=dev) < emb_w[:, None]).to(dt)[:, None, :]
        inner = (torch.arange(cfg.ffn_ratio * D, device=dev)
                 < cfg.ffn_ratio * hid_w[:, None]).to(dt)[:, None, :]  # [B, 1, rD]
        hd = hid_w // H                                                   # [B]
        head = torch.arange(H, device=dev)
        lo = (head[None, :] * hd[:, None])[..., None]                     # [B, H, 1]
        hmask = ((feat >= lo) & (feat < lo + hd[:, None, None])).to(dt)  # [B, H, D]
        hmask = hmask[:, :, None, :]                                      # [B, H, 1, D]
        scale = torch.rsqrt(hd.to(dt))[:, None, None, None]               # [B, 1, 1, 1]
        pos = torch.arange(L, device=dev)
        valid = pos[None, :] < lengths[:, None]                           # [B, L]
        allowed = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # [B, L, L]
        allowed = allowed[:, None]                                        # [B, 1, L, L]

        x = (self.item_emb(items) + self.pos_emb(pos)[None]) * emask     # [B, L, E]
        x = self._drop(x, dropout)
        h = F.linear(x, self.w_p, self.b_p) * fmask                      # [B, L, D]
        for l, layer in enumerate(self.layers):
            q = F.linear(h, layer.w_qkv[0], layer.b_qkv[0]) * fmask
            k = F.linear(h, layer.w_qkv[1], layer.b_qkv[1])
            v = F.linear(h, layer.w_qkv[2], layer.b_qkv[2])
            # head i of sample b sees only its own w_b/H features of q and v
            s = (q[:, None] * hmask) @ k[:, None].transpose(-1, -2) * scale  # [B, H, L, L]
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s.float() if dt in _HALF else s, dim=-1).to(dt)
            ctx = (p @ (v[:, None] * hmask)).sum(1)                      # [B, L, D]
            a = F.linear(ctx, layer.w_o, layer.b_o) * fmask
            h1 = masked_layer_norm(self._sub(a, layer, 0, dropout) + h, fmask, width,
                                   layer.ln1_w, layer.ln1_b, cfg.ln_eps)
            f = F.gelu(F.linear(h1, layer.w1, layer.b1)) * inner          # [B, L, rD]
            f = F.linear(f, layer.w2, layer.b2) * fmask
            h2 = masked_layer_norm(self._sub(f, layer, 1, dropout) + h1, fmask, width,
                                   layer.ln2_w, layer.ln2_b, cfg.ln_eps)
            # samples past their depth keep their state
            h = torch.where((depth > l)[:, None, None], h2, h)
        if gate is not None:
            h = h * gate[:, None, None]
        return h

    def score_masked(self, h):
        """h [..., D] zero beyond each width -> scores [..., n_items + 1]."""
        return F.linear(h, self.w_out, self.b_out)
