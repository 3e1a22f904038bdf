import pytest
import torch

import canet_kernels  # noqa: F401
from canet_kernels import reference
from helpers import LENGTHS, WIDTHS_40, assert_matches_reference, assert_zero_beyond, rand, routes
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet
OUT_WIDTHS = [3, 50, 7, 1, 50, 33]


def make_args(lengths=LENGTHS, in_widths=WIDTHS_40, out_widths=OUT_WIDTHS, bias=True,
              D_in=40, D_out=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu, iw = routes(lengths, in_widths)
    ow = torch.tensor(out_widths, dtype=torch.int64)
    T = int(cu[-1])
    return [rand(T, D_in, gen=g), cu, iw, ow, rand(D_out, D_in, scale=D_in ** -0.5, gen=g),
            rand(D_out, scale=0.1, gen=g) if bias else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, bias):
    args = make_args(bias=bias)
    names = ["grad_x", "grad_weight"] + (["grad_bias"] if bias else [])
    got = assert_matches_reference(op.sliced_linear, reference.sliced_linear, args,
                                   dtype, names)
    assert_zero_beyond(got[0], args[1], args[3])  # beyond the out width
    assert_zero_beyond(got[1], args[1], args[2])  # grad_x beyond the in width


def test_one_row_per_sample_scoring():
    # Item scoring: one row per sample, every item scored at the route's width.
    g = torch.Generator().manual_seed(1)
    h = rand(4, 16, gen=g, grad=False)
    items = rand(30, 16, gen=g, grad=False)
    cu = torch.arange(5)
    iw = torch.tensor([16, 8, 4, 8])
    got = op.sliced_linear(h, cu, iw, torch.full((4,), 30), items, None)
    for b in range(4):
        w = int(iw[b])
        torch.testing.assert_close(got[b], items[:, :w] @ h[b, :w])


def test_gradcheck_float64():
    args = make_args(lengths=[2, 1, 3], in_widths=[5, 2, 4], out_widths=[3, 6, 1], D_in=5, D_out=6)
    args = [a.detach().double().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: op.sliced_linear(*a), args)


def test_opcheck():
    for bias in (True, False):
        args = make_args(bias=bias)
        torch.library.opcheck(op.sliced_linear, args)
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        y = op.sliced_linear(*plain)
        torch.library.opcheck(op.sliced_linear_backward,
                              [torch.randn_like(y)] + plain[:5] + [bias])


def test_empty_batch():
    args = make_args(lengths=[], in_widths=[], out_widths=[])
    y = op.sliced_linear(*args)
    assert y.shape == (0, 50)
    y.sum().backward()
    assert args[4].grad.abs().sum() == 0


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(2, torch.tensor([40, 24, 8, 64, 16, 24])), r"in_widths\[3\] = 64 is outside"),
    (lambda a: a.__setitem__(3, torch.tensor([3, 50, 7, 1, 51, 33])), r"out_widths\[4\] = 51 is outside"),
    (lambda a: a.__setitem__(3, torch.tensor([3, 50])), r"out_widths has 2 entries"),
    (lambda a: a.__setitem__(5, a[5].detach()[:10]), r"bias must have shape"),
    (lambda a: a.__setitem__(4, a[4].detach()[None]), r"weight must be \[out_features, in_features\]"),
    (lambda a: a.__setitem__(1, torch.tensor([1, 7, 8, 8, 105, 118, 125])), r"cu_seqlens must start with 0"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_linear(*args)
