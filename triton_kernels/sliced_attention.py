"""sliced_attention: self-attention sublayer at per-sample width.

Q/K/V = x[:, :w] @ W_qkv[i, :w, :w]^T + b_qkv[i, :w]; head i owns features
[i*w/h, (i+1)*w/h); softmax(QK^T / sqrt(w/h)) V over the sample's own tokens
(causal: keys <= query); then the output projection W_o[:w, :w].

Forward (4 launches): one tile plan (row tiles for the GEMMs, per-sample
query tiles for attention), the three projections as one grouped GEMM with
a grid axis over Q/K/V, flash attention over the packed varlen tokens with
the head dim of each sample, the output projection.

Backward (9 launches): plan, grad of the output projection (grad_ctx GEMM,
dW_o partials + reduction), flash backward as a dQ kernel (which also
stores delta = rowsum(dO * O)) then a dK/dV kernel, grad_x as one GEMM over
the three projections, dW_qkv partials + reduction. No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (Checker, acc_torch, acc_type, dot_precision, index_type, next_pow2,
                      stat_dtype)
from ._gemm import dw_rows, mm, mm_rows, weight_grad
from ._tiles import build_tiles

@triton.jit
def _zero_tail(ptr, s_m, rows, rmask, w, D, BM: tl.constexpr, ZB: tl.constexpr):
    # zeros in columns [w, D) of the given rows
    for z0 in range((w // ZB) * ZB, D, ZB):
        cz = z0 + tl.arange(0, ZB)
        tl.store(ptr + rows[:, None] * s_m + cz[None, :],
                 tl.zeros([BM, ZB], dtype=ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cz[None, :] >= w) & (cz[None, :] < D))


@triton.jit
def _fwd_body(qkv_ptr, s_qm, ctx_ptr, s_cm, lse_ptr, s_lm, D, h, row0, row1, seg0, kend,
              hd, c0, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              HDP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
              IDX: tl.constexpr):
    qs = row0 + tl.arange(0, BM)
    qmask = qs < row1
    qo = qs.to(IDX)
    d = tl.arange(0, HDP)
    dmask = d < hd
    qd = qmask[:, None] & dmask[None, :]
    q = tl.load(qkv_ptr + qo[:, None] * s_qm + c0 + d[None, :], mask=qd, other=0.0)
    sm_scale = 1.0 / tl.sqrt(hd.to(ACC))
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BM], -1.0e30, dtype=ACC)
    l_i = tl.zeros([BM], dtype=ACC)
    acc = tl.zeros([BM, HDP], dtype=ACC)
    for k0 in range(seg0, kend, BN):
        ks = k0 + tl.arange(0, BN)
        kmask = ks < kend
        kv = qkv_ptr + ks.to(IDX)[:, None] * s_qm + c0 + d[None, :]
        kvmask = kmask[:, None] & dmask[None, :]
        k = tl.load(kv + D, mask=kvmask, other=0.0)
        v = tl.load(kv + 2 * D, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        valid = kmask[None, :]
        if CAUSAL:
            valid = valid & (ks[None, :] <= qs[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC,
                     out_dtype=ACC)
        m_i = m_new
    l_i = tl.where(qmask, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(ctx_ptr + qo[:, None] * s_cm + c0 + d[None, :],
             out.to(ctx_ptr.dtype.element_ty), mask=qd)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + qo * s_lm + h, lse.to(lse_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _attn_fwd_kernel(tiles, NT, qkv_ptr, s_qm, ctx_ptr, s_cm, lse_ptr, s_lm, D, H,
                     CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HDP: tl.constexpr, ZB: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, IDX: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    seg0 = tl.load(tiles + 2 * NT + t)
    seg1 = tl.load(tiles + 3 * NT + t)
    w = tl.load(tiles + 4 * NT + t)
    hd = w // H
    if CAUSAL:
        kend = tl.minimum(row1, seg1)
    else:
        kend = seg1
    # Head offsets are runtime values: when they are multiples of 8, hd8 (the
    # same number written as a multiple of 8) lets the compiler prove it and
    # vectorise the loads; other head dims take the plain path. Not
    # tl.multiple_of(hd, 8): that marks hd itself, in both branches.
    if hd % 8 == 0:
        hd8 = (hd // 8) * 8
        _fwd_body(qkv_ptr, s_qm, ctx_ptr, s_cm, lse_ptr, s_lm, D, h, row0, row1, seg0,
                  kend, hd8, h * hd8, CAUSAL, BM, BN, HDP, ACC, PREC, IDX)
    else:
        _fwd_body(qkv_ptr, s_qm, ctx_ptr, s_cm, lse_ptr, s_lm, D, h, row0, row1, seg0,
                  kend, hd, h * hd, CAUSAL, BM, BN, HDP, ACC, PREC, IDX)
    if h == 0:
        _zero_tail(ctx_ptr, s_cm, (row0 + tl.arange(0, BM)).to(IDX),
                   row0 + tl.arange(0, BM) < row1, w, D, BM, ZB)


@triton.jit
def _dq_body(qkv_ptr, s_qm, ctx_ptr, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
             D, h, row0, row1, seg0, kend, hd, c0,
             CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             HDP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             IDX: tl.constexpr):
    qs = row0 + tl.arange(0, BM)
    qmask = qs < row1
    qo = qs.to(IDX)
    d = tl.arange(0, HDP)
    dmask = d < hd
    qd = qmask[:, None] & dmask[None, :]
    q = tl.load(qkv_ptr + qo[:, None] * s_qm + c0 + d[None, :], mask=qd, other=0.0)
    do = tl.load(dctx_ptr + qo[:, None] * s_cm + c0 + d[None, :], mask=qd, other=0.0)
    o = tl.load(ctx_ptr + qo[:, None] * s_cm + c0 + d[None, :], mask=qd, other=0.0)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    tl.store(delta_ptr + qo * s_lm + h, delta, mask=qmask)
    lse2 = tl.load(lse_ptr + qo * s_lm + h, mask=qmask, other=0.0).to(ACC) * 1.4426950408889634
    sm_scale = 1.0 / tl.sqrt(hd.to(ACC))
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BM, HDP], dtype=ACC)
    for k0 in range(seg0, kend, BN):
        ks = k0 + tl.arange(0, BN)
        kmask = ks < kend
        kv = qkv_ptr + ks.to(IDX)[:, None] * s_qm + c0 + d[None, :]
        kvmask = kmask[:, None] & dmask[None, :]
        k = tl.load(kv + D, mask=kvmask, other=0.0)
        v = tl.load(kv + 2 * D, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        valid = qmask[:, None] & kmask[None, :]
        if CAUSAL:
            valid = valid & (ks[None, :] <= qs[:, None])
        p = tl.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC, out_dtype=ACC)
    dq = dq * sm_scale
    tl.store(dqkv_ptr + qo[:, None] * (3 * D) + c0 + d[None, :],
             dq.to(dqkv_ptr.dtype.element_ty), mask=qd)


@triton.jit
def _attn_dq_kernel(tiles, NT, qkv_ptr, s_qm, ctx_ptr, dctx_ptr, s_cm, lse_ptr,
                    delta_ptr, s_lm, dqkv_ptr, D, H,
                    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    HDP: tl.constexpr, ZB: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, IDX: tl.constexpr):
    # dQ of one query tile and head; also stores delta = rowsum(dO * O).
    t = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    seg0 = tl.load(tiles + 2 * NT + t)
    seg1 = tl.load(tiles + 3 * NT + t)
    w = tl.load(tiles + 4 * NT + t)
    hd = w // H
    if CAUSAL:
        kend = tl.minimum(row1, seg1)
    else:
        kend = seg1
    if hd % 8 == 0:  # see _attn_fwd_kernel
        hd8 = (hd // 8) * 8
        _dq_body(qkv_ptr, s_qm, ctx_ptr, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
                 D, h, row0, row1, seg0, kend, hd8, h * hd8,
                 CAUSAL, BM, BN, HDP, ACC, PREC, IDX)
    else:
        _dq_body(qkv_ptr, s_qm, ctx_ptr, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
                 D, h, row0, row1, seg0, kend, hd, h * hd,
                 CAUSAL, BM, BN, HDP, ACC, PREC, IDX)
    if h == 0:
        _zero_tail(dqkv_ptr, 3 * D, (row0 + tl.arange(0, BM)).to(IDX),
                   row0 + tl.arange(0, BM) < row1, w, D, BM, ZB)


@triton.jit
def _dkdv_body(qkv_ptr, s_qm, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
               D, h, row0, row1, qstart, seg1, hd, c0,
               CAUSAL: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr,
               HDP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               IDX: tl.constexpr):
    ks = row0 + tl.arange(0, BM)
    kmask = ks < row1
    ko = ks.to(IDX)
    d = tl.arange(0, HDP)
    dmask = d < hd
    kd = kmask[:, None] & dmask[None, :]
    kv = qkv_ptr + ko[:, None] * s_qm + c0 + d[None, :]
    k = tl.load(kv + D, mask=kd, other=0.0)
    v = tl.load(kv + 2 * D, mask=kd, other=0.0)
    sm_scale = 1.0 / tl.sqrt(hd.to(ACC))
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BM, HDP], dtype=ACC)
    dv = tl.zeros([BM, HDP], dtype=ACC)
    for q0 in range(qstart, seg1, BQ):
        qs = q0 + tl.arange(0, BQ)
        qmask = qs < seg1
        qo = qs.to(IDX)
        qd = qmask[:, None] & dmask[None, :]
        q = tl.load(qkv_ptr + qo[:, None] * s_qm + c0 + d[None, :], mask=qd, other=0.0)
        do = tl.load(dctx_ptr + qo[:, None] * s_cm + c0 + d[None, :], mask=qd, other=0.0)
        lse2 = tl.load(lse_ptr + qo * s_lm + h, mask=qmask, other=0.0).to(ACC) * 1.4426950408889634
        delta = tl.load(delta_ptr + qo * s_lm + h, mask=qmask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC) * qk_scale
        valid = kmask[:, None] & qmask[None, :]
        if CAUSAL:
            valid = valid & (qs[None, :] >= ks[:, None])
        pt = tl.exp2(tl.where(valid, st - lse2[None, :], float("-inf")))
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC, out_dtype=ACC)
    dk = dk * sm_scale
    out = dqkv_ptr + ko[:, None] * (3 * D) + c0 + d[None, :]
    tl.store(out + D, dk.to(dqkv_ptr.dtype.element_ty), mask=kd)
    tl.store(out + 2 * D, dv.to(dqkv_ptr.dtype.element_ty), mask=kd)


@triton.jit
def _attn_dkdv_kernel(tiles, NT, qkv_ptr, s_qm, dctx_ptr, s_cm, lse_ptr, delta_ptr,
                      s_lm, dqkv_ptr, D, H,
                      CAUSAL: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr,
                      HDP: tl.constexpr, ZB: tl.constexpr, ACC: tl.constexpr,
                      PREC: tl.constexpr, IDX: tl.constexpr):
    # One tile of keys of one sample and head; walks the queries that see it.
    t = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    seg0 = tl.load(tiles + 2 * NT + t)
    seg1 = tl.load(tiles + 3 * NT + t)
    w = tl.load(tiles + 4 * NT + t)
    hd = w // H
    if CAUSAL:
        qstart = row0
    else:
        qstart = seg0
    if hd % 8 == 0:  # see _attn_fwd_kernel
        hd8 = (hd // 8) * 8
        _dkdv_body(qkv_ptr, s_qm, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
                   D, h, row0, row1, qstart, seg1, hd8, h * hd8,
                   CAUSAL, BM, BQ, HDP, ACC, PREC, IDX)
    else:
        _dkdv_body(qkv_ptr, s_qm, dctx_ptr, s_cm, lse_ptr, delta_ptr, s_lm, dqkv_ptr,
                   D, h, row0, row1, qstart, seg1, hd, h * hd,
                   CAUSAL, BM, BQ, HDP, ACC, PREC, IDX)
    if h == 0:
        ko = (row0 + tl.arange(0, BM)).to(IDX)
        kmask = row0 + tl.arange(0, BM) < row1
        _zero_tail(dqkv_ptr + D, 3 * D, ko, kmask, w, D, BM, ZB)
        _zero_tail(dqkv_ptr + 2 * D, 3 * D, ko, kmask, w, D, BM, ZB)


def _blocks(x, D, H):
    """(BM, BN, head-dim block, zero-fill block, warps, stages)."""
    hdp = next_pow2(D // H)
    if _common.small_blocks(x):
        return 16, 32, hdp, 32, 4, 1
    b = _common.blocks("attn", x.dtype)
    return b["BM"], b["BN"], hdp, 32, b["warps"], b["stages"]


def _check(op, x, cu_seqlens, widths, w_qkv, w_o, num_heads):
    c = Checker(op, x)
    D = x.shape[1]
    H = c.positive(num_heads, "num_heads")
    w_qkv = c.tensor(w_qkv, "w_qkv", [3, D, D])
    w_o = c.tensor(w_o, "w_o", [D, D])
    cu, widths = c.routes(cu_seqlens, (widths, "widths"))
    return c, x.contiguous(), cu, widths, w_qkv, w_o, H


def _plan(x, cu, widths, T, D, H):
    bm_a = _blocks(x, D, H)[0]
    tiles_g, tiles_a = build_tiles(cu, widths, widths, T, [(mm_rows(x), False), (bm_a, True)])
    return tiles_g, tiles_a


def sliced_attention_fwd(x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads,
                         causal=True, save_activations=True):
    c, x, cu, widths, w_qkv, w_o, H = _check("sliced_attention_fwd", x, cu_seqlens,
                                             widths, w_qkv, w_o, num_heads)
    T, D = x.shape
    b_qkv = c.tensor(b_qkv, "b_qkv", [3, D])
    b_o = c.tensor(b_o, "b_o", [D])
    out = torch.empty_like(x)
    qkv = torch.empty(T, 3, D, dtype=x.dtype, device=x.device)
    ctx = torch.empty_like(x)
    lse = torch.empty(T, H, dtype=stat_dtype(x.dtype), device=x.device)
    if T == 0:
        return out, qkv, ctx, lse
    tiles_g, tiles_a = _plan(x, cu, widths, T, D, H)
    mm(tiles_g, x, w_qkv, b_qkv, qkv, nz=3, n_out=D,
       a_strides=(x.stride(0), 1, 0, 0), w_strides=(D, 1, 0, D * D),
       y_strides=(3 * D, 1, D), bias_stride=D)
    bm, bn, hdp, zb, warps, stages = _blocks(x, D, H)
    _attn_fwd_kernel[(tiles_a.nt, H)](tiles_a.data, tiles_a.nt, qkv, 3 * D, ctx, D,
                                      lse, H, D, H, CAUSAL=bool(causal), BM=bm, BN=bn,
                                      HDP=hdp, ZB=zb, ACC=acc_type(x.dtype),
                                      PREC=dot_precision(x.dtype), IDX=index_type(qkv),
                                      num_warps=warps, num_stages=stages)
    mm(tiles_g, ctx, w_o, b_o, out, a_strides=(D, 1, 0, 0), w_strides=(D, 1, 0, 0),
       y_strides=(D, 1, 0))
    if not save_activations:  # the kernels still use the buffers; only drop them
        return out, qkv[:0], ctx[:0], lse[:0]
    return out, qkv, ctx, lse


def sliced_attention_backward(grad_out, x, cu_seqlens, widths, w_qkv, w_o, qkv, ctx,
                              lse, num_heads, causal):
    c, x, cu, widths, w_qkv, w_o, H = _check("sliced_attention_backward", x,
                                             cu_seqlens, widths, w_qkv, w_o, num_heads)
    T, D = x.shape
    dy = c.tensor(grad_out, "grad_out", [T, D])
    qkv = c.tensor(qkv, "qkv", [T, 3, D])
    ctx = c.tensor(ctx, "ctx", [T, D])
    lse = c.tensor(lse, "lse", [T, H], dtype=stat_dtype(x.dtype))
    gx = torch.empty_like(x)
    gw_qkv = torch.empty_like(w_qkv)
    gb_qkv = torch.empty(3, D, dtype=x.dtype, device=x.device)
    gw_o = torch.empty_like(w_o)
    gb_o = torch.empty(D, dtype=x.dtype, device=x.device)
    if T == 0:
        return gx, gw_qkv.zero_(), gb_qkv.zero_(), gw_o.zero_(), gb_o.zero_()
    tiles_g, tiles_a = _plan(x, cu, widths, T, D, H)
    tiles_w = tiles_g
    if dw_rows(x) != tiles_g.bm:
        (tiles_w,) = build_tiles(cu, widths, widths, T, [(dw_rows(x), False)])
    # output projection: grad_ctx = dy @ W_o, dW_o = dy^T ctx, db_o = sum dy
    dctx = torch.empty_like(x)
    mm(tiles_g, dy, w_o, None, dctx, a_strides=(D, 1, 0, 0), w_strides=(1, D, 0, 0),
       y_strides=(D, 1, 0))
    weight_grad(tiles_w, dy, ctx, gw_o, gb_o, a_strides=(D, 1, 0), b_strides=(D, 1))
    # attention core
    bm, bn, hdp, zb, warps, stages = _blocks(x, D, H)
    delta = torch.empty(T, H, dtype=acc_torch(x.dtype), device=x.device)
    dqkv = torch.empty(T, 3, D, dtype=x.dtype, device=x.device)
    meta = dict(CAUSAL=bool(causal), HDP=hdp, ZB=zb, ACC=acc_type(x.dtype),
                PREC=dot_precision(x.dtype), IDX=index_type(qkv), num_warps=warps,
                num_stages=stages)
    grid = (tiles_a.nt, H)
    _attn_dq_kernel[grid](tiles_a.data, tiles_a.nt, qkv, 3 * D, ctx, dctx, D, lse, delta,
                          H, dqkv, D, H, BM=bm, BN=bn, **meta)
    _attn_dkdv_kernel[grid](tiles_a.data, tiles_a.nt, qkv, 3 * D, dctx, D, lse, delta,
                            H, dqkv, D, H, BM=bm, BQ=bn, **meta)
    # projections: grad_x = sum_i dqkv_i @ W_i, dW_i = dqkv_i^T x, db_i = sum dqkv_i
    mm(tiles_g, dqkv, w_qkv, None, gx, nseg=3, a_strides=(3 * D, 1, D, 0),
       w_strides=(1, D, D * D, 0), y_strides=(D, 1, 0))
    weight_grad(tiles_w, dqkv, x, gw_qkv, gb_qkv, nz=3, a_strides=(3 * D, 1, D),
                b_strides=(D, 1))
    return gx, gw_qkv, gb_qkv, gw_o, gb_o
