"""Plain-PyTorch references of every canet op: an obviously correct loop over
samples. Tests compare every backend (forward and autograd gradients) with
these; they are slow and never used on a hot path.

Conventions (see csrc/registration.cpp): packed tokens x[T, D]; sample b owns
rows cu_seqlens[b]:cu_seqlens[b+1] and runs at width widths[b]; outputs are
zero beyond the sample's width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _segments(cu_seqlens):
    cu = [int(v) for v in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:]))


def _pad_cols(y, width):
    return F.pad(y, (0, width - y.shape[-1]))


def _acc(t):
    """fp32 for 16-bit inputs, else the input's own precision."""
    return torch.promote_types(t.dtype, torch.float32)


def _stack_rows(rows, like, width):
    if not rows:
        return like.new_zeros(0, width)
    return torch.cat(rows, dim=0)


def sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias=None):
    rows = []
    for b, (s, e) in enumerate(_segments(cu_seqlens)):
        i, o = int(in_widths[b]), int(out_widths[b])
        y = x[s:e, :i] @ weight[:o, :i].T
        if bias is not None:
            y = y + bias[:o]
        rows.append(_pad_cols(y, weight.shape[0]))
    return _stack_rows(rows, x, weight.shape[0])


def attention_core(q, k, v, num_heads, causal):
    """q, k, v: [n, w] of one sample; heads split the w features."""
    n, w = q.shape
    hd = w // num_heads
    q, k, v = (t.reshape(n, num_heads, hd).transpose(0, 1) for t in (q, k, v))
    scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    p = torch.softmax(scores.to(_acc(scores)), dim=-1).to(v.dtype)
    return (p @ v).transpose(0, 1).reshape(n, w)


def sliced_attention(x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads,
                     causal=True):
    D = x.shape[1]
    rows = []
    for b, (s, e) in enumerate(_segments(cu_seqlens)):
        w = int(widths[b])
        xb = x[s:e, :w]
        q, k, v = (xb @ w_qkv[i, :w, :w].T + b_qkv[i, :w] for i in range(3))
        ctx = attention_core(q, k, v, num_heads, causal)
        rows.append(_pad_cols(ctx @ w_o[:w, :w].T + b_o[:w], D))
    return _stack_rows(rows, x, D)


def sliced_ffn(x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4):
    D = x.shape[1]
    rows = []
    for b, (s, e) in enumerate(_segments(cu_seqlens)):
        w = int(widths[b])
        r = ratio * w
        h = F.gelu(x[s:e, :w] @ w1[:r, :w].T + b1[:r])
        rows.append(_pad_cols(h @ w2[:w, :r].T + b2[:w], D))
    return _stack_rows(rows, x, D)


def sliced_add_layernorm(x, residual, cu_seqlens, widths, weight, bias,
                         eps=1e-5):
    D = x.shape[1]
    rows = []
    for b, (s, e) in enumerate(_segments(cu_seqlens)):
        w = int(widths[b])
        h = x[s:e, :w] + residual[s:e, :w]
        acc = _acc(h)
        y = F.layer_norm(h.to(acc), (w,), weight[:w].to(acc), bias[:w].to(acc),
                         eps).to(x.dtype)
        rows.append(_pad_cols(y, D))
    return _stack_rows(rows, x, D)


# ------------------------------------------------------- routed scoring ----
# One row per scored position: row i of h [N, D] runs at width widths[i] and
# is scored against every item of weight [V, >= w_i] with its full logit row.

def sliced_linear_logits(h, widths, weight, bias=None):
    """logits [N, V]: logits[i] = h[i, :w_i] @ weight[:, :w_i].T + bias."""
    rows = []
    for i in range(h.shape[0]):
        w = int(widths[i])
        y = h[i:i + 1, :w] @ weight[:, :w].T
        rows.append(y if bias is None else y + bias)
    if not rows:
        return h.new_zeros(0, weight.shape[0])
    return torch.cat(rows, dim=0)


def _kept(targets, ignore_index):
    return (targets >= 0) & (targets != ignore_index)


def sliced_linear_cross_entropy(h, widths, weight, bias, targets, ignore_index=-100,
                                chunk_size=None):
    """Mean over the rows whose target is neither negative nor ignore_index of
    logsumexp(logits[i]) - logits[i, targets[i]]; 0 when every row is
    ignored (F.cross_entropy gives nan there). The loss is fp32 for 16-bit
    inputs. chunk_size is the kernels' business."""
    keep = _kept(targets, ignore_index)
    total = h.new_zeros((), dtype=_acc(h))
    for i in keep.nonzero().flatten().tolist():
        logits = sliced_linear_logits(h[i:i + 1], widths[i:i + 1], weight, bias)[0]
        logits = logits.to(_acc(h))
        total = total + torch.logsumexp(logits, 0) - logits[int(targets[i])]
    return total / max(int(keep.sum()), 1)


def sliced_linear_cross_entropy_lse(h, widths, weight, bias, targets, ignore_index=-100):
    """The lse [N] `sliced_linear_cross_entropy_fwd` saves: 0 for ignored rows."""
    logits = sliced_linear_logits(h, widths, weight, bias).to(_acc(h))
    lse = torch.logsumexp(logits, 1) if logits.shape[0] else logits.new_zeros(0)
    return torch.where(_kept(targets, ignore_index), lse, torch.zeros_like(lse))


def sliced_linear_topk(h, widths, weight, bias, k, chunk_size=None, exclude=None):
    """(values [N, k], indices [N, k]): the k best items of each row in the
    order (score descending, index ascending); ids in exclude [N, M] or
    [1, M] (negative = none) score -inf."""
    scores = sliced_linear_logits(h, widths, weight, bias)
    if exclude is not None and scores.shape[0]:
        ex = exclude.to(torch.int64).expand(scores.shape[0], -1)
        hit = ex >= 0
        rows = torch.arange(scores.shape[0], device=ex.device).unsqueeze(1).expand_as(ex)
        scores = scores.index_put((rows[hit], ex[hit]),
                                  scores.new_full((), float("-inf")))
    # stable sort: equal scores keep the lower index first
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]
