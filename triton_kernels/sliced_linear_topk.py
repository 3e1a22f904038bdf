"""sliced_linear_topk: each row's k best items (score descending, index
ascending on ties) without the [N, V] scores.

One launch over (row tile, item range): every program keeps a running top-k
per row in registers ([BM, KP] values and ids, KP = k rounded up to a power
of two) and merges each scores tile into it by k selection steps (the best
of the running list and the tile, lower id first on equal scores), skipping
tiles whose best score is below every row's current k-th. The ranges' lists
are merged by two stable sorts (id, then score). A simple version: the
selection costs k passes over a tile. On CUDA, exclude ids are not checked
(ids >= V exclude nothing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, dot_precision
from ._scoring import (Check, acc_dtype, blocks, items_per_split, logits_tile, row_block,
                       splits)


@triton.jit
def _topk_kernel(h_ptr, s_hn, s_hk, wid_ptr, w_ptr, s_wv, s_wk, b_ptr,
                 ex_ptr, s_er, s_ec, M, out_v, out_i, N, V, K, PER_SPLIT,
                 HAS_BIAS: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    ro, rmask, wrow, kmax = row_block(pid * BM, N, wid_ptr, BM)
    NONE = V  # the id of an empty slot: after every real id
    slots = tl.arange(0, KP)
    run_v = tl.full([BM, KP], float("-inf"), ACC)
    run_i = tl.zeros([BM, KP], tl.int64) + NONE
    v0 = sp * PER_SPLIT
    v1 = tl.minimum(v0 + PER_SPLIT, V)
    for c0 in range(v0, v1, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < v1
        co = cols.to(tl.int64)
        x = logits_tile(h_ptr, s_hn, s_hk, wrow, ro, rmask, w_ptr, s_wv, s_wk, co, cmask,
                        kmax, b_ptr, HAS_BIAS, BM, BN, BK, ACC, PREC)
        for j in range(0, M):
            e = tl.load(ex_ptr + ro * s_er + j * s_ec, mask=rmask, other=-1).to(tl.int64)
            x = tl.where(co[None, :] == e[:, None], float("-inf"), x)
        x = tl.where(cmask[None, :], x, float("-inf"))
        ids = tl.where(cmask[None, :], co[None, :], NONE) + tl.zeros([BM, BN], tl.int64)
        # the k-th of the running list; a tile can change a row only with a
        # score above it, or while the row's list is not full
        last = slots[None, :] == K - 1
        kth_v = tl.max(tl.where(last, run_v, float("-inf")), 1)
        kth_i = tl.min(tl.where(last, run_i, NONE), 1)
        best = tl.max(x, 1)
        need = tl.sum(((best > kth_v) | (kth_i == NONE)).to(tl.int32), 0)
        if need > 0:
            new_v = tl.full([BM, KP], float("-inf"), ACC)
            new_i = tl.zeros([BM, KP], tl.int64) + NONE
            for j in range(0, K):
                tm = tl.max(x, 1)
                ti = tl.min(tl.where(x == tm[:, None], ids, NONE), 1)
                rm = tl.max(run_v, 1)
                ri = tl.min(tl.where(run_v == rm[:, None], run_i, NONE), 1)
                take = (tm > rm) | ((tm == rm) & (ti < ri))
                bv = tl.where(take, tm, rm)
                bi = tl.where(take, ti, ri)
                here = slots[None, :] == j
                new_v = tl.where(here, bv[:, None], new_v)
                new_i = tl.where(here, bi[:, None], new_i)
                gone = take[:, None] & (ids == ti[:, None])
                x = tl.where(gone, float("-inf"), x)
                ids = tl.where(gone, NONE, ids)
                gone = (take == 0)[:, None] & (run_i == ri[:, None])
                run_v = tl.where(gone, float("-inf"), run_v)
                run_i = tl.where(gone, NONE, run_i)
            run_v = new_v
            run_i = new_i
    out = (sp * N + ro)[:, None] * KP + slots[None, :]
    tl.store(out_v + out, run_v, mask=rmask[:, None])
    tl.store(out_i + out, run_i, mask=rmask[:, None])


def sliced_linear_topk(h, widths, weight, bias, k, chunk_size=4096, exclude=None):
    c = Check("sliced_linear_topk", h, widths, weight, bias, chunk_size)
    N, V = h.shape[0], weight.shape[0]
    k = int(k)
    if not 0 <= k <= V:
        raise ValueError(f"{c.op}: k = {k} is outside [0, {V}] (the items of weight)")
    if exclude is not None:
        c.ints(exclude, "exclude", None, dim=2)
        if exclude.dim() != 2 or exclude.shape[0] not in (N, 1):
            raise ValueError(f"{c.op}: exclude must be item ids [N, M] = [{N}, M] or [1, M] "
                             f"(one list for every row), got shape {list(exclude.shape)}")
    if N == 0 or k == 0:
        return (torch.empty(N, k, dtype=h.dtype, device=h.device),
                torch.empty(N, k, dtype=torch.int64, device=h.device))
    h, widths, weight = h.contiguous(), widths.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    acc = acc_dtype(h.dtype)
    bm, bn, bk, warps, stages = blocks(h)
    S = splits(N, V, bm, bn, h)
    per = items_per_split(V, S, bn)
    S = triton.cdiv(V, per)
    kp = triton.next_power_of_2(k)
    vals = torch.empty(S, N, kp, dtype=acc, device=h.device)
    ids = torch.empty(S, N, kp, dtype=torch.int64, device=h.device)
    if exclude is not None and exclude.shape[1] > 0:
        ex = exclude.contiguous()
        ex_args = (ex, ex.stride(0) if ex.shape[0] > 1 else 0, ex.stride(1), ex.shape[1])
    else:
        ex_args = (widths, 0, 0, 0)
    _topk_kernel[(triton.cdiv(N, bm), S)](
        h, h.stride(0), h.stride(1), widths, weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else weight, *ex_args, vals, ids, N, V, k, per,
        HAS_BIAS=bias is not None, KP=kp, BM=bm, BN=bn, BK=bk, ACC=acc_type(h.dtype),
        PREC=dot_precision(h.dtype), num_warps=warps, num_stages=stages)
    # merge the ranges: by id, then stably by score (descending)
    vals = vals.permute(1, 0, 2).reshape(N, S * kp)
    ids = ids.permute(1, 0, 2).reshape(N, S * kp)
    ids, order = torch.sort(ids, dim=1, stable=True)
    vals = vals.gather(1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    return vals[:, :k].to(h.dtype).contiguous(), ids[:, :k].contiguous()
