"""sliced_linear_topk: chunked full-ranking top-k over the item table at
per-row widths, against torch.topk / a stable sort of the full scores, with
excluded items and exact ties."""
import pytest
import torch

import canet_kernels  # noqa: F401
from canet_kernels import functional, reference
from helpers import exclusion, rand
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet

WIDTHS = [24, 5, 24, 17, 5, 24, 1, 17, 17, 24, 5]


def make_args(widths=WIDTHS, V=1000, D=24, extra=3, bias=True, k=10, chunk=128, seed=0,
              dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    N = len(widths)
    return [rand(N, D, gen=g, grad=False, dtype=dtype), torch.tensor(widths, dtype=torch.int64),
            rand(V, D + extra, scale=D ** -0.5, gen=g, grad=False, dtype=dtype),
            rand(V, scale=0.5, gen=g, grad=False, dtype=dtype) if bias else None, k, chunk]


def full_scores(h, widths, weight, bias):
    D = h.shape[1]
    mask = (torch.arange(D)[None, :] < widths[:, None]).to(h.dtype)
    s = (h * mask) @ weight[:, :D].T
    return s if bias is None else s + bias


@pytest.mark.parametrize("chunk", [1, 7, 128, 333, 1000, 4096])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_topk(chunk, bias):
    V = 1000 if chunk > 7 else 60
    args = make_args(V=V, chunk=chunk, bias=bias, dtype=torch.float64)
    values, indices = op.sliced_linear_topk(*args)
    scores = full_scores(*args[:4])
    want = scores.topk(10, dim=1)
    torch.testing.assert_close(values, want.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, want.indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    args = make_args(dtype=dtype)
    values, indices = op.sliced_linear_topk(*args)
    assert values.dtype == dtype and indices.dtype == torch.int64
    # scored in fp32: the values are the fp32 scores of the indices returned,
    # and no item outside scores above the 10th
    h, widths, w, b = (a.float() if a.is_floating_point() else a for a in args[:4])
    scores = full_scores(h, widths, w, b)
    torch.testing.assert_close(values.float(), scores.gather(1, indices), rtol=1e-2 if
                               dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    kth = scores.gather(1, indices[:, -1:])
    outside = scores.scatter(1, indices, float("-inf"))
    assert (outside <= kth + 1e-4).all()


@pytest.mark.parametrize("k", [1, 10, 1000])
@pytest.mark.parametrize("shared", [False, True])
def test_exclusion(k, shared):
    args = make_args(k=k, dtype=torch.float64)
    N = len(WIDTHS)
    ex = exclusion(N, 1000)
    if shared:
        ex = ex[:1]
    values, indices = op.sliced_linear_topk(*args, ex)
    want_v, want_i = reference.sliced_linear_topk(*args, ex)
    torch.testing.assert_close(values, want_v, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, want_i)
    for i in range(N):
        banned = {int(e) for e in ex[0 if shared else i] if e >= 0}
        if k < 1000 - len(banned):
            assert not banned & set(indices[i].tolist())
        else:  # excluded items rank last, lower index first
            tail = indices[i, -len(banned):].tolist()
            assert tail == sorted(banned) and values[i, -len(banned):].eq(float("-inf")).all()


def test_ties_lower_index_first():
    # duplicated item rows score exactly alike: lower index first, also
    # across chunks (chunk 16: items 3, 40 and 700 share one row)
    args = make_args(bias=False, chunk=16, k=12)
    w = args[2].clone()
    for dup in (40, 700, 17):
        w[dup] = w[3]
    w[500] = w[501] = w[999]
    h = args[0]
    best = w[3, :24] * 10  # make item 3's row the best for the first rows
    h[:4, :] = best[:24] / best.norm() ** 2 * 50
    args[2] = w
    values, indices = op.sliced_linear_topk(*args)
    want_v, want_i = reference.sliced_linear_topk(*args)
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(values, want_v)
    row = indices[0].tolist()
    assert row[:4] == [3, 17, 40, 700]
    for i in range(len(WIDTHS)):
        r = indices[i].tolist()
        for a, b in zip(r, r[1:]):
            va, vb = values[i, r.index(a)], values[i, r.index(b)]
            assert va > vb or (va == vb and a < b)


def test_opcheck():
    args = make_args()
    torch.library.opcheck(op.sliced_linear_topk, args)
    torch.library.opcheck(op.sliced_linear_topk, args + [exclusion(len(WIDTHS), 1000)])


def test_empty_and_k_zero():
    v, i = op.sliced_linear_topk(*make_args(widths=[]))
    assert v.shape == (0, 10) and i.shape == (0, 10)
    v, i = op.sliced_linear_topk(*make_args(k=0))
    assert v.shape == (len(WIDTHS), 0) and i.dtype == torch.int64


def test_inputs_that_require_grad():
    args = make_args()
    args[0].requires_grad_()
    args[2].requires_grad_()
    v, i = op.sliced_linear_topk(*args)
    assert not v.requires_grad


def test_deterministic_over_threads():
    args = make_args(widths=WIDTHS * 40, chunk=64)
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(op.sliced_linear_topk(*args))
    torch.set_num_threads(1)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_functional_leading_dims():
    g = torch.Generator().manual_seed(3)
    B, L, D, V = 2, 4, 16, 300
    h = rand(B, L, D, gen=g, grad=False)
    w = rand(V, D, scale=0.25, gen=g, grad=False)
    widths = torch.tensor([16, 8])
    ex = torch.randint(0, V, (B, L, 3), generator=g)
    v, i = functional.sliced_linear_topk(h, widths, w, None, 5, exclude=ex)
    assert v.shape == (B, L, 5)
    rv, ri = reference.sliced_linear_topk(h.reshape(-1, D), widths.repeat_interleave(L), w,
                                          None, 5, None, ex.reshape(-1, 3))
    assert torch.equal(i.reshape(-1, 5), ri)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(4, 1001), r"k = 1001 is outside \[0, 1000\]"),
    (lambda a: a.__setitem__(4, -1), r"k = -1 is outside"),
    (lambda a: a.append(torch.tensor([[1, 1000]])), r"exclude\[0, 1\] = 1000 is not an item id"),
    (lambda a: a.append(torch.zeros(3, 2, dtype=torch.int64)), r"exclude must be item ids"),
    (lambda a: a.append(torch.zeros(1, 2)), r"exclude must be an int32 or int64"),
    (lambda a: a.__setitem__(1, torch.tensor(WIDTHS[:-1] + [0])), r"widths\[10\] = 0 is outside"),
    (lambda a: a.__setitem__(5, -3), r"chunk_size must be >= 1"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_linear_topk(*args)
