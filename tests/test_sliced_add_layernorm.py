import pytest
import torch

import canet_kernels  # noqa: F401
from canet_kernels import reference
from canet_kernels.functional import sliced_add_layernorm, unpack
from helpers import (LENGTHS, WIDTHS_40, assert_matches_reference,
                     assert_zero_beyond, rand, routes)
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet


def make_args(D=40, lengths=LENGTHS, widths=WIDTHS_40, seed=0, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    cu, w = routes(lengths, widths)
    T = int(cu[-1])
    return [rand(T, D, gen=g), rand(T, D, gen=g), cu, w,
            1 + rand(D, scale=0.1, gen=g), rand(D, scale=0.1, gen=g), eps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(dtype):
    args = make_args()
    got = assert_matches_reference(op.sliced_add_layernorm, reference.sliced_add_layernorm,
                                   args, dtype, ["grad_x", "grad_residual", "grad_weight",
                                                 "grad_bias"])
    for t in got[:3]:
        assert_zero_beyond(t, args[2], args[3])


def test_stats():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    x, r, cu, widths = args[:4]
    out, mean, rstd = op.sliced_add_layernorm_fwd(*args)
    s, e, w = int(cu[3]), int(cu[4]), int(widths[3])
    h = x[s:e, :w] + r[s:e, :w]
    torch.testing.assert_close(mean[s:e], h.mean(1))
    torch.testing.assert_close(rstd[s:e], (h.var(1, unbiased=False) + 1e-5).rsqrt())


def test_bf16_stats_are_fp32():
    args = [a.detach().bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in make_args()]
    _, mean, rstd = op.sliced_add_layernorm_fwd(*args)
    assert mean.dtype == rstd.dtype == torch.float32


def test_gradcheck_float64():
    args = make_args(D=6, lengths=[3, 1, 2], widths=[6, 2, 5])
    args = [a.detach().double().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: op.sliced_add_layernorm(*a), args)


def test_opcheck():
    args = make_args(lengths=[5, 2, 0, 3], widths=[40, 8, 16, 24])
    torch.library.opcheck(op.sliced_add_layernorm_fwd, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, mean, rstd = op.sliced_add_layernorm_fwd(*plain)
    torch.library.opcheck(op.sliced_add_layernorm_backward,
                          [torch.randn_like(out)] + plain[:5] + [mean, rstd])


def test_weight_gradient_is_deterministic_across_threads():
    args = make_args(lengths=[300, 211, 97], widths=[40, 8, 24])
    y = op.sliced_add_layernorm(*args)
    g = torch.randn_like(y)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(y, args[4], g, retain_graph=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_empty_and_constant_rows_are_finite():
    args = make_args(lengths=[], widths=[])
    assert op.sliced_add_layernorm(*args).shape == (0, 40)
    args = make_args(lengths=[3, 0], widths=[8, 40])
    args[0] = torch.zeros(3, 40, requires_grad=True)  # zero variance rows
    args[1] = torch.zeros(3, 40)
    y = op.sliced_add_layernorm(*args)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(args[0].grad).all()
    # rows of zeros normalise to 0: y is the bias, and with grad_out = 1 the
    # input gradient is rstd * (weight - mean(weight)), rstd = eps ** -0.5
    w, b, eps = args[4].detach()[:8], args[5].detach()[:8], args[6]
    want_y = torch.zeros(3, 40)
    want_y[:, :8] = b
    torch.testing.assert_close(y.detach(), want_y)
    want_g = torch.zeros(3, 40)
    want_g[:, :8] = eps ** -0.5 * (w - w.mean())
    torch.testing.assert_close(args[0].grad, want_g)


def test_padded_batch_matches_packed():
    args = make_args()
    x, r, cu, widths = args[0].detach(), args[1].detach(), args[2], args[3]
    lengths = cu[1:] - cu[:-1]
    got = sliced_add_layernorm(unpack(x, lengths, 97), unpack(r, lengths, 97), lengths,
                               widths, *args[4:])
    want = unpack(op.sliced_add_layernorm(x, r, cu, widths, *args[4:]), lengths, 97)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(3, torch.tensor([40, 24, 8, 80, 16, 24])), r"widths\[3\] = 80 is outside"),
    (lambda a: a.__setitem__(1, a[1].detach()[:, :8]), r"residual must have shape"),
    (lambda a: a.__setitem__(4, a[4].detach().double()), r"weight has dtype Double"),
    (lambda a: a.__setitem__(2, torch.tensor([[0, 7]])), r"cu_seqlens must be 1-D"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_add_layernorm(*args)
