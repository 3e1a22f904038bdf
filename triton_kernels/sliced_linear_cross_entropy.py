"""sliced_linear_cross_entropy: mean over kept rows of
logsumexp(logits[i]) - logits[i, targets[i]], logits[i, v] = h[i, :w_i] .
W[v, :w_i] + bias[v], without the [N, V] logits.

Forward: one launch over (row tile, item range): an online max / sum of
exponentials and the target's logit per row and range; the ranges are
combined by torch ops in a fixed order. Backward recomputes the logits tile
by tile in two launches: grad_h over (row tile, item range) with per-range
partials summed afterwards, and grad_W / grad_bias over item tiles, each
program walking every row tile in order (deterministic, no atomics). On
CUDA, target values are not checked (a host sync): ids >= V count as logit 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, dot_precision, next_pow2
from ._scoring import (Check, acc_dtype, blocks, items_per_split, logits_tile, row_block,
                       splits, stat_dtype)


@triton.jit
def _lse_kernel(h_ptr, s_hn, s_hk, wid_ptr, tgt_ptr, w_ptr, s_wv, s_wk, b_ptr,
                m_ptr, s_ptr, t_ptr, N, V, PER_SPLIT,
                HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    ro, rmask, wrow, kmax = row_block(pid * BM, N, wid_ptr, BM)
    tgt = tl.load(tgt_ptr + ro, mask=rmask, other=-1).to(tl.int64)
    m = tl.full([BM], float("-inf"), ACC)
    s = tl.zeros([BM], dtype=ACC)
    tv = tl.zeros([BM], dtype=ACC)
    v0 = sp * PER_SPLIT
    v1 = tl.minimum(v0 + PER_SPLIT, V)
    for c0 in range(v0, v1, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < v1
        co = cols.to(tl.int64)
        x = logits_tile(h_ptr, s_hn, s_hk, wrow, ro, rmask, w_ptr, s_wv, s_wk, co, cmask,
                        kmax, b_ptr, HAS_BIAS, BM, BN, BK, ACC, PREC)
        x = tl.where(cmask[None, :], x, float("-inf"))
        nm = tl.maximum(m, tl.max(x, 1))
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
        m = nm
        tv += tl.sum(tl.where(co[None, :] == tgt[:, None], x, 0.0), 1)
    out = sp * N + ro
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, tv, mask=rmask)


@triton.jit
def _probs(x, lse, scale, tgt, co, cmask, rmask):
    """scale * (softmax - onehot) of a logits tile; 0 outside and for rows
    with scale 0 (ignored: their lse is 0, exp could overflow)."""
    live = rmask & (scale != 0)
    z = tl.where(live[:, None] & cmask[None, :], x - lse[:, None], float("-inf"))
    p = tl.exp(z) * scale[:, None]
    return p - tl.where(co[None, :] == tgt[:, None], scale[:, None], 0.0)


@triton.jit
def _grad_h_kernel(h_ptr, s_hn, s_hk, wid_ptr, tgt_ptr, lse_ptr, sc_ptr,
                   w_ptr, s_wv, s_wk, b_ptr, part_ptr, N, V, D, PER_SPLIT,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    ro, rmask, wrow, kmax = row_block(pid * BM, N, wid_ptr, BM)
    tgt = tl.load(tgt_ptr + ro, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + ro, mask=rmask, other=0.0).to(ACC)
    scale = tl.load(sc_ptr + ro, mask=rmask, other=0.0).to(ACC)
    kd = tl.arange(0, BD)
    dh = tl.zeros([BM, BD], dtype=ACC)
    v0 = sp * PER_SPLIT
    v1 = tl.minimum(v0 + PER_SPLIT, V)
    for c0 in range(v0, v1, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < v1
        co = cols.to(tl.int64)
        x = logits_tile(h_ptr, s_hn, s_hk, wrow, ro, rmask, w_ptr, s_wv, s_wk, co, cmask,
                        kmax, b_ptr, HAS_BIAS, BM, BN, BK, ACC, PREC)
        p = _probs(x, lse, scale, tgt, co, cmask, rmask)
        wt = tl.load(w_ptr + co[:, None] * s_wv + kd[None, :] * s_wk,
                     mask=cmask[:, None] & (kd[None, :] < kmax), other=0.0)
        dh = tl.dot(p.to(wt.dtype), wt, dh, input_precision=PREC, out_dtype=ACC)
    dh = tl.where(kd[None, :] < wrow[:, None], dh, 0.0)
    out = part_ptr + (sp * N + ro)[:, None] * D + kd[None, :]
    tl.store(out, dh, mask=rmask[:, None] & (kd[None, :] < D))


@triton.jit
def _grad_w_kernel(h_ptr, s_hn, s_hk, wid_ptr, tgt_ptr, lse_ptr, sc_ptr,
                   w_ptr, s_wv, s_wk, b_ptr, gw_ptr, s_gv, s_gk, gb_ptr, N, V, D,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < V
    co = cols.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=cmask, other=0.0).to(ACC)
    kd = tl.arange(0, BD)
    dw = tl.zeros([BN, BD], dtype=ACC)
    db = tl.zeros([BN], dtype=ACC)
    for r0 in range(0, N, BM):
        ro, rmask, wrow, kmax = row_block(r0, N, wid_ptr, BM)
        tgt = tl.load(tgt_ptr + ro, mask=rmask, other=-1).to(tl.int64)
        lse = tl.load(lse_ptr + ro, mask=rmask, other=0.0).to(ACC)
        scale = tl.load(sc_ptr + ro, mask=rmask, other=0.0).to(ACC)
        # the bias is loaded once per item tile, outside this row loop
        x = logits_tile(h_ptr, s_hn, s_hk, wrow, ro, rmask, w_ptr, s_wv, s_wk, co, cmask,
                        kmax, b_ptr, False, BM, BN, BK, ACC, PREC)
        if HAS_BIAS:
            x += bias[None, :]
        p = _probs(x, lse, scale, tgt, co, cmask, rmask)
        hb = tl.load(h_ptr + ro[:, None] * s_hn + kd[None, :] * s_hk,
                     mask=rmask[:, None] & (kd[None, :] < wrow[:, None]), other=0.0)
        dw = tl.dot(tl.trans(p.to(hb.dtype)), hb, dw, input_precision=PREC, out_dtype=ACC)
        db += tl.sum(p, 0)
    tl.store(gw_ptr + co[:, None] * s_gv + kd[None, :] * s_gk, dw.to(gw_ptr.dtype.element_ty),
             mask=cmask[:, None] & (kd[None, :] < D))
    if HAS_BIAS:
        tl.store(gb_ptr + co, db.to(gb_ptr.dtype.element_ty), mask=cmask)


def _prepare(op, h, widths, weight, bias, targets, chunk_size):
    c = Check(op, h, widths, weight, bias, chunk_size)
    c.ints(targets, "targets", h.shape[0])
    return h.contiguous(), widths.contiguous(), weight.contiguous(), \
        None if bias is None else bias.contiguous(), targets.contiguous()


def _kept(targets, ignore_index):
    return (targets >= 0) & (targets != ignore_index)


def sliced_linear_cross_entropy_fwd(h, widths, weight, bias, targets, ignore_index=-100,
                                    chunk_size=4096):
    h, widths, weight, bias, targets = _prepare("sliced_linear_cross_entropy_fwd", h, widths,
                                                weight, bias, targets, chunk_size)
    N, V = h.shape[0], weight.shape[0]
    acc = acc_dtype(h.dtype)
    keep = _kept(targets, ignore_index)
    if N == 0:
        z = torch.zeros((), dtype=stat_dtype(h.dtype), device=h.device)
        return z, torch.zeros(0, dtype=z.dtype, device=h.device)
    bm, bn, bk, warps, stages = blocks(h)
    S = splits(N, V, bm, bn, h)
    per = items_per_split(V, S, bn)
    S = triton.cdiv(V, per)
    m, s, t = (torch.empty(S, N, dtype=acc, device=h.device) for _ in range(3))
    _lse_kernel[(triton.cdiv(N, bm), S)](
        h, h.stride(0), h.stride(1), widths, targets, weight, weight.stride(0),
        weight.stride(1), bias if bias is not None else weight, m, s, t, N, V, per,
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, ACC=acc_type(h.dtype),
        PREC=dot_precision(h.dtype), num_warps=warps, num_stages=stages)
    top = m.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    lse = top + torch.log((s * torch.exp(m - top)).sum(0))
    lse = torch.where(keep, lse, torch.zeros_like(lse))
    rows = torch.where(keep, lse - t.sum(0), torch.zeros_like(lse))
    loss = rows.sum() / keep.sum().clamp(min=1).to(acc)
    st = stat_dtype(h.dtype)
    return loss.to(st), lse.to(st)


def sliced_linear_cross_entropy_backward(grad_loss, h, widths, weight, bias, targets, lse,
                                         ignore_index, chunk_size):
    op = "sliced_linear_cross_entropy_backward"
    h, widths, weight, bias, targets = _prepare(op, h, widths, weight, bias, targets,
                                                chunk_size)
    N, D = h.shape
    V, Dw = weight.shape
    acc = acc_dtype(h.dtype)
    gw = torch.zeros_like(weight)
    gb = torch.zeros(V if bias is not None else 0, dtype=h.dtype, device=h.device)
    if N == 0:
        return torch.zeros_like(h), gw, gb
    if lse.shape != (N,):
        raise ValueError(f"canet.{op} (triton): lse must have shape [{N}], got {list(lse.shape)}")
    keep = _kept(targets, ignore_index)
    count = keep.sum().clamp(min=1).to(acc)
    scale = torch.where(keep, grad_loss.to(acc).reshape(()) / count,
                        torch.zeros((), dtype=acc, device=h.device))
    lse = lse.to(acc).contiguous()
    bm, bn, bk, warps, stages = blocks(h)
    bd = next_pow2(min(D, Dw), 16)
    S = splits(N, V, bm, bn, h)
    per = items_per_split(V, S, bn)
    S = triton.cdiv(V, per)
    part = torch.empty(S, N, D, dtype=acc, device=h.device)
    common = dict(HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, BD=bd,
                  ACC=acc_type(h.dtype), PREC=dot_precision(h.dtype), num_warps=warps,
                  num_stages=stages)
    b = bias if bias is not None else weight
    _grad_h_kernel[(triton.cdiv(N, bm), S)](
        h, h.stride(0), h.stride(1), widths, targets, lse, scale, weight, weight.stride(0),
        weight.stride(1), b, part, N, V, D, per, **common)
    _grad_w_kernel[(triton.cdiv(V, bn),)](
        h, h.stride(0), h.stride(1), widths, targets, lse, scale, weight, weight.stride(0),
        weight.stride(1), b, gw, gw.stride(0), gw.stride(1), gb, N, V, min(D, Dw), **common)
    return part.sum(0).to(h.dtype), gw, gb
