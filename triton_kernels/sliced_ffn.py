"""sliced_ffn: gelu(x[:, :w] @ W1[:r*w, :w]^T + b1) @ W2[:w, :r*w]^T + b2.

Forward, one fused kernel per row tile: loop over BH-wide chunks of the
r*w-wide intermediate; each chunk is computed (a K loop of ceil(w/BK), or,
XRES, one dot against the row tile's x held for all chunks), stored once as
the saved pre-activation when training, passed through GELU in registers and
multiplied into the down-projection accumulator, whose width is DP/2 for
tiles of width <= DP/2. The activation never makes a round trip through
memory. Launches: tile plan + fused kernel (2).

Backward: one fused kernel per row tile gives grad_x and the pre-activation
gradient dh (kept for dW1); weight gradients as deterministic split
reductions. Launches: plan, fused, dW1 partials, dW2 partials, 2 reductions (6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (HALF, Checker, acc_type, dot_precision, gelu, gelu_grad, index_type,
                      next_pow2)
from ._gemm import dw_rows, weight_grad
from ._tiles import build_tiles


@triton.jit
def _ffn_fwd_body(x_ptr, s_xm, w1_ptr, s_w1h, b1_ptr, w2_ptr, s_w2n, b2_ptr, y_ptr, s_ym,
                  h_ptr, s_hm, D, H, w, rw, rows, rmask, ro,
                  BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                  DPB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  SAVE: tl.constexpr, XRES: tl.constexpr):
    # output columns [0, DPB): DPB >= w bounds the down-projection's N
    dc = tl.arange(0, DPB)
    dmask = dc < w
    jc0 = tl.arange(0, BH)
    kc0 = tl.arange(0, BK)
    # load masks rounded up to 8 columns stay vectorised; exact widths are
    # applied in registers (x may hold garbage beyond w)
    wb = tl.minimum((w + 7) // 8 * 8, D)
    rwb = tl.minimum((rw + 7) // 8 * 8, H)
    acc = tl.zeros([BM, DPB], dtype=ACC)
    if XRES:  # the row tile's x loaded once for every chunk (K = DPB, one dot)
        xa = tl.load(x_ptr + ro[:, None] * s_xm + dc[None, :],
                     mask=rmask[:, None] & (dc[None, :] < wb), other=0.0)
        xa = tl.where(dc[None, :] < w, xa, 0.0)
    for j0 in range(0, rw, BH):
        jc = j0 + jc0
        jmask = jc < rw
        h = tl.zeros([BM, BH], dtype=ACC)
        if XRES:
            b = tl.load(w1_ptr + jc[None, :] * s_w1h + dc[:, None],
                        mask=(dc[:, None] < wb) & jmask[None, :], other=0.0)
            h = tl.dot(xa, b, h, input_precision=PREC, out_dtype=ACC)
        else:  # K loop bounded by the width
            for k0 in range(0, w, BK):
                kc = k0 + kc0
                a = tl.load(x_ptr + ro[:, None] * s_xm + kc[None, :],
                            mask=rmask[:, None] & (kc[None, :] < wb), other=0.0)
                a = tl.where(kc[None, :] < w, a, 0.0)
                b = tl.load(w1_ptr + jc[None, :] * s_w1h + kc[:, None],
                            mask=(kc[:, None] < wb) & jmask[None, :], other=0.0)
                h = tl.dot(a, b, h, input_precision=PREC, out_dtype=ACC)
        h += tl.load(b1_ptr + jc, mask=jmask, other=0.0).to(ACC)[None, :]
        h = tl.where(jmask[None, :], h, 0.0).to(h_ptr.dtype.element_ty)
        if SAVE:
            tl.store(h_ptr + ro[:, None] * s_hm + jc[None, :], h,
                     mask=rmask[:, None] & (jc[None, :] < H))
        # GELU of the stored (rounded) value, as backward will see it
        g = gelu(h.to(ACC)).to(h_ptr.dtype.element_ty)
        w2t = tl.load(w2_ptr + dc[None, :] * s_w2n + jc[:, None],
                      mask=(jc[:, None] < rwb) & dmask[None, :], other=0.0)
        acc = tl.dot(g, w2t, acc, input_precision=PREC, out_dtype=ACC)
    acc += tl.load(b2_ptr + dc, mask=dmask, other=0.0).to(ACC)[None, :]
    acc = tl.where(dmask[None, :], acc, 0.0)
    tl.store(y_ptr + ro[:, None] * s_ym + dc[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & (dc[None, :] < D))


@triton.jit
def _ffn_fwd_kernel(tiles, NT, x_ptr, s_xm, w1_ptr, s_w1h, b1_ptr, w2_ptr, s_w2n, b2_ptr,
                    y_ptr, s_ym, h_ptr, s_hm, D, H, RATIO,
                    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                    DP: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, IDX: tl.constexpr, SAVE: tl.constexpr,
                    XRES: tl.constexpr):
    t = tl.program_id(0)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    w = tl.load(tiles + 4 * NT + t)
    rw = RATIO * w
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    ro = rows.to(IDX)
    if SPLIT:
        # tiles of width <= DP/2 accumulate only DP/2 output columns (half
        # the down-projection's work) and zero the rest
        if w <= DP // 2:
            _ffn_fwd_body(x_ptr, s_xm, w1_ptr, s_w1h, b1_ptr, w2_ptr, s_w2n, b2_ptr, y_ptr,
                          s_ym, h_ptr, s_hm, D, H, w, rw, rows, rmask, ro,
                          BM, BH, BK, DP // 2, ACC, PREC, SAVE, XRES)
            zc = DP // 2 + tl.arange(0, DP // 2)
            tl.store(y_ptr + ro[:, None] * s_ym + zc[None, :],
                     tl.zeros([BM, DP // 2], dtype=y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (zc[None, :] < D))
        else:
            _ffn_fwd_body(x_ptr, s_xm, w1_ptr, s_w1h, b1_ptr, w2_ptr, s_w2n, b2_ptr, y_ptr,
                          s_ym, h_ptr, s_hm, D, H, w, rw, rows, rmask, ro,
                          BM, BH, BK, DP, ACC, PREC, SAVE, XRES)
    else:
        _ffn_fwd_body(x_ptr, s_xm, w1_ptr, s_w1h, b1_ptr, w2_ptr, s_w2n, b2_ptr, y_ptr,
                      s_ym, h_ptr, s_hm, D, H, w, rw, rows, rmask, ro,
                      BM, BH, BK, DP, ACC, PREC, SAVE, XRES)
    # the saved pre-activation is zero beyond r*w
    if SAVE:
        jc0 = tl.arange(0, BH)
        for j0 in range(tl.cdiv(rw, BH) * BH, H, BH):
            jc = j0 + jc0
            tl.store(h_ptr + ro[:, None] * s_hm + jc[None, :],
                     tl.zeros([BM, BH], dtype=h_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (jc[None, :] < H))


@triton.jit
def _ffn_bwd_kernel(tiles, NT, dy_ptr, s_dym, w1_ptr, s_w1h, w2_ptr, s_w2n,
                    h_ptr, s_hm, dh_ptr, s_dhm, gx_ptr, s_gxm, D, H, RATIO,
                    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                    DP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    IDX: tl.constexpr):
    t = tl.program_id(0)
    row0 = tl.load(tiles + t)
    row1 = tl.load(tiles + NT + t)
    if row0 >= row1:
        return
    w = tl.load(tiles + 4 * NT + t)
    rw = RATIO * w
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row1
    ro = rows.to(IDX)
    dc = tl.arange(0, DP)
    dmask = dc < w
    jc0 = tl.arange(0, BH)
    kc0 = tl.arange(0, BK)
    wb = tl.minimum((w + 7) // 8 * 8, D)
    rwb = tl.minimum((rw + 7) // 8 * 8, H)
    acc = tl.zeros([BM, DP], dtype=ACC)
    for j0 in range(0, rw, BH):
        jc = j0 + jc0
        jmask = jc < rw
        dg = tl.zeros([BM, BH], dtype=ACC)
        for k0 in range(0, w, BK):
            kc = k0 + kc0
            a = tl.load(dy_ptr + ro[:, None] * s_dym + kc[None, :],
                        mask=rmask[:, None] & (kc[None, :] < wb), other=0.0)
            a = tl.where(kc[None, :] < w, a, 0.0)
            b = tl.load(w2_ptr + kc[:, None] * s_w2n + jc[None, :],
                        mask=(kc[:, None] < w) & (jc[None, :] < rwb), other=0.0)
            dg = tl.dot(a, b, dg, input_precision=PREC, out_dtype=ACC)
        hm = rmask[:, None] & (jc[None, :] < rwb)
        h = tl.load(h_ptr + ro[:, None] * s_hm + jc[None, :], mask=hm, other=0.0)
        dh = tl.where(jmask[None, :], dg * gelu_grad(h.to(ACC)), 0.0)
        dh = dh.to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + ro[:, None] * s_dhm + jc[None, :], dh, mask=hm)
        w1c = tl.load(w1_ptr + jc[:, None] * s_w1h + dc[None, :],
                      mask=jmask[:, None] & (dc[None, :] < wb), other=0.0)
        acc = tl.dot(dh, w1c, acc, input_precision=PREC, out_dtype=ACC)
    acc = tl.where(dmask[None, :], acc, 0.0)
    tl.store(gx_ptr + ro[:, None] * s_gxm + dc[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=rmask[:, None] & (dc[None, :] < D))


def _blocks(x, D):
    """(BM, BH, BK, DP, warps, stages, XRES); BM shrinks for wide models so
    the [BM, DP] accumulator stays in registers. XRES: the forward holds the
    row tile's x for all chunks (one K = DP dot) instead of a K loop."""
    dp = next_pow2(D)
    if _common.small_blocks(x):
        return 16, 64, 32, dp, 4, 1, _common.INTERPRETER_FFN_XRES
    b = _common.blocks("ffn", x.dtype)
    cap = 16384 if x.dtype in HALF else 4096
    warps = b["warps"] if dp > 64 else min(b["warps"], 4)
    return (max(16, min(b["BM"], cap // dp)), b["BH"], b["BK"], dp, warps, b["stages"],
            bool(b.get("XRES", False)) and dp <= 128)  # measured up to D 128


def _check(op, x, cu_seqlens, widths, w1, w2, ratio):
    c = Checker(op, x)
    D = x.shape[1]
    c.positive(ratio, "ratio")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"{c.op}: w1 must be [hidden, {D}]")
    H = w1.shape[0]
    w1 = c.tensor(w1, "w1", [H, D])
    w2 = c.tensor(w2, "w2", [D, H])
    cu, widths = c.routes(cu_seqlens, (widths, "widths"))
    return c, x.contiguous(), cu, widths, w1, w2, H


def sliced_ffn_fwd(x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4, save_hidden=True):
    c, x, cu, widths, w1, w2, H = _check("sliced_ffn_fwd", x, cu_seqlens, widths, w1,
                                         w2, ratio)
    T, D = x.shape
    b1 = c.tensor(b1, "b1", [H])
    b2 = c.tensor(b2, "b2", [D])
    y = torch.empty_like(x)
    hidden = torch.empty(T if save_hidden else 0, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y, hidden
    # without saving, the kernel gets y as a never-written stand-in pointer
    h_arg = hidden if save_hidden else y
    bm, bh, bk, dp, warps, stages, xres = _blocks(x, D)
    (tiles,) = build_tiles(cu, widths, widths, T, [(bm, False)])
    _ffn_fwd_kernel[(tiles.nt,)](tiles.data, tiles.nt, x, x.stride(0), w1, w1.stride(0),
                                 b1, w2, w2.stride(0), b2, y, y.stride(0),
                                 h_arg, h_arg.stride(0), D, H, int(ratio),
                                 BM=bm, BH=bh, BK=bk, DP=dp, SPLIT=dp >= 32,
                                 ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype),
                                 IDX=index_type(x, h_arg), SAVE=bool(save_hidden),
                                 XRES=xres, num_warps=warps, num_stages=stages)
    return y, hidden


def sliced_ffn_backward(grad_out, x, cu_seqlens, widths, w1, w2, hidden, ratio):
    c, x, cu, widths, w1, w2, H = _check("sliced_ffn_backward", x, cu_seqlens, widths,
                                         w1, w2, ratio)
    T, D = x.shape
    dy = c.tensor(grad_out, "grad_out", [T, D])
    hidden = c.tensor(hidden, "hidden", [T, H])
    gx = torch.empty_like(x)
    gw1, gb1 = torch.empty_like(w1), torch.empty(H, dtype=x.dtype, device=x.device)
    gw2, gb2 = torch.empty_like(w2), torch.empty(D, dtype=x.dtype, device=x.device)
    if T == 0:
        return gx, gw1.zero_(), gb1.zero_(), gw2.zero_(), gb2.zero_()
    ratio = int(ratio)
    bm, bh, bk, dp, warps, stages, _ = _blocks(x, D)
    bm_dw = dw_rows(x)
    configs = [(bm, False)] if bm == bm_dw else [(bm, False), (bm_dw, False)]
    tiles = build_tiles(cu, widths, widths, T, configs)
    dh = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _ffn_bwd_kernel[(tiles[0].nt,)](tiles[0].data, tiles[0].nt, dy, dy.stride(0),
                                    w1, w1.stride(0), w2, w2.stride(0),
                                    hidden, hidden.stride(0), dh, dh.stride(0),
                                    gx, gx.stride(0), D, H, ratio,
                                    BM=bm, BH=bh, BK=bk, DP=dp, ACC=acc_type(x.dtype),
                                    PREC=dot_precision(x.dtype),
                                    IDX=index_type(x, hidden), num_warps=warps,
                                    num_stages=stages)
    # dW1[j, k] = sum dh[:, j] x[:, k] (j < r*w, k < w); dW2[n, j] = sum dy[:, n] gelu(h)[:, j]
    weight_grad(tiles[-1], dh, x, gw1, gb1, mn=ratio, mk=1,
                a_strides=(dh.stride(0), 1, 0), b_strides=(x.stride(0), 1))
    weight_grad(tiles[-1], dy, hidden, gw2, gb2, mn=1, mk=ratio, gelu_b=True,
                a_strides=(dy.stride(0), 1, 0), b_strides=(hidden.stride(0), 1))
    return gx, gw1, gb1, gw2, gb2
