"""Routed scoring by plain matrix products over chunks of items: the training
cross-entropy over the item table (forward and backward) and full-ranking
top-k, the same contract as torch.ops.canet.sliced_linear_cross_entropy(_fwd,
_backward) and sliced_linear_topk (csrc/registration.cpp).

Row i of h [N, D] runs at width widths[i]: its logits are
h[i, :w_i] . weight[v, :w_i] + bias[v]. Once h is zero beyond each row's
width (masked here, once: N x D), these are ordinary full-width products, so
every heavy step is one torch.mm over a chunk of `chunk_size` items, on a GPU
a cuBLAS GEMM at its full speed. Between the products only elementwise work
and row reductions run, on tensors of at most rows x chunk_size: memory is
O(N * chunk_size + V * D), flat in the item count V, where plain F.linear +
F.cross_entropy hold [N, V] logits several times.

An alternative to the fused Triton kernels (canet_kernels.triton), not
registered for torch.ops.canet: which is faster depends on the GPU, dtype and
sizes, and is to be settled by measurement (benchmarks/bench_scoring.py
--providers fused,gemm,plain). Pure PyTorch, so it also runs on the CPU; the
tests compare it with canet_kernels.reference.

Memory traffic, the cost that decides against plain PyTorch on a GPU (the
products themselves are cheap at D ~ 128):
- a bias column and a shift column ride along in the products: rows are
  [h masked | 1 | -shift | 0 pad], item chunks [W | bias | 1 | 0 pad] (the
  pad keeps the row length a multiple of 8 for the tensor-core kernels), so
  the GEMM writes logits + bias, or logits - shift, with no extra pass;
- forward: per chunk the logits in the input dtype, their row max, then
  exp(logits - max) summed in fp32 (in place); the chunks' log-sum-exps are
  combined by logaddexp. The target's logit is gathered directly, in fp32;
- backward: per chunk the GEMM writes logits - lse (lse rounded to the input
  dtype; the rounding left over is a per-row factor), exp in place gives the
  softmax up to that factor, the target's entry gets its one-hot term, and
  the row factor (times grad_loss / kept rows) is applied to the small
  operands: grad_h after the product, h (and the bias column) before the
  grad_weight product, whose extra column is grad_bias;
- top-k: scores in fp32, excluded ids set to -inf, and each score packed with
  its item id into one int64 key (score bits in an order-preserving form
  above, the complement of the id below), so that torch.topk over keys, which
  are all distinct, picks exactly the (score descending, id ascending) order
  whatever its tie handling; float64 scores do not fit a key and use stable
  sorts instead (slow; tests only).

16-bit inputs: products accumulate in fp32 (cuBLAS does; where torch.mm
takes out_dtype the fp32 results come straight from it), the logits, softmax
and products' inputs are in the input dtype as in plain PyTorch, the loss,
lse and grad_h accumulation are fp32. Values that would need a host sync on a
GPU (widths, target and exclude ids) are checked only for CPU tensors;
elsewhere ids >= V count as logit 0 (targets) or exclude nothing, as in the
Triton kernels.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 8192

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW = (1 << 32) - 1      # the id half of a top-k key
_SIGN_REST = 0x7FFFFFFF   # all bits of an int32 but the sign


class ScoringDtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype: a TypeError as from the other backends,
    and a ValueError like every other argument error here."""


# ----------------------------------------------------------------- checks --

def _fail(op, msg, cls=ValueError):
    raise cls(f"canet.scoring_gemm.{op}: {msg}")


def _same(op, t, name, h, shape=None):
    if not isinstance(t, torch.Tensor) or t.dtype != h.dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(op, f"{name} has dtype {got} but must be {h.dtype} (that of h)", ScoringDtypeError)
    if t.device != h.device:
        _fail(op, f"{name} is on {t.device} but h is on {h.device}")
    if shape is not None and list(t.shape) != list(shape):
        _fail(op, f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _ints(op, t, name, h):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        _fail(op, f"{name} must be an int32 or int64 tensor", ScoringDtypeError)
    if t.device != h.device:
        _fail(op, f"{name} is on {t.device} but h is on {h.device}")


def _on_host(t):
    return t.device.type == "cpu"


def _check(op, h, widths, weight, bias, chunk_size):
    if not isinstance(h, torch.Tensor) or h.dtype not in _FLOATS:
        _fail(op, "h must be a float16, bfloat16, float32 or float64 tensor", ScoringDtypeError)
    if h.dim() != 2:
        _fail(op, f"h must be rows [N, features], got shape {list(h.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        _fail(op, f"weight must be the item table [items, features], got {got}")
    _same(op, weight, "weight", h)
    if weight.shape[0] < 1:
        _fail(op, "weight has no items")
    if bias is not None:
        _same(op, bias, "bias", h, [weight.shape[0]])
    _ints(op, widths, "widths", h)
    if widths.dim() != 1 or widths.shape[0] != h.shape[0]:
        _fail(op, f"widths must have shape [{h.shape[0]}] (one entry per row of h), got "
                  f"{list(widths.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        _fail(op, f"chunk_size must be an int >= 1, got {chunk_size!r}")
    width_max = min(h.shape[1], weight.shape[1])
    if _on_host(widths) and widths.numel() and \
            not bool(((widths >= 1) & (widths <= width_max)).all()):
        bad = int((~((widths >= 1) & (widths <= width_max))).nonzero()[0, 0])
        _fail(op, f"widths[{bad}] = {int(widths[bad])} is outside [1, {width_max}] (the "
                  "features of h and of weight)")


def _check_targets(op, targets, h, weight, ignore_index):
    _ints(op, targets, "targets", h)
    if targets.dim() != 1 or targets.shape[0] != h.shape[0]:
        _fail(op, f"targets must have shape [{h.shape[0]}] (one entry per row of h), got "
                  f"{list(targets.shape)}")
    if _on_host(targets):
        bad = _kept(targets, ignore_index) & (targets >= weight.shape[0])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            _fail(op, f"targets[{i}] = {int(targets[i])} is not an item id (weight has "
                      f"{weight.shape[0]} items)")


def _kept(targets, ignore_index):
    return (targets >= 0) & (targets != ignore_index)


def _acc(dtype):
    """fp32 for 16-bit inputs, else the input's own precision (also the
    dtype of the loss and lse)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------- the products --

_NO_OUT_DTYPE = set()  # device types whose torch.mm refused out_dtype


def _mm(a, b, out_dtype=None):
    """a @ b by torch.mm (cuBLAS on a GPU; fp32 accumulation for 16-bit
    inputs), returned in out_dtype (default a's). Every product over items
    goes through here: the tests count its output sizes."""
    if out_dtype is None or out_dtype == a.dtype:
        return torch.mm(a, b)
    dev = a.device.type
    if dev == "cuda" and dev not in _NO_OUT_DTYPE:
        # the fp32 result straight from the GEMM: no rounding to 16 bits and
        # no conversion pass
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            _NO_OUT_DTYPE.add(dev)
    return torch.mm(a, b).to(out_dtype)


def _layout(h, weight):
    """(K, P): the features both h and weight have, and the row length of
    the products' operands: K features, the bias column K, the shift column
    K + 1, zeros up to a multiple of 8."""
    K = min(h.shape[1], weight.shape[1])
    return K, (K + 2 + 7) // 8 * 8


def _rows(h, widths, K, P):
    """([N, P] rows: h zeroed beyond each row's width | 1 | 0 (shift) | 0,
    the [N, K] width mask)."""
    mask = torch.arange(K, device=h.device) < widths[:, None]
    rows = h.new_zeros(h.shape[0], P)
    rows[:, :K] = torch.where(mask, h[:, :K], 0)
    rows[:, K] = 1
    return rows, mask


class _Items:
    """Item chunks [n, P]: weight[c0:c1, :K] | bias (0 without) | 1 | 0, in
    one buffer reused by every chunk (memory: one chunk)."""

    def __init__(self, weight, bias, K, P, chunk_size):
        self.weight, self.bias, self.K = weight, bias, K
        self.buf = weight.new_zeros(min(chunk_size, weight.shape[0]), P)
        self.buf[:, K + 1] = 1

    def __call__(self, c0, c1):
        b = self.buf[:c1 - c0]
        b[:, :self.K] = self.weight[c0:c1, :self.K]
        if self.bias is not None:
            b[:, self.K] = self.bias[c0:c1]
        return b


def _chunks(V, chunk_size):
    for c0 in range(0, V, chunk_size):
        yield c0, min(c0 + chunk_size, V)


# ---------------------------------------------------------- cross-entropy --

def cross_entropy_fwd(h, widths, weight, bias, targets, ignore_index=-100,
                      chunk_size=DEFAULT_CHUNK):
    """(loss, lse [N]): the mean over kept rows (target neither negative nor
    ignore_index) of logsumexp(logits[i]) - logits[i, targets[i]], 0 when no
    row is kept; lse is 0 for the other rows. fp32 for 16-bit inputs."""
    op = "cross_entropy_fwd"
    _check(op, h, widths, weight, bias, chunk_size)
    _check_targets(op, targets, h, weight, ignore_index)
    N, V = h.shape[0], weight.shape[0]
    acc = _acc(h.dtype)
    if N == 0:
        return h.new_zeros((), dtype=acc), h.new_zeros(0, dtype=acc)
    K, P = _layout(h, weight)
    rows, _ = _rows(h, widths, K, P)
    items = _Items(weight, bias, K, P, chunk_size)
    lse = h.new_full((N,), float("-inf"), dtype=acc)
    for c0, c1 in _chunks(V, chunk_size):
        x = _mm(rows, items(c0, c1).T)        # logits + bias, in h's dtype
        m = x.amax(1, keepdim=True)
        s = x.sub_(m).exp_().sum(1, dtype=acc)  # in place: one [N, chunk] buffer
        lse = torch.logaddexp(lse, m.squeeze(1).to(acc) + s.log())
    keep = _kept(targets, ignore_index)
    hit = keep & (targets < V)
    t = torch.where(hit, targets, 0).long()
    # the target's logit from its own row of weight, in fp32: no [N, V] gather
    tgt = (rows[:, :K].to(acc) * weight[t, :K].to(acc)).sum(1)
    if bias is not None:
        tgt = tgt + bias[t].to(acc)
    tgt = torch.where(hit, tgt, 0)
    count = keep.sum().clamp(min=1).to(acc)
    loss = torch.where(keep, lse - tgt, 0).sum() / count
    return loss, torch.where(keep, lse, 0)


def cross_entropy_backward(grad_loss, h, widths, weight, bias, targets, lse,
                           ignore_index=-100, chunk_size=DEFAULT_CHUNK):
    """(grad_h, grad_weight, grad_bias or None) of cross_entropy_fwd's loss
    scaled by grad_loss, from its lse; grad_h is zero beyond each row's
    width, and ignored rows get and give no gradient."""
    op = "cross_entropy_backward"
    _check(op, h, widths, weight, bias, chunk_size)
    _check_targets(op, targets, h, weight, ignore_index)
    if not isinstance(grad_loss, torch.Tensor) or grad_loss.numel() != 1:
        _fail(op, "grad_loss must be a one-element tensor")
    N, V = h.shape[0], weight.shape[0]
    if not isinstance(lse, torch.Tensor) or list(lse.shape) != [N]:
        got = list(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        _fail(op, f"lse must have shape [{N}] (from cross_entropy_fwd), got {got}")
    grad_w = torch.zeros_like(weight)
    grad_b = None if bias is None else torch.zeros_like(bias)
    if N == 0:
        return torch.zeros_like(h), grad_w, grad_b
    acc = _acc(h.dtype)
    K, P = _layout(h, weight)
    rows, mask = _rows(h, widths, K, P)
    items = _Items(weight, bias, K, P, chunk_size)
    keep = _kept(targets, ignore_index)
    hit = keep & (targets < V)
    t = torch.where(hit, targets, 0).long()
    lse = lse.to(device=h.device, dtype=acc)
    scale = torch.where(keep, grad_loss.reshape(()).to(device=h.device, dtype=acc)
                        / keep.sum().clamp(min=1).to(acc), 0)
    # The products give logits - shift with shift = lse rounded to h's dtype
    # (exact for fp32 / fp64); ignored rows get a huge shift, so that exp
    # gives 0 there rather than overflowing.
    huge = torch.finfo(h.dtype).max / 4
    shift = torch.where(keep, lse, huge).to(h.dtype)
    rows[:, K + 1] = -shift
    off = torch.where(keep, shift.to(acc) - lse, 0)   # softmax = exp(x - shift) * exp(off)
    f = torch.where(keep, scale * torch.exp(off), 0)  # per-row factor of every gradient
    onehot = torch.where(hit, torch.exp(-off), 0)     # 1 in units of exp(x - shift)
    # grad_weight / grad_bias product's rows: f * h | f | 0
    scaled = (rows.to(acc) * f[:, None]).to(h.dtype)
    scaled[:, K + 1] = 0
    grad_h = h.new_zeros(N, K, dtype=acc)
    for c0, c1 in _chunks(V, chunk_size):
        w = items(c0, c1)
        p = _mm(rows, w.T).exp_()               # softmax / exp(off), [N, chunk]
        inside = hit & (t >= c0) & (t < c1)
        # minus the one-hot term at the target (rows without one here add 0)
        p.scatter_add_(1, torch.where(inside, t - c0, 0)[:, None],
                       torch.where(inside, -onehot, 0).to(p.dtype)[:, None])
        grad_h += _mm(p, w[:, :K], out_dtype=acc)
        g = _mm(p.T, scaled)                    # [chunk, P]: grad_weight | grad_bias
        grad_w[c0:c1, :K] = g[:, :K]
        if grad_b is not None:
            grad_b[c0:c1] = g[:, K]
    out = torch.zeros_like(h)
    # only the row's own width: the items' features beyond it got products
    # with p too, but the row never used them
    out[:, :K] = torch.where(mask, grad_h * f[:, None], 0)
    return out, grad_w, grad_b


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, widths, weight, bias, targets, ignore_index, chunk_size):
        loss, lse = cross_entropy_fwd(h, widths, weight, bias, targets, ignore_index,
                                      chunk_size)
        ctx.save_for_backward(h, widths, weight, bias, targets, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        h, widths, weight, bias, targets, lse = ctx.saved_tensors
        gh, gw, gb = cross_entropy_backward(grad_loss, h, widths, weight, bias, targets, lse,
                                            ctx.ignore_index, ctx.chunk_size)
        need = ctx.needs_input_grad
        return (gh if need[0] else None, None, gw if need[2] else None,
                gb if need[3] else None, None, None, None)


def cross_entropy(h, widths, weight, bias, targets, ignore_index=-100,
                  chunk_size=DEFAULT_CHUNK):
    """cross_entropy_fwd's loss with autograd through cross_entropy_backward
    (saves h, weight and lse [N]: no [N, V] tensor)."""
    return _CrossEntropy.apply(h, widths, weight, bias, targets, ignore_index, chunk_size)


# ------------------------------------------------------------------ top-k --

def _keys(scores, c0):
    """int64 keys of fp32 scores [N, n] of items c0.., ordered as (score
    descending, id ascending) is: the score's bits made order-preserving
    (negative floats have their magnitude bits flipped; -0.0 joins +0.0)
    above, 2^32 - 1 - id below."""
    bits = scores.view(torch.int32)
    neg = bits >> 31                                   # -1 for negative floats
    key = (neg & _SIGN_REST).bitwise_xor_(bits).sub_(neg)  # in place: one temporary
    low = _LOW - torch.arange(c0, c0 + scores.shape[1], device=scores.device)
    return torch.add(low, key, alpha=1 << 32)


def _unkey(keys):
    """(fp32 scores, int64 ids) of _keys' keys."""
    key = (keys >> 32).to(torch.int32)
    neg = key >> 31
    bits = (key + neg) ^ (neg & _SIGN_REST)
    return bits.view(torch.float32), _LOW - (keys & _LOW)


def topk(h, widths, weight, bias, k, chunk_size=DEFAULT_CHUNK, exclude=None):
    """(values [N, k] in h's dtype, indices [N, k] int64): each row's k best
    items, score descending, lower index first on equal scores; the ids in
    exclude [N, M] or [1, M] (negative = none) score -inf (and still rank,
    last, when fewer than k items remain)."""
    op = "topk"
    _check(op, h, widths, weight, bias, chunk_size)
    N, V = h.shape[0], weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= V:
        _fail(op, f"k = {k!r} is outside [0, {V}] (the items of weight)")
    if V > _LOW:
        _fail(op, f"weight has {V} items; top-k keys hold ids below 2^32")
    if exclude is not None:
        _ints(op, exclude, "exclude", h)
        if exclude.dim() != 2 or exclude.shape[0] not in (N, 1):
            _fail(op, f"exclude must be item ids [N, M] = [{N}, M] or [1, M] (one list for "
                      f"every row), got shape {list(exclude.shape)}")
        if _on_host(exclude) and exclude.numel() and bool((exclude >= V).any()):
            _fail(op, f"exclude holds id {int(exclude.max())}, not an item id (weight has "
                      f"{V} items)")
    if N == 0 or k == 0:
        return h.new_empty(N, k), torch.empty(N, k, dtype=torch.int64, device=h.device)
    acc = _acc(h.dtype)
    K, P = _layout(h, weight)
    rows, _ = _rows(h, widths, K, P)
    items = _Items(weight, bias, K, P, chunk_size)
    ex = None
    if exclude is not None and exclude.shape[1] > 0:
        ex = exclude.long().expand(N, -1)
    keyed = acc == torch.float32
    best = best_v = best_i = None
    for c0, c1 in _chunks(V, chunk_size):
        scores = _mm(rows, items(c0, c1).T, out_dtype=acc)
        if ex is not None:
            # -inf at this chunk's excluded ids; the others write +inf to
            # column 0, which amin ignores
            inside = (ex >= c0) & (ex < c1)
            scores.scatter_reduce_(1, torch.where(inside, ex - c0, 0),
                                   torch.where(inside, float("-inf"), float("inf"))
                                   .to(scores.dtype), "amin")
        if keyed:
            # distinct keys: torch.topk's choice among equal scores cannot matter
            top = _keys(scores, c0)
            top = top.topk(min(k, top.shape[1]), dim=1, sorted=False).values
            if best is not None:
                top = torch.cat([best, top], 1)
                top = top.topk(min(k, top.shape[1]), dim=1, sorted=False).values
            best = top
        else:
            # the kept list (lower ids, in order) before this chunk's ids (in
            # order): a stable sort by score keeps the lower id first on ties
            ids = torch.arange(c0, c1, device=h.device).expand(N, -1)
            if best_v is not None:
                scores, ids = torch.cat([best_v, scores], 1), torch.cat([best_i, ids], 1)
            best_v, order = torch.sort(scores, dim=1, descending=True, stable=True)
            best_v, best_i = best_v[:, :k], ids.gather(1, order[:, :k])
    if keyed:
        values, indices = _unkey(best.sort(dim=1, descending=True).values)
    else:
        values, indices = best_v, best_i
    return values.to(h.dtype), indices
