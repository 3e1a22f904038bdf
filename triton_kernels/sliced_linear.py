"""sliced_linear: y[t, :o_b] = x[t, :i_b] @ W[:o_b, :i_b]^T + bias[:o_b].

Forward: tile plan + one grouped GEMM (2 launches).
Backward: tile plan, grad_x GEMM, weight-gradient partials, fixed-order
reduction (4 launches).
"""
from __future__ import annotations

import torch

from ._common import Checker
from ._gemm import dw_rows, mm, mm_rows, weight_grad
from ._tiles import build_tiles


def _check(op, x, cu_seqlens, in_widths, out_widths, weight):
    c = Checker(op, x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{c.op}: weight must be [out_features, in_features]")
    weight = c.tensor(weight, "weight")
    if x.shape[1] < weight.shape[1]:
        raise ValueError(f"{c.op}: x must be [T, >= {weight.shape[1]}] (the weight's "
                         f"in_features), got {list(x.shape)}")
    cu, iw, ow = c.routes(cu_seqlens, (in_widths, "in_widths"), (out_widths, "out_widths"))
    return c, x.contiguous(), cu, iw, ow, weight


def sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias=None):
    c, x, cu, iw, ow, weight = _check("sliced_linear", x, cu_seqlens, in_widths,
                                      out_widths, weight)
    O = weight.shape[0]
    if bias is not None:
        bias = c.tensor(bias, "bias", [O])
    T = x.shape[0]
    y = torch.empty(T, O, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    (tiles,) = build_tiles(cu, iw, ow, T, [(mm_rows(x), False)])
    return mm(tiles, x, weight, bias, y,
              a_strides=(x.stride(0), x.stride(1), 0, 0),
              w_strides=(weight.stride(0), weight.stride(1), 0, 0),
              y_strides=(y.stride(0), y.stride(1), 0))


def sliced_linear_backward(grad_out, x, cu_seqlens, in_widths, out_widths, weight,
                           has_bias):
    c, x, cu, iw, ow, weight = _check("sliced_linear_backward", x, cu_seqlens,
                                      in_widths, out_widths, weight)
    T, O = x.shape[0], weight.shape[0]
    dy = c.tensor(grad_out, "grad_out", [T, O])
    gx = torch.empty_like(x)
    gw = torch.empty_like(weight)
    gb = torch.empty(O if has_bias else 0, dtype=x.dtype, device=x.device)
    if T == 0:
        return gx, gw.zero_(), gb.zero_()
    bm, bm_dw = mm_rows(x), dw_rows(x)
    configs = [(bm, False)] if bm == bm_dw else [(bm, False), (bm_dw, False)]
    tiles = build_tiles(cu, iw, ow, T, configs)
    # grad_x[:, :i] = dy[:, :o] @ W[:o, :i]
    mm(tiles[0], dy, weight, None, gx, kw_from_out=True, w_nk=(weight.shape[1], O),
       a_strides=(dy.stride(0), dy.stride(1), 0, 0),
       w_strides=(weight.stride(1), weight.stride(0), 0, 0),
       y_strides=(gx.stride(0), gx.stride(1), 0))
    weight_grad(tiles[-1], dy, x, gw, gb if has_bias else None,
                a_strides=(dy.stride(0), dy.stride(1), 0),
                b_strides=(x.stride(0), x.stride(1)))
    return gx, gw, gb
