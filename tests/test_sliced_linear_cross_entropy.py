"""sliced_linear_cross_entropy: cross-entropy over the item table at per-row
widths, chunk by chunk, against the plain computation (F.linear +
F.cross_entropy on full logits) and the per-row reference."""
import pytest
import torch
import torch.nn.functional as F

import canet_kernels  # noqa: F401
from canet_kernels import functional, reference
from canet_kernels.ops import KernelOps
from helpers import assert_matches_reference, rand
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet

# Odd sizes: V not a multiple of the chunk, widths not multiples of 8,
# rows of one width not contiguous, ignored rows in between.
WIDTHS = [24, 5, 24, 17, 5, 24, 1, 17, 17, 24, 5]
TARGETS = [3, 0, 996, -1, 41, 7, 999, 0, 12, -7, 500]


def make_args(widths=WIDTHS, targets=TARGETS, V=1000, D=24, extra=3, bias=True,
              ignore_index=0, chunk=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = len(widths)
    return [rand(N, D, gen=g), torch.tensor(widths, dtype=torch.int64),
            rand(V, D + extra, scale=D ** -0.5, gen=g),
            rand(V, scale=0.5, gen=g) if bias else None,
            torch.tensor(targets, dtype=torch.int64), ignore_index, chunk]


def plain(h, widths, weight, bias, targets, ignore_index, chunk=None):
    """F.linear + F.cross_entropy on the full [N, V] logits; h zero-masked
    beyond each row's width."""
    D = h.shape[1]
    mask = (torch.arange(D)[None, :] < widths[:, None]).to(h.dtype)
    logits = F.linear(h * mask, weight[:, :D], bias)
    t = torch.where(targets < 0, torch.full_like(targets, ignore_index), targets)
    return F.cross_entropy(logits, t, ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, bias):
    args = make_args(bias=bias)
    names = ["grad_h", "grad_weight"] + (["grad_bias"] if bias else [])
    assert_matches_reference(op.sliced_linear_cross_entropy,
                             reference.sliced_linear_cross_entropy, args, dtype, names)


@pytest.mark.parametrize("chunk", [1, 7, 128, 333, 1000, 4096])
def test_matches_plain_pytorch(chunk):
    V = 1000 if chunk > 7 else 40  # one item per chunk: a short table
    targets = [t if t < V else t % V for t in TARGETS]
    args = make_args(targets=targets, V=V, chunk=chunk)
    args = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for a in args]
    loss = op.sliced_linear_cross_entropy(*args)
    want = plain(*args)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    leaves = [args[0], args[2], args[3]]
    got = torch.autograd.grad(loss, leaves)
    exp = torch.autograd.grad(want, leaves)
    for name, a, b in zip(["grad_h", "grad_weight", "grad_bias"], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=name)


def test_lse_and_saved_outputs():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    loss, lse = op.sliced_linear_cross_entropy_fwd(*args)
    assert loss.shape == () and lse.shape == (len(WIDTHS),) and lse.dtype == torch.float32
    want = reference.sliced_linear_cross_entropy_lse(*args[:6])
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)
    ignored = (args[4] < 0) | (args[4] == 0)
    assert ignored.any() and lse[ignored].eq(0).all()
    bf = [a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
          for a in args]
    loss16, lse16 = op.sliced_linear_cross_entropy_fwd(*bf)
    assert loss16.dtype == lse16.dtype == torch.float32  # statistics in fp32


def test_sorted_and_unsorted_rows_agree():
    # rows of one width contiguous (canet's packed order) or scattered
    args = make_args()
    order = torch.argsort(args[1], stable=True)
    sorted_args = list(args)
    sorted_args[0] = args[0].detach()[order].requires_grad_()
    sorted_args[1], sorted_args[4] = args[1][order], args[4][order]
    a = op.sliced_linear_cross_entropy(*args)
    b = op.sliced_linear_cross_entropy(*sorted_args)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, [args[0], args[2], args[3]])
    gb = torch.autograd.grad(b, [sorted_args[0], args[2], args[3]])
    torch.testing.assert_close(ga[0][order], gb[0])
    torch.testing.assert_close(ga[1], gb[1])
    torch.testing.assert_close(ga[2], gb[2])


def test_zero_beyond_width_and_for_ignored_rows():
    args = make_args()
    loss = op.sliced_linear_cross_entropy(*args)
    gh, gw = torch.autograd.grad(loss, [args[0], args[2]])
    for i, (w, t) in enumerate(zip(WIDTHS, TARGETS)):
        assert gh[i, w:].abs().max() == 0 if w < gh.shape[1] else True
        if t <= 0:
            assert gh[i].abs().max() == 0
    assert gw[:, max(WIDTHS):].abs().max() == 0


def test_gradcheck_float64():
    args = make_args(widths=[3, 1, 4, 3, 2], targets=[2, -1, 6, 0, 5], V=7, D=4,
                     extra=1, chunk=3, ignore_index=-100)
    args = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: op.sliced_linear_cross_entropy(*a), args)


def test_opcheck():
    for bias in (True, False):
        args = make_args(bias=bias)
        torch.library.opcheck(op.sliced_linear_cross_entropy_fwd, args)
        plain_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        _, lse = op.sliced_linear_cross_entropy_fwd(*plain_args)
        torch.library.opcheck(op.sliced_linear_cross_entropy_backward,
                              [torch.tensor(0.7)] + plain_args[:5] + [lse] + plain_args[5:])


def test_empty_and_all_ignored():
    for widths, targets in [([], []), ([5, 24, 17], [0, -1, -3])]:
        args = make_args(widths=widths, targets=targets)
        loss = op.sliced_linear_cross_entropy(*args)
        assert loss.item() == 0  # F.cross_entropy gives nan here
        loss.backward()
        assert args[0].grad.shape == (len(widths), 24) and args[0].grad.abs().sum() == 0
        assert args[2].grad.abs().sum() == 0 and args[3].grad.abs().sum() == 0


def test_deterministic_over_threads():
    # the merge order is the chunk order: the same bits on 1 or 2 threads
    args = make_args(widths=WIDTHS * 60, targets=TARGETS * 60, chunk=64)
    out = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        loss = op.sliced_linear_cross_entropy(*args)
        out.append([loss] + list(torch.autograd.grad(loss, [args[0], args[2], args[3]])))
    torch.set_num_threads(1)
    for a, b in zip(out[0], out[1]):
        assert torch.equal(a, b)
    for a, b in zip(out[0], out[2]):
        assert torch.equal(a, b)


def test_no_logit_tensor_is_kept():
    # 512 rows x 60000 items: the logits alone would take 123 MB
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(0)
    N, V, D = 512, 60000, 16
    h = rand(N, D, gen=g)
    w = rand(V, D, scale=0.25, gen=g)
    widths = torch.randint(1, D + 1, (N,), generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        op.sliced_linear_cross_entropy(h, widths, w, None, t, -100, 2048).backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    # grad_weight (3.8 MB) + the per-thread tiles (2 MB each) + small things
    assert peak < 16e6, f"peak {peak / 1e6:.1f} MB"


def test_functional_padded_positions():
    # every position of a padded batch: h [B, L, D], per-sample widths [B],
    # targets [B, L] with 0 = no label
    g = torch.Generator().manual_seed(3)
    B, L, D, V = 3, 5, 16, 300
    h = rand(B, L, D, gen=g)
    w = rand(V, D, scale=0.25, gen=g)
    widths = torch.tensor([16, 8, 12])
    t = torch.randint(1, V, (B, L), generator=g)
    t[1, 3:] = 0
    got = functional.sliced_linear_cross_entropy(h, widths, w, None, t, ignore_index=0)
    want = reference.sliced_linear_cross_entropy(
        h.reshape(-1, D), widths.repeat_interleave(L), w, None, t.reshape(-1), 0)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="widths must have shape"):
        functional.sliced_linear_cross_entropy(h, torch.tensor([8, 8]), w, None, t)


def test_kernel_ops_table():
    # KernelOps runs the same autograd over an explicit kernel table
    args = make_args()
    a = KernelOps(op).sliced_linear_cross_entropy(*args)
    ga = torch.autograd.grad(a, [args[0], args[2], args[3]])
    b = op.sliced_linear_cross_entropy(*args)
    gb = torch.autograd.grad(b, [args[0], args[2], args[3]])
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(1, torch.tensor([24, 5, 24, 17, 5, 24, 1, 17, 17, 25, 5])),
     r"widths\[9\] = 25 is outside \[1, 24\]"),
    (lambda a: a.__setitem__(1, torch.tensor([24, 5])), r"widths has 2 entries but h has 11"),
    (lambda a: a.__setitem__(1, a[1].float()), r"widths must be an int32 or int64"),
    (lambda a: a.__setitem__(4, torch.tensor(TARGETS[:-1] + [1000])),
     r"targets\[10\] = 1000 is outside \[0, 1000\)"),
    (lambda a: a.__setitem__(4, torch.tensor(TARGETS[:3])), r"targets has 3 entries"),
    (lambda a: a.__setitem__(2, a[2].detach().double()), r"weight has dtype"),
    (lambda a: a.__setitem__(3, a[3].detach()[:10]), r"bias must have shape \[1000\]"),
    (lambda a: a.__setitem__(0, a[0].detach()[None]), r"h must be rows"),
    (lambda a: a.__setitem__(6, 0), r"chunk_size must be >= 1"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_linear_cross_entropy(*args)
