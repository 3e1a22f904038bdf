"""canet_kernels.scoring_gemm: routed cross-entropy (forward, backward,
autograd) and top-k by chunked matrix products, against the per-row
plain-PyTorch reference (canet_kernels.reference), with ignored rows, odd
sizes, mixed widths, exact ties, exclusion, and a bound on the size of every
tensor it makes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from canet_kernels import reference
from canet_kernels import scoring_gemm as sg
from helpers import exclusion
from helpers import one_thread  # noqa: F401  (autouse fixture)

# mixed widths, not sorted, not multiples of 8; targets with negative ids and
# ignore_index (0 below) in between
WIDTHS = [24, 5, 24, 17, 5, 24, 1, 17, 17, 24, 5]
TARGETS = [3, 0, 296, -1, 41, 7, 299, 0, 12, -7, 200]
# relative to the largest reference value
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


def make(widths=WIDTHS, V=300, D=24, Dw=27, bias=True, seed=0, dtype=torch.float64):
    """(h, widths, weight, bias); h is NOT zero beyond the widths (the
    reference ignores those entries, and so must the op)."""
    g = torch.Generator().manual_seed(seed)
    N = len(widths)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, Dw, generator=g, dtype=torch.float64) * D ** -0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    return h, torch.tensor(widths, dtype=torch.int64), w, b


def reference_ce(h, widths, weight, bias, targets, ignore_index):
    """(loss, lse, grad_h, grad_weight, grad_bias) by autograd through the
    reference, in float64 on the same values."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (h, weight, bias)]
    loss = reference.sliced_linear_cross_entropy(leaves[0], widths, leaves[1], leaves[2],
                                                 targets, ignore_index)
    lse = reference.sliced_linear_cross_entropy_lse(leaves[0], widths, leaves[1], leaves[2],
                                                    targets, ignore_index)
    need = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, need, allow_unused=True) if loss.requires_grad \
        else [torch.zeros_like(t) for t in need]
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, need)]
    return [loss.detach(), lse.detach()] + list(grads) + ([None] if bias is None else [])


def close(got, want, dtype, name):
    tol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err} > {tol * scale}"


def run_ce(args, targets, ignore_index, chunk, grad_loss=1.0):
    loss, lse = sg.cross_entropy_fwd(*args, targets, ignore_index, chunk)
    grads = sg.cross_entropy_backward(torch.tensor(grad_loss), *args, targets, lse,
                                      ignore_index, chunk)
    return [loss, lse] + list(grads)


# ---------------------------------------------------------- cross-entropy --

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [7, 128, 1000])
def test_cross_entropy_matches_reference(dtype, bias, chunk):
    # V = 300: not a multiple of 7 or 128; 1000 > V (one chunk)
    args = make(bias=bias, dtype=dtype)
    targets = torch.tensor(TARGETS)
    got = run_ce(args, targets, 0, chunk)
    want = reference_ce(*args, targets, 0)
    assert got[0].dtype == got[1].dtype == (torch.float64 if dtype == torch.float64
                                            else torch.float32)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, name
        close(g, w, dtype, name)
    # exactly zero beyond each row's width, and for the ignored rows
    h, widths = args[0], args[1]
    beyond = torch.arange(h.shape[1])[None, :] >= widths[:, None]
    assert got[2][beyond].eq(0).all()
    ignored = (targets < 0) | (targets == 0)
    assert got[1][ignored].eq(0).all() and got[2][ignored].eq(0).all()


@pytest.mark.parametrize("V, chunk", [(41, 1), (41, 8), (41, 41), (41, 500)])
def test_cross_entropy_chunk_sizes(V, chunk):
    targets = torch.tensor([t % V if t > 0 else t for t in TARGETS])
    args = make(V=V)
    got = run_ce(args, targets, -100, chunk, grad_loss=2.5)
    want = reference_ce(*args, targets, -100)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        close(g, w * (2.5 if name.startswith("grad") else 1.0), torch.float64, name)


@pytest.mark.parametrize("Dw", [24, 30, 20])
def test_cross_entropy_table_narrower_or_wider_than_h(Dw):
    widths = [min(w, Dw) for w in WIDTHS]
    args = make(widths=widths, Dw=Dw)
    targets = torch.tensor(TARGETS)
    got = run_ce(args, targets, 0, 64)
    want = reference_ce(*args, targets, 0)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        close(g, w, torch.float64, name)


def test_cross_entropy_bfloat16_large_logits():
    # logits around 45: bf16 rounds the lse by up to 0.125 there, which the
    # backward must not pass on to the softmax (it is a per-row factor)
    h, widths, w, b = make(dtype=torch.bfloat16)
    args = (h, widths, w, (b.float() + 40).bfloat16())
    targets = torch.tensor(TARGETS)
    got = run_ce(args, targets, 0, 64)
    want = reference_ce(*args, targets, 0)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        close(g, w, torch.bfloat16, name)


def test_cross_entropy_ignored_rows_with_huge_logits():
    # an ignored row's logits would overflow exp(); its zero weight must not
    # turn that into nan (inf * 0) in the other rows' gradients
    h, widths, w, b = make(dtype=torch.float32)
    targets = torch.tensor(TARGETS)
    ignored = (targets < 0) | (targets == 0)
    h = torch.where(ignored[:, None], h * 1e4, h)
    got = run_ce((h, widths, w, b), targets, 0, 64)
    want = reference_ce(h, widths, w, b, targets, 0)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        close(g, w, torch.float32, name)


@pytest.mark.parametrize("bias", [True, False])
def test_cross_entropy_all_ignored(bias):
    args = make(bias=bias)
    targets = torch.tensor([-100, -1, 5, -3, -100, 5, -100, -2, 5, -100, -100])
    loss, lse, gh, gw, gb = run_ce(args, targets, 5, 16)
    assert loss.item() == 0 and lse.eq(0).all()
    assert gh.eq(0).all() and gw.eq(0).all()
    assert gb is None if not bias else gb.eq(0).all()


@pytest.mark.parametrize("N", [0, 1])
def test_cross_entropy_zero_and_one_row(N):
    args = make(widths=WIDTHS[:N] if N else [])
    targets = torch.tensor(TARGETS[:N], dtype=torch.int64)
    loss, lse, gh, gw, gb = run_ce(args, targets, 0, 32)
    assert lse.shape == (N,) and gh.shape == (N, 24)
    want = reference_ce(*args, targets, 0)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"],
                          [loss, lse, gh, gw, gb], want):
        close(g, w, torch.float64, name)


@pytest.mark.parametrize("bias", [True, False])
def test_autograd_wrapper_gradcheck(bias):
    h, widths, w, b = make(widths=[4, 2, 3, 4], V=9, D=4, Dw=5, bias=bias, seed=3)
    targets = torch.tensor([1, -100, 8, 0])
    leaves = [t.requires_grad_() for t in (h, w, b) if t is not None]

    def fn(*ts):
        hh, ww = ts[0], ts[1]
        bb = ts[2] if bias else None
        return sg.cross_entropy(hh, widths, ww, bb, targets, -100, 4)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_autograd_wrapper_matches_functions():
    args = make(dtype=torch.float32)
    targets = torch.tensor(TARGETS)
    h = args[0].clone().requires_grad_()
    w = args[2].clone().requires_grad_()
    # bias without a gradient: none is returned for it
    loss = sg.cross_entropy(h, args[1], w, args[3], targets, 0, 50)
    (3.0 * loss).backward()
    fwd = sg.cross_entropy_fwd(*args, targets, 0, 50)
    gh, gw, _ = sg.cross_entropy_backward(torch.tensor(3.0), *args, targets, fwd[1], 0, 50)
    assert torch.equal(loss.detach(), fwd[0])
    torch.testing.assert_close(h.grad, gh, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=0)


# ------------------------------------------------------------------ top-k --


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
@pytest.mark.parametrize("bias", [True, False])
def test_topk_matches_reference(dtype, chunk, bias):
    V = 300 if chunk > 1 else 40
    args = make(V=V, bias=bias, dtype=dtype)
    for k in (1, 10, V):
        v, i = sg.topk(*args, k, chunk)
        rv, ri = reference.sliced_linear_topk(*args, k)
        assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == (len(WIDTHS), k)
        torch.testing.assert_close(v, rv, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(i, ri)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_topk_exclusion(shared, k):
    args = make(dtype=torch.float32)
    ex = exclusion(len(WIDTHS), 300)
    if shared:
        ex = ex[:1]
    v, i = sg.topk(*args, k, 37, ex)
    rv, ri = reference.sliced_linear_topk(*args, k, exclude=ex)
    torch.testing.assert_close(v, rv, rtol=2e-5, atol=2e-5)
    assert torch.equal(i, ri)
    rows = ex.expand(len(WIDTHS), -1)
    for r in range(len(WIDTHS)):
        banned = set(rows[r][rows[r] >= 0].tolist())
        ranked = i[r].tolist()
        # excluded ids only at the end, at -inf
        n_ok = sum(1 for x in ranked if x not in banned)
        assert all(x not in banned for x in ranked[:n_ok])
        assert torch.isinf(v[r, n_ok:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_topk_ties_lower_index_first(dtype, chunk):
    # small integers: every score exact in every dtype, many equal scores,
    # equal groups spread over chunks and across the k-th place
    g = torch.Generator().manual_seed(5)
    N, D, V = 9, 6, 60
    h = torch.randint(-1, 2, (N, D), generator=g).to(dtype)
    w = torch.randint(-1, 2, (V, D), generator=g).to(dtype)
    b = torch.randint(-1, 2, (V,), generator=g).to(dtype)
    widths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 2])
    ex = exclusion(N, V, seed=2)
    for k in (1, 5, 17, V):
        for e in (None, ex, ex[:1]):
            v, i = sg.topk(h, widths, w, b, k, chunk, e)
            rv, ri = reference.sliced_linear_topk(h, widths, w, b, k, exclude=e)
            assert torch.equal(v, rv) and torch.equal(i, ri), (k, e is None)


def test_topk_bfloat16():
    h, widths, w, b = make(dtype=torch.bfloat16)
    ex = exclusion(len(WIDTHS), 300)
    v, i = sg.topk(h, widths, w, b, 10, 64, ex)
    assert v.dtype == torch.bfloat16
    # the values are the scores of the items returned, and no other
    # (non-excluded) item scores above the 10th
    scores = reference.sliced_linear_logits(h.float(), widths, w.float(), b.float())
    for r, e in enumerate(ex):
        scores[r, e[e >= 0]] = float("-inf")
    torch.testing.assert_close(v.float(), scores.gather(1, i), rtol=1e-2, atol=1e-2)
    outside = scores.scatter(1, i, float("-inf"))
    assert (outside.amax(1) <= v[:, -1].float() + 1e-2).all()


def test_topk_zero_rows_and_k_zero():
    args = make(widths=[])
    v, i = sg.topk(*args, 5)
    assert v.shape == i.shape == (0, 5)
    v, i = sg.topk(*make(), 0)
    assert v.shape == i.shape == (len(WIDTHS), 0)


def test_keys_order_and_round_trip():
    x = torch.tensor([[float("-inf"), -3.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, 2.0, float("inf")]])
    keys = sg._keys(x, 10)
    values, ids = sg._unkey(keys)
    assert torch.equal(ids[0], torch.arange(10, 19))
    assert torch.equal(values, x)  # -0.0 == 0.0
    # descending keys: descending score, lower id first on equal scores
    # (-0.0 and 0.0 are equal scores)
    order = keys[0].argsort(descending=True).tolist()
    assert order == [8, 6, 7, 5, 3, 4, 2, 1, 0]


# ------------------------------------------------------------ memory bound --

class _Sizes(TorchDispatchMode):
    """The largest tensor any aten op returns under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_rows_by_items_tensor(monkeypatch):
    N, D, V, chunk = 96, 16, 2000, 100
    args = make(widths=[16, 3, 9, 12] * (N // 4), V=V, D=D, Dw=D, dtype=torch.float32)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    products = []

    def spy(a, b, out_dtype=None):
        y = real(a, b, out_dtype)
        products.append(tuple(y.shape))
        return y

    real = sg._mm
    monkeypatch.setattr(sg, "_mm", spy)
    h = args[0].clone().requires_grad_()
    with _Sizes() as sizes:
        sg.cross_entropy(h, args[1], args[2], args[3], targets, -100, chunk).backward()
        sg.topk(*args, 10, chunk, exclusion(N, V))
    # the largest: grad_weight / the table itself [V, D]; nothing [N, V]
    assert sizes.largest <= max(V * D, N * chunk) < N * V // 4
    chunks = -(-V // chunk)
    assert len(products) == chunks * 5  # forward 1, backward 3, top-k 1 per chunk
    assert all(r * c <= max(N, D + 8) * chunk for r, c in products)


# -------------------------------------------------------------- arguments --

def test_argument_errors():
    h, widths, w, b = make(dtype=torch.float32)
    t = torch.tensor(TARGETS)
    fwd = sg.cross_entropy_fwd
    with pytest.raises(ValueError, match="h must be rows"):
        fwd(h[0], widths, w, b, t)
    with pytest.raises(ValueError, match="weight has dtype") as e:
        fwd(h, widths, w.double(), b, t)
    assert isinstance(e.value, TypeError)
    with pytest.raises(ValueError, match="bias must have shape"):
        fwd(h, widths, w, b[:-1], t)
    with pytest.raises(ValueError, match="widths must have shape"):
        fwd(h, widths[:-1], w, b, t)
    with pytest.raises(ValueError, match="widths must be an int"):
        fwd(h, widths.float(), w, b, t)
    with pytest.raises(ValueError, match=r"widths\[1\] = 0 is outside"):
        fwd(h, torch.tensor([24, 0] + WIDTHS[2:]), w, b, t)
    with pytest.raises(ValueError, match="targets must have shape"):
        fwd(h, widths, w, b, t[:-1])
    with pytest.raises(ValueError, match=r"targets\[2\] = 300 is not an item"):
        fwd(h, widths, w, b, torch.tensor([3, 0, 300] + TARGETS[3:]), 0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        fwd(h, widths, w, b, t, 0, 0)
    loss, lse = fwd(h, widths, w, b, t, 0)
    with pytest.raises(ValueError, match="lse must have shape"):
        sg.cross_entropy_backward(torch.tensor(1.0), h, widths, w, b, t, lse[:-1], 0)
    with pytest.raises(ValueError, match="grad_loss must be"):
        sg.cross_entropy_backward(torch.ones(2), h, widths, w, b, t, lse, 0)
    for k in (-1, 301):
        with pytest.raises(ValueError, match="k = .* is outside"):
            sg.topk(h, widths, w, b, k)
    with pytest.raises(ValueError, match="exclude must be item ids"):
        sg.topk(h, widths, w, b, 3, exclude=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="exclude holds id 300"):
        sg.topk(h, widths, w, b, 3, exclude=torch.tensor([[300]]))
    with pytest.raises(ValueError, match="chunk_size must be"):
        sg.topk(h, widths, w, b, 3, chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16():
    args = [t.cuda() for t in make(dtype=torch.bfloat16)]
    targets = torch.tensor(TARGETS, device="cuda")
    got = run_ce(args, targets, 0, 64)
    want = reference_ce(*[t.cpu() for t in args], targets.cpu(), 0)
    for name, g, w in zip(["loss", "lse", "grad_h", "grad_weight", "grad_bias"], got, want):
        close(g.cpu(), w, torch.bfloat16, name)
    v, i = sg.topk(*args, 10, 64)
    rv, _ = reference.sliced_linear_topk(*[t.float().cpu() if t.is_floating_point()
                                           else t.cpu() for t in args], 10)
    torch.testing.assert_close(v.float().cpu(), rv, rtol=2e-2, atol=2e-2)
