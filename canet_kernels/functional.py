"""Functional API of the canet ops.

Each function takes packed tokens `x[T, D]` with `cu_seqlens` (int32/int64,
B + 1 offsets) or, for convenience, a padded batch `x[B, L, D]` with
`lengths[B]` (right padding, or left padding with `left_padded=True`); the
padded form packs, runs the op and unpacks, and padded positions come back
as zeros. Routes are tensors of per-sample widths.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  registers fakes and autograd
from .routing import token_index

_canet = torch.ops.canet


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    cu = lengths.new_zeros(lengths.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), 0, out=cu[1:])
    return cu


def pack(x, lengths, left_padded=False):
    """[B, L, D] padded -> (packed [T, D], cu_seqlens [B + 1])."""
    if x.dim() != 3:
        raise ValueError(f"pack: x must be [B, L, D], got shape {tuple(x.shape)}")
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"pack: lengths must have shape ({x.shape[0]},), got "
                         f"{tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > x.shape[1]).any():
        raise ValueError(f"pack: lengths must lie in [0, {x.shape[1]}]")
    idx = token_index(lengths, x.shape[1], left_padded)
    return x.reshape(-1, x.shape[2]).index_select(0, idx), \
        cu_seqlens_from_lengths(lengths)


def unpack(packed, lengths, L, left_padded=False):
    """packed [T, D] -> [B, L, D] with zeros at padded positions."""
    B, D = lengths.shape[0], packed.shape[1]
    idx = token_index(lengths, L, left_padded)
    out = packed.new_zeros(B * L, D).index_copy(0, idx, packed)
    return out.reshape(B, L, D)


def _padded(fn, x, lengths, left_padded, *args):
    if lengths is None:
        raise ValueError("a padded x[B, L, D] needs lengths[B]")
    packed, cu = pack(x, lengths, left_padded)
    return unpack(fn(packed, cu, *args), lengths, x.shape[1], left_padded)


def sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias=None):
    """y[:, :o_b] = x[:, :i_b] @ weight[:o_b, :i_b].T + bias[:o_b]; zero beyond."""
    return _canet.sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias)


def sliced_attention(x, cu_seqlens_or_lengths, widths, w_qkv, b_qkv, w_o, b_o,
                     num_heads, causal=True, left_padded=False):
    """Self-attention sublayer at per-sample width (w_qkv [3, D, D], w_o [D, D])."""
    if x.dim() == 3:
        return _padded(lambda p, cu: sliced_attention(
            p, cu, widths, w_qkv, b_qkv, w_o, b_o, num_heads, causal),
            x, cu_seqlens_or_lengths, left_padded)
    return _canet.sliced_attention(x, cu_seqlens_or_lengths, widths, w_qkv, b_qkv,
                                   w_o, b_o, num_heads, causal)


def sliced_ffn(x, cu_seqlens_or_lengths, widths, w1, b1, w2, b2, ratio=4,
               left_padded=False):
    """FFN sublayer gelu(x W1^T + b1) W2^T + b2 at per-sample width."""
    if x.dim() == 3:
        return _padded(lambda p, cu: sliced_ffn(p, cu, widths, w1, b1, w2, b2, ratio),
                       x, cu_seqlens_or_lengths, left_padded)
    return _canet.sliced_ffn(x, cu_seqlens_or_lengths, widths, w1, b1, w2, b2, ratio)


def sliced_add_layernorm(x, residual, cu_seqlens_or_lengths, widths, weight, bias,
                         eps=1e-5, left_padded=False):
    """LayerNorm(x + residual) over each sample's first width features."""
    if x.dim() == 3:
        lengths = cu_seqlens_or_lengths
        if lengths is None:
            raise ValueError("a padded x[B, L, D] needs lengths[B]")
        r, _ = pack(residual, lengths, left_padded)
        return _padded(lambda p, cu: sliced_add_layernorm(
            p, r, cu, widths, weight, bias, eps), x, lengths, left_padded)
    return _canet.sliced_add_layernorm(x, residual, cu_seqlens_or_lengths, widths,
                                       weight, bias, eps)


# ------------------------------------------------------------- the layer ----
# One post-LN SASRec layer, the body every routed path runs (model, encoder
# modules, benchmarks):
#     h = LN1(s0 * drop(attn(x)) + x);  out = LN2(s1 * drop(ffn(h)) + h)
# `p` maps the weight names of `LAYER_PARAMS` to tensors at the maximal width
# D; `res_scale` = [s0, s1] or None (plain post-LN).

LAYER_PARAMS = ("w_qkv", "b_qkv", "w_o", "b_o", "ln1_w", "ln1_b",
                "w1", "b1", "w2", "b2", "ln2_w", "ln2_b")


def _sublayer_out(y, res_scale, i, dropout, training):
    if dropout > 0 and training:
        y = torch.nn.functional.dropout(y, dropout, True)
    return y if res_scale is None else y * res_scale[i]


def routed_layer(x, cu_seqlens, widths, p, num_heads, ffn_ratio=4, eps=1e-5,
                 res_scale=None, dropout=0.0, training=False, ops=None):
    """One layer on packed tokens x [T, D], sample b at width widths[b]
    (zero beyond it in and out). `ops` supplies the four sliced ops with this
    module's signatures (default: torch.ops.canet through this module)."""
    o = _this if ops is None else ops
    a = o.sliced_attention(x, cu_seqlens, widths, p["w_qkv"], p["b_qkv"], p["w_o"],
                           p["b_o"], num_heads, True)
    h = o.sliced_add_layernorm(_sublayer_out(a, res_scale, 0, dropout, training), x,
                               cu_seqlens, widths, p["ln1_w"], p["ln1_b"], eps)
    f = o.sliced_ffn(h, cu_seqlens, widths, p["w1"], p["b1"], p["w2"], p["b2"],
                     ffn_ratio)
    return o.sliced_add_layernorm(_sublayer_out(f, res_scale, 1, dropout, training), h,
                                  cu_seqlens, widths, p["ln2_w"], p["ln2_b"], eps)


# --------------------------------------------------- masked formulation ----
# The paper's formulation of the same layer: every sample at full width D on
# a right-padded [B, L, D] batch, outputs zero-masked beyond each width, one
# feature mask per head (head i of sample b owns features
# [i * w_b / H, (i + 1) * w_b / H)). The parity reference of the routed path.

_HALF = (torch.float16, torch.bfloat16)


class MaskedContext:
    """Everything the masked formulation derives from the widths [B]."""

    def __init__(self, widths, num_heads, D, ffn_ratio, L, dtype):
        dev = widths.device
        feat = torch.arange(D, device=dev)
        self.fmask = (feat[None, :] < widths[:, None]).to(dtype)[:, None, :]   # [B, 1, D]
        hd = widths // num_heads
        lo = torch.arange(num_heads, device=dev)[None, :, None] * hd[:, None, None]
        hmask = (feat >= lo) & (feat < lo + hd[:, None, None])                 # [B, H, D]
        self.hmask = hmask.to(dtype)[:, :, None, :]                            # [B, H, 1, D]
        self.scale = hd.to(dtype).rsqrt()[:, None, None, None]
        self.width = widths.to(dtype)[:, None, None]
        self.inner = (torch.arange(ffn_ratio * D, device=dev)[None, :]
                      < ffn_ratio * widths[:, None]).to(dtype)[:, None, :]
        pos = torch.arange(L, device=dev)
        # right padding: a real token never sees a padded one, causal is enough
        self.future = pos[None, :] > pos[:, None]                              # [L, L]


def masked_layer_norm(x, m, weight, bias, eps=1e-5):
    """LayerNorm over each sample's first width features, zero beyond."""
    mean = (x * m.fmask).sum(-1, keepdim=True) / m.width
    xc = (x - mean) * m.fmask
    var = (xc * xc).sum(-1, keepdim=True) / m.width
    return (xc * torch.rsqrt(var + eps) * weight + bias) * m.fmask


def masked_attention(h, p, m):
    D = h.shape[-1]
    qkv = torch.nn.functional.linear(h, p["w_qkv"].reshape(3 * D, D),
                                     p["b_qkv"].reshape(3 * D))
    q, k, v = qkv.chunk(3, dim=-1)
    s = (q[:, None] * m.hmask) @ k[:, None].transpose(-1, -2) * m.scale     # [B, H, L, L]
    s = s.masked_fill(m.future, float("-inf"))
    pr = torch.softmax(s.float() if s.dtype in _HALF else s, dim=-1).to(h.dtype)
    ctx = (pr @ (v[:, None] * m.hmask)).sum(1)                               # [B, L, D]
    return torch.nn.functional.linear(ctx, p["w_o"], p["b_o"]) * m.fmask


def masked_ffn(h, p, m):
    F = torch.nn.functional
    f = F.gelu(F.linear(h, p["w1"], p["b1"])) * m.inner
    return F.linear(f, p["w2"], p["b2"]) * m.fmask


def masked_layer(h, p, m, eps=1e-5, res_scale=None, dropout=0.0, training=False):
    """`routed_layer` in the masked formulation on h [B, L, D]."""
    a = masked_attention(h, p, m)
    h = masked_layer_norm(_sublayer_out(a, res_scale, 0, dropout, training) + h, m,
                          p["ln1_w"], p["ln1_b"], eps)
    f = masked_ffn(h, p, m)
    return masked_layer_norm(_sublayer_out(f, res_scale, 1, dropout, training) + h, m,
                             p["ln2_w"], p["ln2_b"], eps)


_this = __import__("sys").modules[__name__]


# ------------------------------------------------------- routed scoring ----
# Loss and full ranking over the item table without the [rows, items]
# logits: row i of h runs at width widths[i] (h[i, :w] against weight[:, :w]).
# h may carry leading dims ([B, L, D] for every position of a padded batch);
# widths then has the leading shape or a prefix of it (per sample: [B]).

SCORING_CHUNK = 4096  # items per chunk of the CPU kernels (the schema default)


def _scoring_rows(h, widths):
    if h.dim() < 1:
        raise ValueError("h must be [..., features]")
    lead = h.shape[:-1]
    if widths.dim() > len(lead) or tuple(lead[:widths.dim()]) != tuple(widths.shape):
        raise ValueError(f"widths must have shape {tuple(lead)} or a prefix of it, got "
                         f"{tuple(widths.shape)}")
    widths = widths.reshape(widths.shape + (1,) * (len(lead) - widths.dim())).expand(lead)
    return h.reshape(-1, h.shape[-1]), widths.reshape(-1), lead


def sliced_linear_cross_entropy(h, widths, weight, bias, targets, ignore_index=-100,
                                chunk_size=SCORING_CHUNK):
    """Mean cross-entropy of rows h [..., D] against all items of weight [V, >= w]
    (logits h[i, :w_i] @ weight[:, :w_i].T + bias) with targets [...] (rows with a
    negative target or ignore_index are skipped; 0 if all are), computed chunk by
    chunk: no [rows, V] tensor is kept for backward."""
    h2, w2, lead = _scoring_rows(h, widths)
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"targets must have shape {tuple(lead)}, got {tuple(targets.shape)}")
    return _canet.sliced_linear_cross_entropy(h2, w2, weight, bias, targets.reshape(-1),
                                              ignore_index, chunk_size)


def sliced_linear_topk(h, widths, weight, bias=None, k=10, chunk_size=SCORING_CHUNK,
                       exclude=None):
    """(values [..., k], indices [..., k]): each row's k best items (score
    descending, lower index first on ties), without the [rows, V] scores.
    exclude [..., M] (or [1, M] for every row) lists ids to score -inf, padded
    with -1; a column of zeros excludes the padding item 0."""
    h2, w2, lead = _scoring_rows(h, widths)
    if exclude is not None and not (exclude.dim() == 2 and exclude.shape[0] == 1):
        if tuple(exclude.shape[:-1]) != tuple(lead):
            raise ValueError(f"exclude must be [{', '.join(map(str, lead))}, M] or [1, M], "
                             f"got {tuple(exclude.shape)}")
        exclude = exclude.reshape(-1, exclude.shape[-1])
    values, indices = _canet.sliced_linear_topk(h2, w2, weight, bias, k, chunk_size, exclude)
    return values.reshape(*lead, k), indices.reshape(*lead, k)
