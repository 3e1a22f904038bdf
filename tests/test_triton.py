"""The Triton kernels against the plain-PyTorch reference, forward and
backward, run on the CPU by Triton's interpreter (small shapes: it is slow).

Batches mix routes on purpose: 1, 7, 13, 37 tokens, an empty sample, widths that
are not multiples of 16 (head dims 10, 6, 14 next to 8, 16), runs of equal
widths longer than one row tile, and NaN garbage beyond each sample's width
in the inputs and in grad_out, which every kernel must ignore.
"""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

# Triton builds its own helpers (tl.cdiv, reductions) for the interpreter or
# for the compiler when it is first imported, so one process cannot run both:
# the interpreter takes this module only where no GPU runs Triton compiled.
if torch.cuda.is_available():
    pytest.skip("CUDA is available: tests/test_triton_gpu.py runs the kernels compiled",
                allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this "
                "file in its own process", allow_module_level=True)
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

pytest.importorskip("triton")

import canet_kernels.triton as kt  # noqa: E402
from canet_kernels import reference  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (autouse fixture)

assert kt.INTERPRETED
# the kernels are built; other modules of the session see the caller's setting
if _PREV_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # parts of triton imported lazily at run time check the setting again
    monkeypatch.setenv("TRITON_INTERPRET", "1")


D, H, R = 64, 4, 4
LENGTHS = [13, 20, 1, 0, 9, 7, 37]
WIDTHS = [40, 40, 40, 24, 56, 32, 64]   # head dims 10, 10, 10, 6, 14, 8, 16


def routes(lengths=LENGTHS, widths=WIDTHS, int_dtype=torch.int64):
    lengths = torch.tensor(lengths, dtype=int_dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=int_dtype)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu, torch.tensor(widths, dtype=int_dtype)


def rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def garbage(t, cu, widths, value=float("nan")):
    """t with `value` beyond each sample's width (the kernels must not read it)."""
    t = t.clone()
    for b in range(len(widths)):
        t[int(cu[b]):int(cu[b + 1]), int(widths[b]):] = value
    return t


def tol(dtype):
    return dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)


def close(name, got, want, dtype, **kw):
    opts = tol(dtype) | kw
    try:
        torch.testing.assert_close(got, want.to(got.dtype), **opts)
    except AssertionError as e:
        err = (got.double() - want.double()).abs().max().item()
        raise AssertionError(f"{name} ({dtype}): max error {err:.3g}\n{e}") from None


def ref_grads(fn, inputs, grad_out):
    """Reference output and gradients w.r.t. `inputs` (a list of tensors)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, grad_out)


# ------------------------------------------------------------------ tiles --

@pytest.mark.parametrize("per_sample", [False, True])
def test_tiles_cover_rows_once_within_one_route(per_sample):
    cu, widths = routes(int_dtype=torch.int32)
    T = int(cu[-1])
    (tiles,) = kt._tiles.build_tiles(cu, widths, widths, T, [(4, per_sample)])
    nt = tiles.nt
    assert nt == math.ceil(T / 4) + len(LENGTHS)
    data = tiles.data[:6 * nt].view(6, nt).tolist()
    count = int(tiles.data[6 * nt])
    owner = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    seen = torch.zeros(T, dtype=torch.int64)
    for i in range(nt):
        r0, r1, s0, s1, wi, wo = (data[k][i] for k in range(6))
        if i >= count:
            assert r0 == r1, "slots past the count must be empty"
            continue
        assert 0 < r1 - r0 <= 4 and s0 <= r0 and r1 <= s1
        samples = owner[r0:r1].unique().tolist()
        assert all(WIDTHS[b] == wi == wo for b in samples), "a tile crosses a width"
        if per_sample:
            assert len(samples) == 1 and (s0, s1) == (int(cu[samples[0]]), int(cu[samples[0] + 1]))
        seen[r0:r1] += 1
    assert seen.eq(1).all()


# ----------------------------------------------------------------- linear --

@pytest.mark.parametrize("dtype, has_bias", [(torch.float32, True), (torch.float32, False),
                                             (torch.float64, True)])
def test_linear(dtype, has_bias):
    cu, iw = routes(widths=[40, 40, 40, 24, 48, 32, 16], int_dtype=torch.int32)
    ow = torch.tensor([24, 24, 24, 8, 40, 56, 16], dtype=torch.int64)
    T, O, I = int(cu[-1]), 56, 48
    x = garbage(rand(T, I + 8, dtype=dtype, seed=1), cu, iw)
    w = rand(O, I, dtype=dtype, scale=I ** -0.5, seed=2)
    b = rand(O, dtype=dtype, seed=3) if has_bias else None
    dy = garbage(rand(T, O, dtype=dtype, seed=4), cu, ow)
    clean_x = torch.nan_to_num(x, nan=0.0)
    fn = (lambda x_, w_, b_: reference.sliced_linear(x_, cu, iw, ow, w_, b_)) if has_bias \
        else (lambda x_, w_: reference.sliced_linear(x_, cu, iw, ow, w_))
    inputs = [clean_x, w] + ([b] if has_bias else [])
    want, grads = ref_grads(fn, inputs, torch.nan_to_num(dy, nan=0.0))
    close("out", kt.sliced_linear(x, cu, iw, ow, w, b), want, dtype)
    gx, gw, gb = kt.sliced_linear_backward(dy, x, cu, iw, ow, w, has_bias)
    close("grad_x", gx, grads[0], dtype)
    close("grad_weight", gw, grads[1], dtype)
    if has_bias:
        close("grad_bias", gb, grads[2], dtype)
    else:
        assert gb.shape == (0,)


# -------------------------------------------------------------------- ffn --

def check_ffn(cu, widths, d, dtype):
    """FFN launchers at model width d, forward and every gradient, against the
    reference; returns the inputs, the reference output and the saved hidden."""
    T = int(cu[-1])
    x = garbage(rand(T, d, dtype=dtype, seed=1), cu, widths)
    w1 = rand(R * d, d, dtype=dtype, scale=d ** -0.5, seed=2)
    b1 = rand(R * d, dtype=dtype, scale=0.1, seed=3)
    w2 = rand(d, R * d, dtype=dtype, scale=(R * d) ** -0.5, seed=4)
    b2 = rand(d, dtype=dtype, scale=0.1, seed=5)
    dy = garbage(rand(T, d, dtype=dtype, seed=6), cu, widths)
    want, grads = ref_grads(lambda *a: reference.sliced_ffn(a[0], cu, widths, *a[1:], R),
                            [torch.nan_to_num(x), w1, b1, w2, b2], torch.nan_to_num(dy))
    out, hidden = kt.sliced_ffn_fwd(x, cu, widths, w1, b1, w2, b2, R)
    close("out", out, want, dtype)
    got = kt.sliced_ffn_backward(dy, x, cu, widths, w1, w2, hidden, R)
    for name, g, w in zip(["grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], got, grads):
        close(name, g, w, dtype)
    return (x, w1, b1, w2, b2), want, hidden


@pytest.mark.parametrize("dtype,xres", [(torch.float32, False), (torch.float64, False),
                                        (torch.float32, True)],
                         ids=["fp32", "fp64", "fp32-x-resident"])
def test_ffn(dtype, xres, monkeypatch):
    # xres: the forward variant that holds x for every chunk (a GPU tile choice)
    from canet_kernels.triton import _common
    monkeypatch.setattr(_common, "INTERPRETER_FFN_XRES", xres)
    cu, widths = routes()
    (x, w1, b1, w2, b2), want, hidden = check_ffn(cu, widths, D, dtype)
    want_h = torch.zeros(int(cu[-1]), R * D, dtype=dtype)
    for b in range(len(LENGTHS)):
        s, e, w = int(cu[b]), int(cu[b + 1]), WIDTHS[b]
        want_h[s:e, :R * w] = x[s:e, :w] @ w1[:R * w, :w].T + b1[:R * w]
    close("hidden", hidden, want_h, dtype)
    # inference: same output, nothing saved
    out2, hidden2 = kt.sliced_ffn_fwd(x, cu, widths, w1, b1, w2, b2, R, save_hidden=False)
    assert hidden2.shape == (0, R * D)
    close("out without saving", out2, want, dtype)


# -------------------------------------------------------------- layernorm --

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_layernorm(dtype):
    cu, widths = routes(int_dtype=torch.int32)
    T = int(cu[-1])
    x = garbage(rand(T, D, dtype=dtype, seed=1), cu, widths)
    res = garbage(rand(T, D, dtype=dtype, seed=2), cu, widths, value=float("inf"))
    weight = 1 + rand(D, dtype=dtype, scale=0.2, seed=3)
    bias = rand(D, dtype=dtype, scale=0.2, seed=4)
    dy = garbage(rand(T, D, dtype=dtype, seed=5), cu, widths)
    # the reference normalises in the input's own precision (float32 only for
    # 16-bit inputs), so fp64 holds to fp64 rounding: the largest error
    # measured is 5e-15 (weight/bias gradients of size up to 29); 1e-12
    # leaves ~200x
    opts = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else {}
    want, grads = ref_grads(
        lambda a, r, w_, b_: reference.sliced_add_layernorm(a, r, cu, widths, w_, b_),
        [torch.nan_to_num(x), torch.nan_to_num(res, posinf=0.0), weight, bias],
        torch.nan_to_num(dy))
    out, mean, rstd = kt.sliced_add_layernorm_fwd(x, res, cu, widths, weight, bias, 1e-5)
    close("out", out, want, dtype, **opts)
    assert mean.dtype == rstd.dtype == dtype and mean.shape == (T,)
    for b in range(len(LENGTHS)):
        s, e, w = int(cu[b]), int(cu[b + 1]), WIDTHS[b]
        if s == e:
            continue
        h = x[s:e, :w] + res[s:e, :w]
        close("mean", mean[s:e], h.mean(1), dtype, **opts)
        close("rstd", rstd[s:e], (h.var(1, unbiased=False) + 1e-5).rsqrt(), dtype, **opts)
    gin, gw, gb = kt.sliced_add_layernorm_backward(dy, x, res, cu, widths, weight, mean, rstd)
    close("grad_input (x)", gin, grads[0], dtype, **opts)
    close("grad_input (residual)", gin, grads[1], dtype, **opts)
    close("grad_weight", gw, grads[2], dtype, **opts)
    close("grad_bias", gb, grads[3], dtype, **opts)


# -------------------------------------------------------------- attention --

def ref_lse(qkv, cu, widths, causal):
    lse = torch.zeros(qkv.shape[0], H, dtype=qkv.dtype)
    for b in range(len(widths)):
        s, e, w = int(cu[b]), int(cu[b + 1]), int(widths[b])
        if s == e:
            continue
        hd = w // H
        q, k = (qkv[s:e, i, :w].reshape(e - s, H, hd).transpose(0, 1) for i in (0, 1))
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)
        if causal:
            mask = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        lse[s:e] = torch.logsumexp(scores, -1).T
    return lse


@pytest.mark.parametrize("dtype, causal", [(torch.float32, True), (torch.float32, False),
                                           (torch.float64, True)])
def test_attention(dtype, causal):
    cu, widths = routes()
    T = int(cu[-1])
    x = garbage(rand(T, D, dtype=dtype, seed=1), cu, widths)
    w_qkv = rand(3, D, D, dtype=dtype, scale=D ** -0.5, seed=2)
    b_qkv = rand(3, D, dtype=dtype, scale=0.1, seed=3)
    w_o = rand(D, D, dtype=dtype, scale=D ** -0.5, seed=4)
    b_o = rand(D, dtype=dtype, scale=0.1, seed=5)
    dy = garbage(rand(T, D, dtype=dtype, seed=6), cu, widths)
    want, grads = ref_grads(
        lambda a, wq, bq, wo, bo: reference.sliced_attention(a, cu, widths, wq, bq, wo, bo, H,
                                                             causal),
        [torch.nan_to_num(x), w_qkv, b_qkv, w_o, b_o], torch.nan_to_num(dy))
    out, qkv, ctx, lse = kt.sliced_attention_fwd(x, cu, widths, w_qkv, b_qkv, w_o, b_o, H,
                                                 causal)
    close("out", out, want, dtype)
    want_qkv = torch.zeros(T, 3, D, dtype=dtype)
    want_ctx = torch.zeros(T, D, dtype=dtype)
    for b in range(len(LENGTHS)):
        s, e, w = int(cu[b]), int(cu[b + 1]), WIDTHS[b]
        for i in range(3):
            want_qkv[s:e, i, :w] = x[s:e, :w] @ w_qkv[i, :w, :w].T + b_qkv[i, :w]
        if s < e:
            want_ctx[s:e, :w] = reference.attention_core(*want_qkv[s:e, :, :w].unbind(1), H,
                                                         causal)
    close("qkv", qkv, want_qkv, dtype)
    close("ctx", ctx, want_ctx, dtype)
    assert lse.dtype == dtype
    if causal and dtype == torch.float32:  # inference: nothing saved, same output
        inf = kt.sliced_attention_fwd(x, cu, widths, w_qkv, b_qkv, w_o, b_o, H, causal,
                                      save_activations=False)
        assert [t.shape[0] for t in inf[1:]] == [0, 0, 0]
        torch.testing.assert_close(inf[0], out)
    close("lse", lse, ref_lse(want_qkv, cu, widths, causal), dtype)
    got = kt.sliced_attention_backward(dy, x, cu, widths, w_qkv, w_o, qkv, ctx, lse, H, causal)
    names = ["grad_x", "grad_w_qkv", "grad_b_qkv", "grad_w_o", "grad_b_o"]
    for name, g, w in zip(names, got, grads):
        close(name, g, w, dtype)


# ------------------------------------------------------------ edge cases --

def test_empty_batch():
    cu, widths = routes([0, 0], [8, 40])
    x = torch.zeros(0, D)
    w = torch.randn(D, D)
    assert kt.sliced_linear(x, cu, widths, widths, w, None).shape == (0, D)
    gx, gw, gb = kt.sliced_linear_backward(x, x, cu, widths, widths, w, True)
    assert gx.shape == (0, D) and gw.abs().sum() == 0 and gb.shape == (D,)
    out, qkv, ctx, lse = kt.sliced_attention_fwd(x, cu, widths, torch.randn(3, D, D),
                                                 torch.randn(3, D), w, torch.randn(D), H)
    assert qkv.shape == (0, 3, D) and lse.shape == (0, H)
    out, hidden = kt.sliced_ffn_fwd(x, cu, widths, torch.randn(R * D, D), torch.randn(R * D),
                                    torch.randn(D, R * D), torch.randn(D), R)
    assert hidden.shape == (0, R * D)
    out, mean, _ = kt.sliced_add_layernorm_fwd(x, x, cu, widths, torch.ones(D), torch.zeros(D))
    assert out.shape == (0, D) and mean.shape == (0,)


def test_prefix_views_of_a_route_plan():
    # layer l of a depth-sorted batch runs on views x[:T_l], cu[:B_l + 1]
    cu, widths = routes()
    x = rand(int(cu[-1]), D, dtype=torch.float32)
    ln_w, ln_b = torch.ones(D), torch.zeros(D)
    full = kt.sliced_add_layernorm_fwd(x, x, cu, widths, ln_w, ln_b)[0]
    b = 3
    t = int(cu[b])
    part = kt.sliced_add_layernorm_fwd(x[:t], x[:t], cu[:b + 1], widths[:b], ln_w, ln_b)[0]
    torch.testing.assert_close(part, full[:t])


def _two_layer_stack(cu, widths, b1, layers):
    """Layer 0 on every sample, layer 1 on the first b1 (prefix views), as
    routing.run_layers runs them, through the Triton launchers."""
    from canet_kernels import functional as CF
    from canet_kernels.ops import KernelOps
    ops = KernelOps(kt.KERNELS)
    x = rand(int(cu[-1]), D, dtype=torch.float32, seed=3)

    def layer(p, h, c, w):
        return CF.routed_layer(h, c, w, p, H, R, 1e-5, ops=ops)
    h = layer(layers[0], x, cu, widths)
    t = int(cu[b1])
    return torch.cat([layer(layers[1], h[:t], cu[:b1 + 1], widths[:b1]), h[t:]])


def test_shared_plans_build_each_layout_once(monkeypatch):
    cu, widths = routes()
    g = torch.Generator().manual_seed(0)
    r = lambda *s, sc=0.1: torch.randn(*s, generator=g) * sc  # noqa: E731
    layers = [dict(w_qkv=r(3, D, D), b_qkv=r(3, D), w_o=r(D, D), b_o=r(D),
                   ln1_w=1 + r(D), ln1_b=r(D), w1=r(R * D, D), b1=r(R * D),
                   w2=r(D, R * D), b2=r(D), ln2_w=1 + r(D), ln2_b=r(D)) for _ in range(3)]
    builds = []
    real = kt._tiles._build
    monkeypatch.setattr(kt._tiles, "_build",
                        lambda *a: builds.append(len(a[-1])) or real(*a))
    want = _two_layer_stack(cu, widths, 4, layers)
    alone = len(builds)
    builds.clear()
    with kt.shared_plans():
        got = _two_layer_stack(cu, widths, 4, layers)
        shared = len(builds)
        # layers on the same samples as layer 0 (the full views) build nothing new
        _two_layer_stack(cu, widths, len(LENGTHS), layers[1:])
        assert len(builds) == shared
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert alone == 8 and shared < alone, (alone, shared)
    # other routes in the same scope (another widths tensor) get their own plans
    builds.clear()
    with kt.shared_plans():
        _two_layer_stack(cu, widths, 4, layers)
        other = torch.tensor(list(reversed(WIDTHS)), dtype=widths.dtype)
        got = _two_layer_stack(cu, other, 4, layers)
    torch.testing.assert_close(got, _two_layer_stack(cu, other, 4, layers), atol=0, rtol=0)
    # outside any scope nothing is kept
    assert not kt._tiles._SCOPES


def test_shared_plans_reach_the_backward(monkeypatch):
    # forward and backward in one scope: the backward kernels reuse the
    # forward's plans, and the gradients are the same bits
    cu, widths = routes()
    g = torch.Generator().manual_seed(1)
    r = lambda *s, sc=0.1: (torch.randn(*s, generator=g) * sc).requires_grad_()  # noqa: E731
    layers = [dict(w_qkv=r(3, D, D), b_qkv=r(3, D), w_o=r(D, D), b_o=r(D),
                   ln1_w=r(D), ln1_b=r(D), w1=r(R * D, D), b1=r(R * D),
                   w2=r(D, R * D), b2=r(D), ln2_w=r(D), ln2_b=r(D)) for _ in range(2)]
    params = [p for layer in layers for p in layer.values()]
    builds = []
    real = kt._tiles._build
    monkeypatch.setattr(kt._tiles, "_build",
                        lambda *a: builds.append(len(a[-1])) or real(*a))

    def grads():
        out = _two_layer_stack(cu, widths, 4, layers)
        return torch.autograd.grad(out.square().sum(), params)
    want = grads()
    alone = len(builds)
    builds.clear()
    with kt.shared_plans():
        got = grads()
    assert len(builds) < alone / 2, (len(builds), alone)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(2, a[2].float()), r"widths must be an int32 or int64"),
    (lambda a: a.__setitem__(2, a[2][:3]), r"widths must be shape \[7\]"),
    (lambda a: a.__setitem__(3, a[3].double()), r"w1 has dtype torch.float64"),
    (lambda a: a.__setitem__(5, a[5][:, :8]), r"w2 must have shape \[64, 256\]"),
    (lambda a: a.__setitem__(0, a[0][None]), r"x must be packed tokens"),
    (lambda a: a.__setitem__(7, 0), r"ratio must be >= 1"),
])
def test_bad_input_names_the_argument(change, match):
    cu, widths = routes()
    T = int(cu[-1])
    args = [torch.randn(T, D), cu, widths, torch.randn(R * D, D), torch.randn(R * D),
            torch.randn(D, R * D), torch.randn(D), R]
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        kt.sliced_ffn_fwd(*args)


def test_register_serves_every_op_for_cuda():
    served = kt.register()
    for name in kt.KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"canet::{name}", "CUDA"), name
    assert set(served) <= set(kt.KERNELS)


def test_kernels_compile_for_h100():
    # the interpreter does not compile: build every bf16 variant for sm_90
    import importlib.util
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "canet_kernels.triton._aot_check",
                           "--dtypes", "bf16"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout


def test_benchmark_smoke(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "triton.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_triton.py"),
                           "--smoke", "--json", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.exists()


def test_tune_smoke(tmp_path):
    # the tile-shape sweep's code path, under the interpreter (tiny shapes)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    out, best = tmp_path / "tune.json", tmp_path / "blocks.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "tune_triton.py"),
                           "--smoke", "--json", str(out), "--write-blocks", str(best)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import json
    assert set(json.loads(best.read_text())) == {"ffn/full", "mm/full", "attn/full", "dw/full"}


def test_gpu_tile_shapes(monkeypatch):
    # The GPU tile table (bf16 entries: x-resident 128-row FFN tiles, 128-wide
    # GEMM columns, ...) run by the interpreter in fp32: tile-size-dependent
    # paths (narrow-tile half accumulators, masks at real block sizes) checked
    # against the reference, forward and FFN backward.
    from canet_kernels.triton import _common
    monkeypatch.setattr(_common, "small_blocks", lambda t: False)
    for kind in ("ffn", "mm", "attn", "dw"):
        monkeypatch.setitem(_common.BLOCKS, (kind, "full"), _common.BLOCKS[(kind, "half")])
    D, f32 = 128, torch.float32
    cu, widths = routes([130, 1, 0, 77, 13], [64, 64, 40, 96, 128])
    (x, *_), _, _ = check_ffn(cu, widths, D, f32)
    wq = rand(3, D, D, dtype=f32, scale=D ** -0.5, seed=7)
    bq = rand(3, D, dtype=f32, scale=0.1, seed=8)
    wo = rand(D, D, dtype=f32, scale=D ** -0.5, seed=9)
    bo = rand(D, dtype=f32, scale=0.1, seed=10)
    out = kt.sliced_attention_fwd(x, cu, widths, wq, bq, wo, bo, H, True, False)[0]
    want = reference.sliced_attention(torch.nan_to_num(x), cu, widths, wq, bq, wo, bo, H, True)
    close("attention", out, want, f32)


# --------------------------------------------------------- routed scoring --
# Rows at their own widths (unsorted, NaN beyond each width) against an item
# table whose length is not a multiple of the tiles (32 items) or of the
# item ranges the programs split it into.

SCORE_WIDTHS = [24, 5, 24, 17, 5, 24, 1, 17, 17, 24, 5, 9, 24, 3, 17, 20, 11]
SCORE_TARGETS = [3, 0, 196, -1, 41, 7, 199, 0, 12, -7, 150, 88, 1, 64, 2, 33, 100]


def scoring_args(dtype, V=203, D=24, bias=True, widths=SCORE_WIDTHS, targets=SCORE_TARGETS):
    w = torch.tensor(widths, dtype=torch.int64)
    h = rand(len(widths), D, dtype=dtype, seed=1)
    for i, wi in enumerate(widths):
        h[i, wi:] = float("nan")
    table = rand(V, D + 3, dtype=dtype, scale=D ** -0.5, seed=2)
    b = rand(V, dtype=dtype, scale=0.5, seed=3) if bias else None
    return h, w, table, b, torch.tensor(targets, dtype=torch.int64)


@pytest.mark.parametrize("dtype, has_bias", [(torch.float32, True), (torch.float32, False),
                                             (torch.float64, True)])
def test_linear_cross_entropy(dtype, has_bias):
    h, widths, table, b, t = scoring_args(dtype, bias=has_bias)
    clean = torch.nan_to_num(h, nan=0.0)
    fn = (lambda h_, w_, b_: reference.sliced_linear_cross_entropy(h_, widths, w_, b_, t, 0)) \
        if has_bias else (lambda h_, w_: reference.sliced_linear_cross_entropy(h_, widths, w_,
                                                                               None, t, 0))
    want, grads = ref_grads(fn, [clean, table] + ([b] if has_bias else []),
                            torch.tensor(0.75, dtype=dtype))
    loss, lse = kt.sliced_linear_cross_entropy_fwd(h, widths, table, b, t, 0)
    close("loss", loss, want, dtype)
    close("lse", lse, reference.sliced_linear_cross_entropy_lse(clean, widths, table, b, t, 0),
          dtype)
    gh, gw, gb = kt.sliced_linear_cross_entropy_backward(torch.tensor(0.75, dtype=dtype), h,
                                                         widths, table, b, t, lse, 0, 4096)
    close("grad_h", gh, grads[0], dtype)
    close("grad_weight", gw, grads[1], dtype)
    if has_bias:
        close("grad_bias", gb, grads[2], dtype)
    else:
        assert gb.shape == (0,)


def test_linear_cross_entropy_through_kernel_ops():
    # the ops' own autograd over the Triton kernel table
    from canet_kernels.ops import KernelOps
    h, widths, table, b, t = scoring_args(torch.float64)
    h = torch.nan_to_num(h, nan=0.0)
    leaves = [x.clone().requires_grad_() for x in (h, table, b)]
    loss = KernelOps(kt.KERNELS).sliced_linear_cross_entropy(leaves[0], widths, leaves[1],
                                                             leaves[2], t, 0)
    got = torch.autograd.grad(loss, leaves)
    want, grads = ref_grads(lambda *a: reference.sliced_linear_cross_entropy(
        a[0], widths, a[1], a[2], t, 0), [h, table, b], torch.tensor(1.0, dtype=torch.float64))
    close("loss", loss.detach(), want, torch.float64)
    for name, g, w in zip(["grad_h", "grad_weight", "grad_bias"], got, grads):
        close(name, g, w, torch.float64)


def test_linear_cross_entropy_empty_and_all_ignored():
    for widths, targets in [([], []), ([5, 24, 17], [0, -1, -3])]:
        h, w, table, b, t = scoring_args(torch.float32, widths=widths, targets=targets)
        loss, lse = kt.sliced_linear_cross_entropy_fwd(h, w, table, b, t, 0)
        assert loss.item() == 0 and lse.shape == (len(widths),)
        gh, gw, gb = kt.sliced_linear_cross_entropy_backward(torch.tensor(1.0), h, w, table, b,
                                                             t, lse, 0, 4096)
        assert gh.abs().sum() == 0 and gw.abs().sum() == 0 and gb.abs().sum() == 0


@pytest.mark.parametrize("k, shared", [(1, False), (10, False), (10, True), (203, False)])
def test_linear_topk(k, shared):
    h, widths, table, b, _ = scoring_args(torch.float64)
    g = torch.Generator().manual_seed(5)
    ex = torch.randint(0, 203, (len(SCORE_WIDTHS), 4), generator=g)
    ex[:, 0] = 0       # the padding item
    ex[::3, 2:] = -1   # padding of the id lists
    if shared:
        ex = ex[:1]
    v, i = kt.sliced_linear_topk(h, widths, table, b, k, 4096, ex)
    rv, ri = reference.sliced_linear_topk(torch.nan_to_num(h, nan=0.0), widths, table, b, k,
                                          None, ex)
    close("values", v, rv, torch.float64)
    assert torch.equal(i, ri)


def test_linear_topk_ties_lower_index_first():
    # equal item rows score alike: every backend lists the lower id first
    h, widths, table, _, _ = scoring_args(torch.float32, bias=False)
    for dup in (70, 150, 40):
        table[dup] = table[3]
    v, i = kt.sliced_linear_topk(h, widths, table, None, 12, 4096, None)
    want_v, want_i = reference.sliced_linear_topk(torch.nan_to_num(h, nan=0.0), widths, table,
                                                  None, 12, None, None)
    assert torch.equal(i, want_i)
    close("values", v, want_v, torch.float32)
    assert i.shape == (len(SCORE_WIDTHS), 12)
    cpu_v, cpu_i = torch.ops.canet.sliced_linear_topk(torch.nan_to_num(h, nan=0.0), widths,
                                                      table, None, 12, 64, None)
    assert torch.equal(cpu_i, i)


def test_scoring_bad_input_names_the_argument():
    h, widths, table, b, t = scoring_args(torch.float32)
    with pytest.raises(ValueError, match=r"widths must have shape \[17\]"):
        kt.sliced_linear_cross_entropy_fwd(h, widths[:3], table, b, t)
    with pytest.raises(TypeError, match=r"bias has dtype torch.float64"):
        kt.sliced_linear_cross_entropy_fwd(h, widths, table, b.double(), t)
    with pytest.raises(ValueError, match=r"k = 204 is outside \[0, 203\]"):
        kt.sliced_linear_topk(h, widths, table, b, 204)
    with pytest.raises(ValueError, match=r"exclude must be item ids"):
        kt.sliced_linear_topk(h, widths, table, b, 3, 4096, torch.zeros(2, 3, dtype=torch.int64))
