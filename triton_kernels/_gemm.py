"""Grouped GEMMs over tile lists, shared by the linear and attention ops.

`mm`: y[r, n] = sum_k a[r, k] * W(n, k) (+ bias[n]) for every row tile, with
the tile's own K and N bounds (its widths): ceil(k/BK) K steps and only the
column blocks below the width compute; blocks past it store zeros.

`weight_grad`: dW[n, k] = sum_r A[r, n] * B[r, k] (and db[n] = sum_r A[r, n])
without atomics: a grid over weight tiles x row splits writes fp32 partials,
a second kernel sums the splits in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import acc_torch, acc_type, dot_precision, gelu, index_type, num_splits


@triton.jit
def _mm_kernel(tiles, NT,
               a_ptr, s_am, s_ak, s_aseg, s_az, A_K,
               w_ptr, s_wn, s_wk, s_wseg, s_wz, W_N, W_K,
               bias_ptr, s_bz,
               y_ptr, s_ym, s_yn, s_yz,
               N_OUT, NSEG,
               SWAP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, IDX: tl.constexpr):
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    z = tl.program_id(2)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    if SWAP:  # y = a @ W[:k, :n] (a gradient through the weight)
        kw = tl.load(tiles + 5 * NT + t)
        nw = tl.load(tiles + 4 * NT + t)
    else:
        kw = tl.load(tiles + 4 * NT + t)
        nw = tl.load(tiles + 5 * NT + t)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    ro = rows.to(IDX)
    cols = n0 + tl.arange(0, BN)
    nmask = cols < nw
    y_ptrs = y_ptr + z * s_yz + ro[:, None] * s_ym + cols[None, :] * s_yn
    ymask = rmask[:, None] & (cols[None, :] < N_OUT)
    if n0 >= nw:
        tl.store(y_ptrs, tl.zeros([BM, BN], dtype=y_ptr.dtype.element_ty), mask=ymask)
        return
    # Load masks rounded up to 8 elements keep loads vectorised (widths are
    # runtime values); the exact width is applied in registers: garbage
    # beyond it in `a` becomes 0, extra weight entries then multiply zeros or
    # land in output columns that are zeroed.
    ka = tl.minimum((kw + 7) // 8 * 8, A_K)
    kb = tl.minimum((kw + 7) // 8 * 8, W_K)
    nb = tl.minimum((nw + 7) // 8 * 8, W_N)
    acc = tl.zeros([BM, BN], dtype=ACC)
    ks0 = tl.arange(0, BK)
    for seg in range(0, NSEG):
        a_base = a_ptr + z * s_az + seg * s_aseg + ro[:, None] * s_am
        w_base = w_ptr + z * s_wz + seg * s_wseg + cols[None, :] * s_wn
        for k0 in range(0, kw, BK):
            ks = k0 + ks0
            a = tl.load(a_base + ks[None, :] * s_ak, mask=rmask[:, None] & (ks[None, :] < ka),
                        other=0.0)
            a = tl.where(ks[None, :] < kw, a, 0.0)
            w = tl.load(w_base + ks[:, None] * s_wk,
                        mask=(ks[:, None] < kb) & (cols[None, :] < nb), other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        b = tl.load(bias_ptr + z * s_bz + cols, mask=nmask, other=0.0)
        acc += b.to(ACC)[None, :]
    acc = tl.where(nmask[None, :], acc, 0.0)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _blocks(t):
    if _common.small_blocks(t):
        return 16, 64, 32, 4, 1
    b = _common.blocks("mm", t.dtype)
    return b["BM"], b["BN"], b["BK"], b["warps"], b["stages"]


def mm(tiles, a, w, bias, y, *, kw_from_out=False, nseg=1, nz=1,
       a_strides=None, w_strides=None, y_strides=None, bias_stride=0, n_out=None,
       a_k=None, w_nk=None):
    """Launch the grouped GEMM over `tiles` (built with matching BM).

    a_strides = (row, k, segment, z), w_strides = (n, k, segment, z),
    y_strides = (row, n, z); bias_stride is the z stride of the bias.
    a_k: columns of one segment of `a`; w_nk: (n, k) extents of W(n, k).
    Defaults: a's columns and W = w[..., n, k] (the last two dims).
    """
    bm, bn, bk, warps, stages = _blocks(a)
    assert tiles.bm == bm
    n_out = y.shape[-1] if n_out is None else n_out
    grid = (tiles.nt, triton.cdiv(n_out, bn), nz)
    a_k = a.shape[-1] if a_k is None else a_k
    w_nk = (w.shape[-2], w.shape[-1]) if w_nk is None else w_nk
    _mm_kernel[grid](tiles.data, tiles.nt,
                     a, *a_strides, a_k, w, *w_strides, *w_nk,
                     bias if bias is not None else w, bias_stride,
                     y, *y_strides, n_out, nseg,
                     SWAP=kw_from_out, HAS_BIAS=bias is not None,
                     BM=bm, BN=bn, BK=bk, ACC=acc_type(a.dtype),
                     PREC=dot_precision(a.dtype), IDX=index_type(a, y),
                     num_warps=warps, num_stages=stages)
    return y


def mm_rows(a):
    """BM of the grouped GEMM for this tensor's device."""
    return _blocks(a)[0]


@triton.jit
def _dw_kernel(tiles, NT, S,
               a_ptr, s_am, s_an, s_az, A_N,
               b_ptr, s_bm, s_bk, B_K,
               part_ptr, s_ps, s_pz,
               N_W, K_W, MN, MK,
               GELU_B: tl.constexpr, HAS_BIAS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, IDX: tl.constexpr):
    # One (n, k) weight tile of one row split; n < MN * out width and
    # k < MK * in width of each row tile.
    pid = tl.program_id(0)
    s = tl.program_id(1)
    z = tl.program_id(2)
    nkb = tl.cdiv(K_W, BK)
    n0 = (pid // nkb) * BN
    k0 = (pid % nkb) * BK
    ntile = tl.load(tiles + 6 * NT)
    t0 = (ntile * s) // S
    t1 = (ntile * (s + 1)) // S
    ns = n0 + tl.arange(0, BN)
    ks = k0 + tl.arange(0, BK)
    r = tl.arange(0, BM)
    acc = tl.zeros([BN, BK], dtype=ACC)
    bacc = tl.zeros([BN], dtype=ACC)
    for t in range(t0, t1):
        row0 = tl.load(tiles + t)
        row1 = tl.load(tiles + NT + t)
        nb = MN * tl.load(tiles + 5 * NT + t)
        kb = MK * tl.load(tiles + 4 * NT + t)
        if (n0 < nb) & (k0 < kb):
            rows = (row0 + r).to(IDX)
            rmask = (row0 + r) < row1
            # rounded load masks stay vectorised; exact widths in registers
            am = rmask[:, None] & (ns[None, :] < tl.minimum((nb + 7) // 8 * 8, A_N))
            a = tl.load(a_ptr + z * s_az + rows[:, None] * s_am + ns[None, :] * s_an,
                        mask=am, other=0.0)
            a = tl.where(ns[None, :] < nb, a, 0.0)
            bm = rmask[:, None] & (ks[None, :] < tl.minimum((kb + 7) // 8 * 8, B_K))
            b = tl.load(b_ptr + rows[:, None] * s_bm + ks[None, :] * s_bk,
                        mask=bm, other=0.0)
            if GELU_B:
                b = gelu(b.to(ACC)).to(b_ptr.dtype.element_ty)
            b = tl.where(ks[None, :] < kb, b, 0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC, out_dtype=ACC)
            if HAS_BIAS:
                bacc += tl.sum(a.to(ACC), 0)
    base = part_ptr + s * s_ps + z * s_pz
    tl.store(base + ns[:, None] * K_W + ks[None, :], acc,
             mask=(ns[:, None] < N_W) & (ks[None, :] < K_W))
    if HAS_BIAS:
        if k0 == 0:
            tl.store(base + N_W * K_W + ns, bacc, mask=ns < N_W)


@triton.jit
def _reduce_kernel(part_ptr, S, L, NK, gw_ptr, gb_ptr, TOTAL, BLOCK: tl.constexpr):
    # Sums the S splits of [Z, NK + N] partials in a fixed order.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < TOTAL
    acc = tl.load(part_ptr + i, mask=m, other=0.0)
    for s in range(1, S):
        acc += tl.load(part_ptr + s * TOTAL + i, mask=m, other=0.0)
    z = i // L
    j = i % L
    tl.store(gw_ptr + z * NK + j, acc.to(gw_ptr.dtype.element_ty), mask=m & (j < NK))
    tl.store(gb_ptr + z * (L - NK) + j - NK, acc.to(gb_ptr.dtype.element_ty),
             mask=m & (j >= NK))


def _dw_blocks(t):
    if _common.small_blocks(t):
        return 16, 64, 64, 4, 1
    b = _common.blocks("dw", t.dtype)
    return b["BM"], b["BN"], b["BK"], b["warps"], b["stages"]


def dw_rows(a):
    """BM of the row tiles the weight-gradient kernel walks."""
    return _dw_blocks(a)[0]


def weight_grad(tiles, a, b, gw, gb, *, mn=1, mk=1, gelu_b=False, nz=1,
                a_strides=None, b_strides=None):
    """gw[z] (shape [N_W, K_W]) = sum_rows A_z^T B over the tiles, gb[z] = sum_rows A_z.

    a_strides = (row, n, z), b_strides = (row, k); the last dims of `a` and
    `b` bound n and k. gb may be None. Returns (gw, gb) in their own dtypes.
    """
    bm, bn, bk, warps, stages = _dw_blocks(a)
    assert tiles.bm == bm
    N_W, K_W = gw.shape[-2], gw.shape[-1]
    nb = N_W if gb is not None else 0
    L = N_W * K_W + nb
    blocks = triton.cdiv(N_W, bn) * triton.cdiv(K_W, bk)
    # the interpreter runs programs one by one: few splits there (still > 1)
    S = num_splits(tiles.nt, blocks * nz, 16 if _common.small_blocks(a) else 512)
    part = torch.empty(S, nz, L, dtype=acc_torch(a.dtype), device=a.device)
    _dw_kernel[(blocks, S, nz)](tiles.data, tiles.nt, S,
                                a, *a_strides, a.shape[-1], b, *b_strides, b.shape[-1],
                                part, part.stride(0), part.stride(1),
                                N_W, K_W, mn, mk,
                                GELU_B=gelu_b, HAS_BIAS=gb is not None,
                                BM=bm, BN=bn, BK=bk, ACC=acc_type(a.dtype),
                                PREC=dot_precision(a.dtype), IDX=index_type(a, b),
                                num_warps=warps, num_stages=stages)
    # the reduction's block: fewer, longer programs leave its loads exposed
    rb = 256 if _common.small_blocks(a) else _common.blocks("dw", a.dtype).get("RB", 1024)
    reduce_partials(part, L, N_W * K_W, gw, gb if gb is not None else gw, block=rb)
    return gw, gb


def reduce_partials(part, L, NK, gw, gb, block: int = 1024):
    """gw/gb from partials [S, Z, L]: per z, entries j < NK of the sum over
    splits go to gw[z], the rest to gb[z]; `block` entries per program."""
    total = part[0].numel()
    _reduce_kernel[(triton.cdiv(total, block),)](part, part.shape[0], L, NK, gw, gb, total,
                                                 BLOCK=block, num_warps=4)
