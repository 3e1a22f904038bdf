"""Tile metadata of a packed batch, built on the device in one launch.

A tile is a block of at most BM consecutive rows that share one route: rows of
one run of consecutive samples with equal widths (route-sorted batches make a
run a whole width bucket), or, per-sample mode (attention), rows of one
sample. A run of n rows makes cdiv(n, BM) tiles, so there are at most
cdiv(T, BM) + B tiles: a bound known from shapes alone. Kernels launch that
many programs; slots past the real count are empty and exit at once. Nothing
is read back on the host, so ops stay CUDA-graph capturable.

One tile list is an int32 tensor with `nt` slots, real tiles first:
    [0*nt + i] first row       [1*nt + i] end row (empty slot: end == first)
    [2*nt + i] run start row   [3*nt + i] run end row
    [4*nt + i] in width        [5*nt + i] out width
    [6*nt]     number of real tiles
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class Tiles:
    data: torch.Tensor   # the int32 list above
    nt: int              # slots (grid size)
    bm: int              # rows per tile


@triton.jit
def _plan_kernel(cu_ptr, wa_ptr, wb_ptr, buf_ptr, B, T,
                 bm0, split0, nt0, off0, scr0,
                 bm1, split1, nt1, off1, scr1,
                 BLOCK: tl.constexpr):
    # One program per tile list, in three sequential passes over small arrays.
    p = tl.program_id(0)
    bm = tl.where(p == 0, bm0, bm1)
    split = tl.where(p == 0, split0, split1)
    nt = tl.where(p == 0, nt0, nt1)
    tiles = buf_ptr + tl.where(p == 0, off0, off1)
    run_row = buf_ptr + tl.where(p == 0, scr0, scr1)   # B + 1 entries
    run_wa = run_row + B + 1
    run_wb = run_wa + B
    ne_row0 = run_wb + B          # runs with rows, compacted
    ne_row1 = ne_row0 + B
    ne_wa = ne_row1 + B
    ne_wb = ne_wa + B
    ne_cum = ne_wb + B            # first tile of the run
    mark = ne_cum + B             # nt entries: 1 where a run's first tile sits
    ar = tl.arange(0, BLOCK)

    # Pass 1: runs of consecutive samples with equal (in, out) widths.
    nrun = tl.zeros([], dtype=tl.int32)
    for c in range(0, B, BLOCK):
        b = c + ar
        m = b < B
        wa = tl.load(wa_ptr + b, mask=m, other=0).to(tl.int32)
        wb = tl.load(wb_ptr + b, mask=m, other=0).to(tl.int32)
        pm = m & (b > 0)
        pa = tl.load(wa_ptr + b - 1, mask=pm, other=-1).to(tl.int32)
        pb = tl.load(wb_ptr + b - 1, mask=pm, other=-1).to(tl.int32)
        new = m & ((split != 0) | (wa != pa) | (wb != pb))
        f = new.to(tl.int32)
        rid = nrun + tl.cumsum(f, 0) - 1
        start = tl.load(cu_ptr + b, mask=m, other=0).to(tl.int32)
        tl.store(run_row + rid, start, mask=new)
        tl.store(run_wa + rid, wa, mask=new)
        tl.store(run_wb + rid, wb, mask=new)
        nrun += tl.sum(f, 0)
    tl.store(run_row + nrun, T)
    for c in range(0, nt, BLOCK):
        tl.store(mark + c + ar, tl.zeros([BLOCK], dtype=tl.int32), mask=c + ar < nt)
    tl.debug_barrier()

    # Pass 2: tiles per run, their prefix sum, and the non-empty runs.
    nne = tl.zeros([], dtype=tl.int32)
    ntile = tl.zeros([], dtype=tl.int32)
    for c in range(0, nrun, BLOCK):
        r = c + ar
        m = r < nrun
        s = tl.load(run_row + r, mask=m, other=0, volatile=True)
        e = tl.load(run_row + r + 1, mask=m, other=0, volatile=True)
        wa = tl.load(run_wa + r, mask=m, other=0, volatile=True)
        wb = tl.load(run_wb + r, mask=m, other=0, volatile=True)
        n = tl.where(m, (e - s + bm - 1) // bm, 0)
        ne = n > 0
        k = nne + tl.cumsum(ne.to(tl.int32), 0) - 1
        cum = ntile + tl.cumsum(n, 0) - n
        tl.store(ne_row0 + k, s, mask=ne)
        tl.store(ne_row1 + k, e, mask=ne)
        tl.store(ne_wa + k, wa, mask=ne)
        tl.store(ne_wb + k, wb, mask=ne)
        tl.store(ne_cum + k, cum, mask=ne)
        tl.store(mark + cum, ne.to(tl.int32), mask=ne)
        nne += tl.sum(ne.to(tl.int32), 0)
        ntile += tl.sum(n, 0)
    tl.debug_barrier()

    # Pass 3: each slot finds its run as the count of run starts up to it.
    seen = tl.zeros([], dtype=tl.int32)
    for c in range(0, nt, BLOCK):
        i = c + ar
        m = i < nt
        mk = tl.load(mark + i, mask=m, other=0, volatile=True)
        k = seen + tl.cumsum(mk, 0) - 1
        seen += tl.sum(mk, 0)
        valid = m & (i < ntile)
        k = tl.where(valid, k, 0)
        s = tl.load(ne_row0 + k, mask=valid, other=0, volatile=True)
        e = tl.load(ne_row1 + k, mask=valid, other=0, volatile=True)
        cum = tl.load(ne_cum + k, mask=valid, other=0, volatile=True)
        wa = tl.load(ne_wa + k, mask=valid, other=0, volatile=True)
        wb = tl.load(ne_wb + k, mask=valid, other=0, volatile=True)
        r0 = s + (i - cum) * bm
        r1 = tl.minimum(r0 + bm, e)
        tl.store(tiles + i, tl.where(valid, r0, 0), mask=m)
        tl.store(tiles + nt + i, tl.where(valid, r1, 0), mask=m)
        tl.store(tiles + 2 * nt + i, s, mask=m)
        tl.store(tiles + 3 * nt + i, e, mask=m)
        tl.store(tiles + 4 * nt + i, wa, mask=m)
        tl.store(tiles + 5 * nt + i, wb, mask=m)
    tl.store(tiles + 6 * nt, ntile)


def _align(n: int) -> int:
    return (n + 15) // 16 * 16


# Scopes of shared_plans(), innermost last: {key: (Tiles, the key's tensors)}.
_SCOPES: list = []


@contextmanager
def shared_plans():
    """Within the scope, ops on the same routes share their tile lists: a
    list is built once for given (cu_seqlens, widths, rows, BM, mode) tensors
    and views, and later ops find it, e.g. the four ops of a layer, and the
    layers whose active samples are the same. The scope keeps the tensors
    it keyed on alive, so their addresses cannot be reused for other routes
    inside it. Open it around one forward (inside a CUDA-graph capture, not
    around one: a list built before the capture would not be rebuilt by a
    replay), and do not write into the route tensors inside it. Scopes are
    process-wide, so the backward kernels (run by autograd's device threads)
    find the forward's plans when forward and backward run in one scope; a
    lookup in another thread's scope is safe too, since a key names tensors
    that the scope keeps alive."""
    _SCOPES.append({})
    try:
        yield
    finally:
        _SCOPES.pop()


def _route_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape[0], t.dtype)


def build_tiles(cu_seqlens, widths_in, widths_out, T: int, configs):
    """Tile lists for `configs` = [(BM, per_sample), ...] (one or two), in one
    launch (none when a shared_plans() scope already holds them). widths_out
    may be widths_in."""
    if not 1 <= len(configs) <= 2:
        raise ValueError("build_tiles takes one or two configs")
    if not _SCOPES:
        return _build(cu_seqlens, widths_in, widths_out, T, configs)
    scope = _SCOPES[-1]
    base = (_route_key(cu_seqlens), _route_key(widths_in), _route_key(widths_out), T)
    keys = [base + (int(bm), bool(per_sample)) for bm, per_sample in configs]
    missing = [(c, k) for c, k in zip(configs, keys) if k not in scope]
    if missing:
        built = _build(cu_seqlens, widths_in, widths_out, T, [c for c, _ in missing])
        for (_, k), tiles in zip(missing, built):
            scope[k] = (tiles, (cu_seqlens, widths_in, widths_out))
    return [scope[k][0] for k in keys]


def _build(cu_seqlens, widths_in, widths_out, T: int, configs):
    B = widths_in.shape[0]
    params, offset = [], 0
    for bm, per_sample in configs:
        nt = triton.cdiv(T, bm) + B
        off = offset
        scr = _align(off + 6 * nt + 1)
        offset = _align(scr + 8 * B + 1 + nt)
        params.append((bm, int(per_sample), nt, off, scr))
    buf = torch.empty(max(offset, 16), dtype=torch.int32, device=cu_seqlens.device)
    p1 = params[1] if len(params) == 2 else params[0]
    block = min(1024, triton.next_power_of_2(max(B, params[0][2], p1[2], 16)))
    _plan_kernel[(len(configs),)](cu_seqlens, widths_in, widths_out, buf, B, T,
                                  *params[0], *p1, BLOCK=block, num_warps=4)
    return [Tiles(buf[off:off + 6 * nt + 1], nt, bm) for bm, _, nt, off, _ in params]
