"""sliced_add_layernorm: LayerNorm(x + residual) over each row's first w features.

Forward: tile plan + one kernel over row tiles (2 launches).
Backward: tile plan, one kernel where each program walks a fixed share of
the row tiles (grad_input plus its partial dweight/dbias), then a
fixed-order reduction of the partials (3 launches, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import Checker, acc_torch, acc_type, index_type, next_pow2, stat_dtype
from ._gemm import reduce_partials
from ._tiles import build_tiles


@triton.jit
def _sum_rows(x_ptr, r_ptr, offs, load_mask, mask, ACC: tl.constexpr):
    # x + residual rounded to the input dtype, as the reference adds them.
    # load_mask is rounded up to 8 columns (vectorised loads); mask is exact
    # (inputs may hold garbage beyond the width).
    xv = tl.load(x_ptr + offs, mask=load_mask, other=0.0)
    rv = tl.load(r_ptr + offs, mask=load_mask, other=0.0)
    h = (xv.to(ACC) + rv.to(ACC)).to(x_ptr.dtype.element_ty).to(ACC)
    return tl.where(mask, h, 0.0)


@triton.jit
def _ln_fwd_kernel(tiles, NT, x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                   s_m, D, eps, BM: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr,
                   IDX: tl.constexpr):
    t = tl.program_id(0)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    w = tl.load(tiles + 4 * NT + t)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    cols = tl.arange(0, DP)
    cmask = cols < w
    m2 = rmask[:, None] & cmask[None, :]
    ml = rmask[:, None] & (cols[None, :] < tl.minimum((w + 7) // 8 * 8, D))
    offs = rows.to(IDX)[:, None] * s_m + cols[None, :]
    h = _sum_rows(x_ptr, r_ptr, offs, ml, m2, ACC)
    mean = tl.sum(h, 1) / w
    diff = tl.where(m2, h - mean[:, None], 0.0)
    var = tl.sum(diff * diff, 1) / w
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    y = diff * rstd[:, None] * gamma[None, :] + beta[None, :]
    y = tl.where(cmask[None, :], y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < D))
    tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=rmask)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _ln_bwd_kernel(tiles, NT, S, dy_ptr, x_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr,
                   gx_ptr, part_ptr, s_m, D,
                   BM: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr,
                   IDX: tl.constexpr):
    s = tl.program_id(0)
    ntile = tl.load(tiles + 6 * NT)
    t0 = (ntile * s) // S
    t1 = (ntile * (s + 1)) // S
    cols = tl.arange(0, DP)
    gamma_all = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
    dg = tl.zeros([DP], dtype=ACC)
    db = tl.zeros([DP], dtype=ACC)
    for t in range(t0, t1):
        row0 = tl.load(tiles + t)
        row1 = tl.load(tiles + NT + t)
        w = tl.load(tiles + 4 * NT + t)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row1
        cmask = cols < w
        m2 = rmask[:, None] & cmask[None, :]
        ml = rmask[:, None] & (cols[None, :] < tl.minimum((w + 7) // 8 * 8, D))
        offs = rows.to(IDX)[:, None] * s_m + cols[None, :]
        h = _sum_rows(x_ptr, r_ptr, offs, ml, m2, ACC)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0).to(ACC)
        xhat = tl.where(m2, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.where(m2, tl.load(dy_ptr + offs, mask=ml, other=0.0).to(ACC), 0.0)
        wdy = dy * gamma_all[None, :]
        c1 = tl.sum(xhat * wdy, 1) / w
        c2 = tl.sum(wdy, 1) / w
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dx = tl.where(cmask[None, :], dx, 0.0)
        tl.store(gx_ptr + offs, dx.to(gx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < D))
        dg += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(part_ptr + s * 2 * D + cols, dg, mask=cols < D)
    tl.store(part_ptr + s * 2 * D + D + cols, db, mask=cols < D)


def _blocks(x, D):
    dp = next_pow2(D)
    if _common.small_blocks(x):
        return 16, dp, 4, 4
    return max(1, min(64, 4096 // dp)), dp, 4 if dp < 128 else 8, 512


def _check(op, x, residual, cu_seqlens, widths, weight):
    c = Checker(op, x)
    T, D = x.shape
    residual = c.tensor(residual, "residual", [T, D])
    weight = c.tensor(weight, "weight", [D])
    cu, widths = c.routes(cu_seqlens, (widths, "widths"))
    return c, x.contiguous(), residual, cu, widths, weight


def sliced_add_layernorm_fwd(x, residual, cu_seqlens, widths, weight, bias, eps=1e-5):
    c, x, residual, cu, widths, weight = _check("sliced_add_layernorm_fwd", x, residual,
                                                cu_seqlens, widths, weight)
    T, D = x.shape
    bias = c.tensor(bias, "bias", [D])
    y = torch.empty_like(x)
    mean = torch.empty(T, dtype=stat_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if T == 0:
        return y, mean, rstd
    bm, dp, warps, _ = _blocks(x, D)
    (tiles,) = build_tiles(cu, widths, widths, T, [(bm, False)])
    _ln_fwd_kernel[(tiles.nt,)](tiles.data, tiles.nt, x, residual, weight, bias, y,
                                mean, rstd, x.stride(0), D, float(eps),
                                BM=bm, DP=dp, ACC=acc_type(x.dtype), IDX=index_type(x),
                                num_warps=warps)
    return y, mean, rstd


def sliced_add_layernorm_backward(grad_out, x, residual, cu_seqlens, widths, weight,
                                  mean, rstd):
    c, x, residual, cu, widths, weight = _check("sliced_add_layernorm_backward", x,
                                                residual, cu_seqlens, widths, weight)
    T, D = x.shape
    dy = c.tensor(grad_out, "grad_out", [T, D])
    mean = c.tensor(mean, "mean", [T], dtype=stat_dtype(x.dtype))
    rstd = c.tensor(rstd, "rstd", [T], dtype=stat_dtype(x.dtype))
    gx = torch.empty_like(x)
    gw, gb = torch.empty_like(weight), torch.empty_like(weight)
    if T == 0:
        return gx, gw.zero_(), gb.zero_()
    bm, dp, warps, max_splits = _blocks(x, D)
    (tiles,) = build_tiles(cu, widths, widths, T, [(bm, False)])
    S = max(1, min(tiles.nt, max_splits))
    part = torch.empty(S, 2 * D, dtype=acc_torch(x.dtype), device=x.device)
    _ln_bwd_kernel[(S,)](tiles.data, tiles.nt, S, dy, x, residual, weight, mean, rstd,
                         gx, part, x.stride(0), D,
                         BM=bm, DP=dp, ACC=acc_type(x.dtype), IDX=index_type(x),
                         num_warps=warps)
    reduce_partials(part, 2 * D, D, gw, gb)
    return gx, gw, gb
