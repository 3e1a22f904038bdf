"""Shared pieces of the routed scoring launchers (sliced_linear_cross_entropy,
sliced_linear_topk): argument checks, tile shapes, and the logits tile.

Row i of h [N, D] runs at width widths[i]: a tile of BM rows x BN items sums
h[i, k] * W[v, k] over k < widths[i] (loads masked per row, the K loop up to
the tile's widest row), so one launch covers a batch of mixed widths, sorted
or not. Items are split into S ranges that run as separate programs; their
per-row results are combined afterwards by a few torch ops in a fixed order
(no atomics, no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import FLOATS, HALF

# GPU tiles (one table with the others' shapes in _common.BLOCKS): BM rows x
# BN items, BK features per K step. Not tuned yet.
_common.BLOCKS.setdefault(("score", "half"), dict(BM=64, BN=64, BK=32, warps=4, stages=3))
_common.BLOCKS.setdefault(("score", "full"), dict(BM=32, BN=64, BK=32, warps=4, stages=2))


def blocks(t):
    """(BM, BN, BK, warps, stages) for tensors like t; small tiles in the
    interpreter so that short test tables still span several tiles."""
    if _common.small_blocks(t):
        return 16, 32, 16, 4, 1
    b = _common.blocks("score", t.dtype)
    return b["BM"], b["BN"], b["BK"], b["warps"], b["stages"]


def splits(rows, items, bm, bn, t):
    """Item ranges per row tile: about four programs per multiprocessor on a
    GPU; 3 in the interpreter (several ranges to merge, few programs)."""
    tiles = triton.cdiv(items, bn)
    if _common.small_blocks(t):
        return max(1, min(tiles, 3))
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count \
        if t.device.type == "cuda" else 132
    return max(1, min(tiles, triton.cdiv(4 * sms, max(triton.cdiv(rows, bm), 1))))


def items_per_split(items, s, bn):
    return triton.cdiv(triton.cdiv(items, s), bn) * bn


class Check:
    """Argument checks with errors naming the argument (shapes, dtypes and
    devices only: values would need a host sync)."""

    def __init__(self, op, h, widths, weight, bias, chunk_size):
        self.op = f"canet.{op} (triton)"
        if not isinstance(h, torch.Tensor) or h.dtype not in FLOATS:
            raise TypeError(f"{self.op}: h must be a floating tensor")
        if h.dim() != 2:
            raise ValueError(f"{self.op}: h must be rows [N, features], got shape "
                             f"{list(h.shape)}")
        self.h = h
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{self.op}: weight must be the item table [items, features]")
        self.tensor(weight, "weight")
        if weight.shape[0] < 1:
            raise ValueError(f"{self.op}: weight has no items")
        if bias is not None:
            self.tensor(bias, "bias", [weight.shape[0]])
        self.ints(widths, "widths", h.shape[0])
        if int(chunk_size) < 1:
            raise ValueError(f"{self.op}: chunk_size must be >= 1, got {chunk_size}")

    def tensor(self, t, name, shape=None, dtype=None):
        want = self.h.dtype if dtype is None else dtype
        if not isinstance(t, torch.Tensor) or t.dtype != want:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{self.op}: {name} has dtype {got} but must be {want}")
        if t.device != self.h.device:
            raise ValueError(f"{self.op}: {name} is on {t.device} but h is on {self.h.device}")
        if shape is not None and list(t.shape) != list(shape):
            raise ValueError(f"{self.op}: {name} must have shape {list(shape)}, got "
                             f"{list(t.shape)}")

    def ints(self, t, name, length, dim=1):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self.op}: {name} must be an int32 or int64 tensor")
        if t.device != self.h.device:
            raise ValueError(f"{self.op}: {name} is on {t.device} but h is on {self.h.device}")
        if dim == 1 and (t.dim() != 1 or t.shape[0] != length):
            raise ValueError(f"{self.op}: {name} must have shape [{length}] (one entry per "
                             f"row of h), got {list(t.shape)}")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


@triton.jit
def row_block(r0, N, wid_ptr, BM: tl.constexpr):
    """(int64 offsets, mask, widths, widest width) of the BM rows from r0."""
    rows = r0 + tl.arange(0, BM)
    rmask = rows < N
    ro = rows.to(tl.int64)
    wrow = tl.load(wid_ptr + ro, mask=rmask, other=0).to(tl.int32)
    return ro, rmask, wrow, tl.max(wrow, 0)


@triton.jit
def logits_tile(h_ptr, s_hn, s_hk, wrow, rows, rmask, w_ptr, s_wv, s_wk, cols, cmask, kmax,
                b_ptr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """[BM, BN]: sum over k < wrow[r] of h[rows[r], k] * W[cols[c], k], plus
    bias[cols[c]] with HAS_BIAS."""
    acc = tl.zeros([BM, BN], dtype=ACC)
    ks0 = tl.arange(0, BK)
    for k0 in range(0, kmax, BK):
        ks = k0 + ks0
        a = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                    mask=rmask[:, None] & (ks[None, :] < wrow[:, None]), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * s_wv + ks[:, None] * s_wk,
                    mask=cmask[None, :] & (ks[:, None] < kmax), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    return acc
