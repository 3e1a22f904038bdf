import pytest
import torch

import canet_kernels  # noqa: F401
from canet_kernels import reference
from canet_kernels.functional import sliced_ffn, unpack
from helpers import (LENGTHS, WIDTHS_40, assert_matches_reference,
                     assert_zero_beyond, rand, routes)
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet
R = 4


def make_args(D=40, lengths=LENGTHS, widths=WIDTHS_40, seed=0, ratio=R):
    g = torch.Generator().manual_seed(seed)
    cu, w = routes(lengths, widths)
    T = int(cu[-1])
    return [rand(T, D, gen=g), cu, w, rand(ratio * D, D, scale=D ** -0.5, gen=g),
            rand(ratio * D, scale=0.1, gen=g),
            rand(D, ratio * D, scale=(ratio * D) ** -0.5, gen=g),
            rand(D, scale=0.1, gen=g), ratio]


NAMES = ["grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ratio", [4, 2])
def test_matches_reference(dtype, ratio):
    args = make_args(ratio=ratio)
    got = assert_matches_reference(op.sliced_ffn, reference.sliced_ffn, args,
                                   dtype, NAMES)
    assert_zero_beyond(got[0], args[1], args[2])
    assert_zero_beyond(got[1], args[1], args[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tiles_over_threads(threads):
    # Enough rows for the forward's row tiles to spread over the threads,
    # runs of several widths and a run shorter than a tile; training
    # (pre-activation saved, every gradient) and inference.
    lengths = [50] * 30 + [7] * 3 + [50] * 25 + [13] * 40 + [1]
    widths = [40] * 30 + [24] * 3 + [8] * 25 + [40] * 40 + [16]
    args = make_args(lengths=lengths, widths=widths)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = assert_matches_reference(op.sliced_ffn, reference.sliced_ffn, args,
                                       torch.float32, NAMES)
        assert_zero_beyond(got[0], args[1], args[2])
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        out, hidden = op.sliced_ffn_fwd(*plain)
        with torch.inference_mode():  # thread-local state reaches the pool threads
            torch.testing.assert_close(op.sliced_ffn(*plain), out)
        x, cu, w, w1, b1 = plain[:5]
        for b in range(len(w)):
            s, e, d = int(cu[b]), int(cu[b + 1]), int(w[b])
            torch.testing.assert_close(hidden[s:e, :R * d],
                                       x[s:e, :d] @ w1[:R * d, :d].T + b1[:R * d])
            assert hidden[s:e, R * d:].abs().sum() == 0
    finally:
        torch.set_num_threads(old)


def test_hidden_is_the_pre_activation():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    x, cu, widths, w1, b1 = args[:5]
    _, hidden = op.sliced_ffn_fwd(*args)
    for b in range(len(widths)):
        s, e, w = int(cu[b]), int(cu[b + 1]), int(widths[b])
        torch.testing.assert_close(hidden[s:e, :R * w], x[s:e, :w] @ w1[:R * w, :w].T + b1[:R * w])
        assert hidden[s:e, R * w:].abs().sum() == 0


def test_gradcheck_float64():
    args = make_args(D=8, lengths=[3, 1, 2], widths=[8, 4, 6], ratio=2)
    args = [a.detach().double().requires_grad_(True)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    assert torch.autograd.gradcheck(lambda *a: op.sliced_ffn(*a), args)


def test_opcheck():
    args = make_args(lengths=[5, 2, 0, 3], widths=[40, 8, 16, 24])
    torch.library.opcheck(op.sliced_ffn_fwd, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, hidden = op.sliced_ffn_fwd(*plain)
    torch.library.opcheck(op.sliced_ffn_backward,
                          [torch.randn_like(out), plain[0], plain[1], plain[2],
                           plain[3], plain[5], hidden, R])


def test_empty_batch_and_zero_length_samples():
    for lengths, widths in [([], []), ([0, 0], [8, 40])]:
        args = make_args(lengths=lengths, widths=widths)
        y = op.sliced_ffn(*args)
        assert y.shape == (0, 40)
        y.sum().backward()
        assert torch.isfinite(args[3].grad).all()
        # no tokens: every parameter gradient is exactly zero
        for i in (3, 4, 5, 6):
            assert torch.equal(args[i].grad, torch.zeros_like(args[i])), i


def test_padded_batch_matches_packed():
    args = make_args()
    x, cu, widths = args[0].detach(), args[1], args[2]
    lengths = cu[1:] - cu[:-1]
    padded = unpack(x, lengths, 97)
    got = sliced_ffn(padded, lengths, widths, *args[3:])
    torch.testing.assert_close(got, unpack(op.sliced_ffn(x, cu, widths, *args[3:]), lengths, 97))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(2, torch.tensor([40, 24, 8, 41, 16, 24])), r"widths\[3\] = 41 is outside"),
    (lambda a: a.__setitem__(2, torch.tensor([40, 0, 8, 40, 16, 24])), r"widths\[1\] = 0 is outside"),
    (lambda a: a.__setitem__(3, a[3].detach()[:100]), r"w1 must be"),
    (lambda a: a.__setitem__(5, a[5].detach()[:, :100]), r"w2 must have shape"),
    (lambda a: a.__setitem__(4, a[4].detach().half()), r"b1 has dtype Half"),
    (lambda a: a.__setitem__(7, 0), r"ratio must be >= 1"),
    (lambda a: a.__setitem__(0, a[0].detach().int()), r"x must be a floating tensor"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_ffn(*args)


def test_inference_skips_the_saved_pre_activation():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    out, hidden = op.sliced_ffn_fwd(*args, save_hidden=False)
    assert hidden.shape == (0, R * 40)
    torch.testing.assert_close(out, op.sliced_ffn_fwd(*args)[0])
    torch.library.opcheck(op.sliced_ffn_fwd, args + [False])
    with torch.no_grad():  # the public op takes the inference path here
        torch.testing.assert_close(op.sliced_ffn(*args), out)
