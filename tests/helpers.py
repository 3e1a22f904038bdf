"""Shared pieces of the op tests: batches of mixed routes, tolerances, and
the comparison of a backend against the plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

# Odd sizes on purpose: 1, 7, 97 tokens, a zero-length sample, widths that
# are not multiples of 16 (40 with 4 heads -> head dim 10).
LENGTHS = [7, 1, 0, 97, 13, 7]
WIDTHS_40 = [40, 24, 8, 40, 16, 24]


def routes(lengths=LENGTHS, widths=WIDTHS_40, int_dtype=torch.int64):
    lengths = torch.tensor(lengths, dtype=int_dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=int_dtype)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu, torch.tensor(widths, dtype=int_dtype)


def rand(*shape, dtype=torch.float32, scale=1.0, grad=True, gen=None):
    t = (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)
    return t.requires_grad_(grad)


def detached(args, dtype):
    """Fresh leaf copies of the floating args in `dtype` (others unchanged)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.append(a.detach().to(dtype).requires_grad_(a.requires_grad))
        else:
            out.append(a)
    return out


def run(fn, args, grad_out):
    y = fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype), allow_unused=True)
    return [y.detach()] + [g for g in grads]


def max_err(a, b):
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(fn, ref, args, dtype, names, seed=0):
    """Forward output and every gradient of `fn` against `ref`.

    fp32/fp64: tight absolute/relative tolerance against the reference run in
    float64. 16-bit: the kernel's error against the float64 reference is at
    most 2x the error of the reference run in the same 16-bit dtype (plus a
    small floor), the rule FlashAttention's tests use.
    """
    gen = torch.Generator().manual_seed(seed)
    hi = detached(args, torch.float64)
    y_hi = ref(*hi)
    grad_out = torch.randn(y_hi.shape, dtype=torch.float64, generator=gen)
    want = run(ref, hi, grad_out)
    got = run(fn, detached(args, dtype), grad_out)
    if dtype in (torch.float16, torch.bfloat16):
        low = run(ref, detached(args, dtype), grad_out)
        tols = [2 * max_err(lo, w) + 1e-2 for lo, w in zip(low, want)]
    else:
        rtol = 1e-10 if dtype == torch.float64 else 2e-5
        tols = [rtol * (1 + w.double().abs().max().item()) * 10 for w in want]
    bad = []
    for name, g, w, tol in zip(["out"] + names, got, want, tols):
        err = max_err(g, w)
        if not err <= tol:
            bad.append(f"{name}: max error {err:.3g} > tolerance {tol:.3g}")
    assert not bad, f"{dtype}: " + "; ".join(bad)
    return got


def assert_zero_beyond(t, cu, widths):
    for b in range(len(widths)):
        s, e, w = int(cu[b]), int(cu[b + 1]), int(widths[b])
        tail = t[s:e, w:]
        assert tail.abs().max().item() == 0 if tail.numel() else True, \
            f"sample {b}: nonzero beyond width {w}"


# Use in a test module with `from helpers import one_thread` (autouse).
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared
    2-core machine intra-op threads waiting on each other make these tests
    many times slower; the setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def report_on_valid(monkeypatch, split, key, values):
    """Makes training's validation report `key` as the next of `values` at
    each evaluation (everything else as computed), to steer model selection."""
    from canet_kernels import train
    real, values = train.evaluate, iter(values)

    def fake(model, es, *a, **kw):
        res = real(model, es, *a, **kw)
        if es is split.valid:
            res[key] = next(values)
        return res

    monkeypatch.setattr(train, "evaluate", fake)


def run_threads(n, fn):
    """Runs fn(i) on n threads at once; returns the exceptions they raised."""
    import threading
    errors = []

    def wrap(i):
        try:
            fn(i)
        except Exception as exc:  # noqa: BLE001  returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def exclusion(N, V, seed=1):
    """[N, 6] ids padded with -1; column 0 excludes the padding item 0."""
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(0, V, (N, 6), generator=g)
    ex[:, 0] = 0
    ex[::2, 4:] = -1
    return ex
