import pytest
import torch

import canet_kernels  # noqa: F401  registers the ops
from canet_kernels import reference
from canet_kernels.functional import pack, sliced_attention, unpack
from helpers import (LENGTHS, WIDTHS_40, assert_matches_reference,
                     assert_zero_beyond, rand, routes)
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet
H = 4


def make_args(D=40, lengths=LENGTHS, widths=WIDTHS_40, causal=True, seed=0,
              int_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    cu, w = routes(lengths, widths, int_dtype)
    T = int(cu[-1])
    return [rand(T, D, gen=g), cu, w, rand(3, D, D, scale=D ** -0.5, gen=g),
            rand(3, D, scale=0.1, gen=g), rand(D, D, scale=D ** -0.5, gen=g),
            rand(D, scale=0.1, gen=g), H, causal]


NAMES = ["grad_x", "grad_w_qkv", "grad_b_qkv", "grad_w_o", "grad_b_o"]


# Runs of samples with equal width and length take the batched library path,
# scattered ones the per-(sample, head) kernel: both layouts are checked.
GROUPED = dict(lengths=[9, 9, 9, 9, 5, 5, 0, 3, 7], widths=[40, 40, 40, 40, 24, 24, 24, 8, 40])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["scattered", "grouped"])
def test_matches_reference(dtype, causal, layout):
    args = make_args(causal=causal, **(GROUPED if layout == "grouped" else {}))
    got = assert_matches_reference(op.sliced_attention, reference.sliced_attention,
                                   args, dtype, NAMES)
    cu, widths = args[1], args[2]
    assert_zero_beyond(got[0], cu, widths)
    assert_zero_beyond(got[1], cu, widths)


def test_saved_tensors_follow_contract():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    x, cu, widths, w_qkv, b_qkv = args[:5]
    out, qkv, ctx, lse = op.sliced_attention_fwd(*args)
    for b in range(len(widths)):
        s, e, w = int(cu[b]), int(cu[b + 1]), int(widths[b])
        for i in range(3):
            want = x[s:e, :w] @ w_qkv[i, :w, :w].T + b_qkv[i, :w]
            torch.testing.assert_close(qkv[s:e, i, :w], want)
        assert qkv[s:e, :, w:].abs().sum() == 0 and ctx[s:e, w:].abs().sum() == 0
    assert lse.shape == (x.shape[0], H) and torch.isfinite(lse).all()
    # lse[t, h]: natural log-sum-exp of token t's scaled causal scores in head h
    for b in range(len(widths)):
        s, e, w = int(cu[b]), int(cu[b + 1]), int(widths[b])
        if s == e:
            continue
        q, k = (qkv[s:e, i, :w].reshape(e - s, H, w // H).transpose(0, 1) for i in (0, 1))
        scores = q @ k.transpose(1, 2) * (w // H) ** -0.5
        causal = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)
        want = torch.logsumexp(scores.masked_fill(causal, float("-inf")), -1).T
        torch.testing.assert_close(lse[s:e], want)


def test_int32_routes():
    a64 = make_args()
    a32 = make_args(int_dtype=torch.int32)
    torch.testing.assert_close(op.sliced_attention(*a32), op.sliced_attention(*a64))


def test_single_token_attends_to_itself():
    # With one token, attention returns v: out = (x Wv^T + bv) Wo^T + bo.
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in make_args(lengths=[1], widths=[24])]
    x, _, _, w_qkv, b_qkv, w_o, b_o = args[:7]
    v = x[:, :24] @ w_qkv[2, :24, :24].T + b_qkv[2, :24]
    torch.testing.assert_close(op.sliced_attention(*args)[:, :24],
                               v @ w_o[:24, :24].T + b_o[:24])


def test_gradcheck_float64():
    args = make_args(D=8, lengths=[3, 1, 2], widths=[8, 4, 8])
    args = [a.detach().double().requires_grad_(a.requires_grad)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(lambda *a: op.sliced_attention(*a), args)


def test_opcheck():
    args = make_args(lengths=[5, 2, 0, 3], widths=[40, 8, 16, 24])
    torch.library.opcheck(op.sliced_attention_fwd, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, qkv, ctx, lse = op.sliced_attention_fwd(*plain)
    torch.library.opcheck(op.sliced_attention_backward,
                          [torch.randn_like(out), plain[0], plain[1], plain[2],
                           plain[3], plain[5], qkv, ctx, lse, H, True])


def test_empty_batch_and_zero_length_samples():
    for lengths, widths in [([], []), ([0, 0], [8, 40])]:
        args = make_args(lengths=lengths, widths=widths)
        y = op.sliced_attention(*args)
        assert y.shape == (0, 40)
        y.sum().backward()
        assert torch.isfinite(args[3].grad).all() and args[3].grad.abs().sum() == 0


def test_padded_batch_matches_packed():
    args = make_args()
    x, cu, widths = args[0].detach(), args[1], args[2]
    lengths = cu[1:] - cu[:-1]
    L = int(lengths.max())
    for left in (False, True):
        padded = unpack(x, lengths, L, left_padded=left)
        padded[padded == 0] = 7.0  # garbage in padding must not leak
        got = sliced_attention(padded, lengths, widths, *args[3:], left_padded=left)
        want = unpack(op.sliced_attention(x, cu, widths, *args[3:]), lengths, L, left)
        torch.testing.assert_close(got, want)
        repacked, _ = pack(got, lengths, left)
        torch.testing.assert_close(repacked, op.sliced_attention(x, cu, widths, *args[3:]))


# One width run mixing library groups and scattered samples between them.
MIXED_RUN = dict(lengths=[6, 6, 1, 4, 4, 4, 7, 0, 5, 5], widths=[40] * 10)


@pytest.mark.parametrize("layout", [GROUPED, MIXED_RUN, {}])
def test_inference_skips_the_saved_activations(layout):
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in make_args(**layout)]
    out, qkv, ctx, lse = op.sliced_attention_fwd(*args, save_activations=False)
    assert qkv.shape == (0, 3, 40) and ctx.shape == (0, 40) and lse.shape == (0, H)
    torch.testing.assert_close(out, op.sliced_attention_fwd(*args)[0])
    torch.testing.assert_close(out, reference.sliced_attention(*args))
    torch.library.opcheck(op.sliced_attention_fwd, args + [False])
    with torch.no_grad():  # the public op takes the inference path here
        torch.testing.assert_close(op.sliced_attention(*args), out)


@pytest.mark.parametrize("core", ["auto", "own", "flash"])
def test_inference_chunks_many_groups_over_threads(core, monkeypatch):
    # Enough equal-shape samples for several chunks per group, spread over
    # two threads, with a scattered sample between the groups of one width;
    # the chunks' attention core chosen by thread count, or forced.
    if core != "auto":
        monkeypatch.setenv("CANET_CPU_FUSED_CORE", core)
    lengths = [50] * 20 + [3] + [50] * 9 + [33] * 12 + [7] * 30
    widths = [40] * 30 + [24] * 12 + [8] * 30
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in make_args(lengths=lengths, widths=widths)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = op.sliced_attention_fwd(*args, save_activations=False)[0]
            torch.testing.assert_close(out, reference.sliced_attention(*args))
            torch.testing.assert_close(out, op.sliced_attention_fwd(*args)[0])
            assert_zero_beyond(out, args[1], args[2])
            with torch.inference_mode():  # thread-local state reaches the pool threads
                torch.testing.assert_close(op.sliced_attention(*args), out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("core", ["own", "flash"])
@pytest.mark.parametrize("layout", [GROUPED, MIXED_RUN])
def test_inference_bf16_within_the_16_bit_rule(layout, core, monkeypatch):
    monkeypatch.setenv("CANET_CPU_FUSED_CORE", core)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args(**layout)]

    def cast(dt):
        return [a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]

    want = reference.sliced_attention(*cast(torch.float64))
    got = op.sliced_attention_fwd(*cast(torch.bfloat16), save_activations=False)[0]
    low = reference.sliced_attention(*cast(torch.bfloat16))
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * (low.double() - want).abs().max().item() + 1e-2


def test_depth_prefix_is_a_view():
    # A batch sorted by depth runs layer l on a prefix: views, no copy.
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make_args()]
    x, cu, widths = args[:3]
    b = 4
    t = int(cu[b])
    xp, cup, wp = x[:t], cu[:b + 1], widths[:b]
    assert xp.data_ptr() == x.data_ptr() and xp.is_contiguous()
    full = op.sliced_attention(x, cu, widths, *args[3:])
    torch.testing.assert_close(op.sliced_attention(xp, cup, wp, *args[3:]), full[:t])


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(2, torch.tensor([40, 24, 8, 48, 16, 24])), r"widths\[3\] = 48 is outside"),
    (lambda a: a.__setitem__(2, torch.tensor([40, 24, 8, 40, 18, 24])), r"widths\[4\] = 18 is not divisible by num_heads"),
    (lambda a: a.__setitem__(2, torch.tensor([40, -8, 8, 40, 16, 24])), r"widths\[1\] = -8"),
    (lambda a: a.__setitem__(2, torch.tensor([40, 24, 8])), r"widths has 3 entries"),
    (lambda a: a.__setitem__(2, torch.tensor([40., 24, 8, 40, 16, 24])), r"widths must be an int32 or int64"),
    (lambda a: a.__setitem__(1, torch.tensor([0, 7, 8, 8, 5, 118, 125])), r"cu_seqlens must be non-decreasing"),
    (lambda a: a.__setitem__(1, torch.tensor([0, 7, 8, 8, 105, 118, 124])), r"cu_seqlens ends at 124"),
    (lambda a: a.__setitem__(3, a[3].detach().double()), r"w_qkv has dtype Double"),
    (lambda a: a.__setitem__(5, a[5].detach()[:, :8]), r"w_o must have shape"),
    (lambda a: a.__setitem__(7, 0), r"num_heads must be >= 1"),
])
def test_bad_input_names_the_argument(change, match):
    args = make_args()
    change(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op.sliced_attention(*args)
