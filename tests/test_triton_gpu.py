"""The Triton kernels compiled on a CUDA device: every op through
torch.ops.canet (what the dispatcher serves on CUDA tensors) and through the
launchers (always Triton), forward and backward, bf16 and fp32, against the
plain-PyTorch reference; launch counts that do not grow with the routes; a
routed two-op sequence captured in a CUDA graph. Skipped without CUDA.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import canet_kernels  # noqa: E402, F401
import canet_kernels.triton as kt  # noqa: E402
from canet_kernels import reference  # noqa: E402

if kt.INTERPRETED:
    pytest.skip("canet_kernels.triton was imported with TRITON_INTERPRET=1",
                allow_module_level=True)
kt.register()

DEV = "cuda"
D, H, R = 128, 4, 4
LENGTHS = [200, 37, 1, 0, 64, 129, 13, 50]
WIDTHS = [128, 128, 96, 64, 96, 64, 40, 64]   # head dims 32, 24, 16 and 10
op = torch.ops.canet


def routes(lengths=LENGTHS, widths=WIDTHS):
    lengths = torch.tensor(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(DEV), torch.tensor(widths, dtype=torch.int32, device=DEV)


def rand(*shape, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(DEV)


def with_garbage(t, cu, widths):
    t = t.clone()
    for b in range(len(widths)):
        t[int(cu[b]):int(cu[b + 1]), int(widths[b]):] = float("nan")
    return t


def case(name):
    """(inputs that get gradients, canet fn, reference fn, output widths)."""
    cu, w = routes()
    T = int(cu[-1])
    x = with_garbage(rand(T, D, seed=1), cu, w)
    if name.startswith("attention"):
        causal = name == "attention"
        return ([x, rand(3, D, D, scale=D ** -0.5, seed=2), rand(3, D, scale=0.1, seed=3),
                 rand(D, D, scale=D ** -0.5, seed=4), rand(D, scale=0.1, seed=5)],
                lambda a, *p: op.sliced_attention(a, cu, w, *p, H, causal),
                lambda a, *p: reference.sliced_attention(a, cu, w, *p, H, causal), w)
    if name == "ffn":
        return ([x, rand(R * D, D, scale=D ** -0.5, seed=2), rand(R * D, scale=0.1, seed=3),
                 rand(D, R * D, scale=(R * D) ** -0.5, seed=4), rand(D, scale=0.1, seed=5)],
                lambda a, *p: op.sliced_ffn(a, cu, w, *p, R),
                lambda a, *p: reference.sliced_ffn(a, cu, w, *p, R), w)
    if name == "add_layernorm":
        return ([x, with_garbage(rand(T, D, seed=6), cu, w),
                 rand(D, scale=0.1, shift=1.0, seed=7), rand(D, scale=0.1, seed=8)],
                lambda a, r, *p: op.sliced_add_layernorm(a, r, cu, w, *p, 1e-5),
                lambda a, r, *p: reference.sliced_add_layernorm(a, r, cu, w, *p, 1e-5), w)
    ow = torch.tensor([64, 64, 128, 96, 32, 96, 24, 64], dtype=torch.int64, device=DEV)
    return ([x, rand(D, D, scale=D ** -0.5, seed=2), rand(D, scale=0.1, seed=3)],
            lambda a, *p: op.sliced_linear(a, cu, w, ow, *p),
            lambda a, *p: reference.sliced_linear(a, cu, w, ow, *p), ow)


def run(fn, inputs, dtype, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["attention", "attention_noncausal", "ffn", "add_layernorm",
                                  "linear"])
def test_op_matches_reference(name, dtype):
    inputs, fn, ref, out_w = case(name)
    clean = [torch.nan_to_num(t) for t in inputs]
    cu, _ = routes()
    grad_out = rand(int(cu[-1]), D, seed=9)
    want = run(ref, clean, torch.float64, grad_out)
    # garbage beyond the output widths of grad_out must be ignored
    got = run(fn, inputs, dtype, with_garbage(grad_out, cu, out_w))
    if dtype == torch.bfloat16:  # at most 2x the bf16 reference's own error
        low = run(ref, clean, dtype, grad_out)
        tols = [2 * err(lo, wa) + 1e-2 * (1 + wa.abs().max().item())
                for lo, wa in zip(low, want)]
    else:
        tols = [1e-3 * (1 + wa.abs().max().item()) for wa in want]
    bad = [f"{i}: {err(g, wa):.3g} > {t:.3g}" for i, (g, wa, t) in enumerate(zip(got, want, tols))
           if not err(g, wa) <= t]
    assert not bad, f"{name} {dtype} (0 = output, then input gradients): " + "; ".join(bad)


def test_launchers_match_the_dispatcher():
    # torch.ops.canet may be served by a CUDA C++ kernel: the launchers are
    # always Triton and must agree with the reference too
    cu, w = routes()
    inputs, _, ref, _ = case("ffn")
    x, w1, b1, w2, b2 = (t.float() for t in inputs)
    out, hidden = kt.sliced_ffn_fwd(x, cu, w, w1, b1, w2, b2, R)
    torch.testing.assert_close(out, ref(torch.nan_to_num(x), w1, b1, w2, b2).float(),
                               atol=1e-3, rtol=1e-3)
    assert hidden.shape == (x.shape[0], R * D)
    inputs, _, ref, _ = case("attention")
    x, wq, bq, wo, bo = (t.float() for t in inputs)
    out, qkv, ctx, lse = kt.sliced_attention_fwd(x, cu, w, wq, bq, wo, bo, H, True)
    torch.testing.assert_close(out, ref(torch.nan_to_num(x), wq, bq, wo, bo).float(),
                               atol=1e-3, rtol=1e-3)
    assert lse.dtype == torch.float32 and lse.shape == (x.shape[0], H)


def kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memset" not in e.name and "Memcpy" not in e.name)


def test_launch_count_does_not_grow_with_routes():
    counts = []
    for lengths, widths in [([5, 3], [64, 32]), (LENGTHS * 8, WIDTHS * 8)]:
        cu, w = routes(lengths, widths)
        x = rand(int(cu[-1]), D).float()
        w1, b1 = rand(R * D, D).float(), rand(R * D).float()
        w2, b2 = rand(D, R * D).float(), rand(D).float()
        kt.sliced_ffn_fwd(x, cu, w, w1, b1, w2, b2, R)  # compile first
        counts.append(kernel_launches(lambda: kt.sliced_ffn_fwd(x, cu, w, w1, b1, w2, b2, R)))
    if counts[0] == 0:
        pytest.skip("the profiler saw no CUDA kernels here")
    assert counts[0] == counts[1] == 2, counts


def ffn_ln_case(dt):
    """A batch of mixed routes and the weights of an FFN and a LayerNorm."""
    cu, w = routes()
    x = rand(int(cu[-1]), D, seed=1).to(dt)
    w1, b1 = rand(R * D, D, scale=D ** -0.5).to(dt), rand(R * D, scale=0.1).to(dt)
    w2, b2 = rand(D, R * D, scale=(R * D) ** -0.5).to(dt), rand(D, scale=0.1).to(dt)
    ln_w, ln_b = rand(D, scale=0.1, shift=1.0).to(dt), rand(D, scale=0.1).to(dt)
    return cu, w, x, (w1, b1, w2, b2), (ln_w, ln_b)


def capture(step):
    """(graph, output) of one call of `step` captured after a warm-up call
    on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def test_cuda_graph_of_a_routed_sequence():
    cu, w, x, ffn, ln = ffn_ln_case(torch.bfloat16)

    def step():
        f = op.sliced_ffn(x, cu, w, *ffn, R)
        return op.sliced_add_layernorm(f, x, cu, w, *ln, 1e-5)

    graph, out = capture(step)
    x.copy_(rand(*x.shape, seed=5).to(x.dtype))  # new data in the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step())


def test_cuda_graph_with_shared_plans_follows_new_routes():
    # plans shared inside the captured call are rebuilt by every replay: new
    # widths written into the captured route tensors change the result
    cu, w, x, ffn, ln = ffn_ln_case(torch.float32)

    def step():
        with kt.shared_plans():
            f = kt.sliced_ffn_fwd(x, cu, w, *ffn, R, False)[0]
            y = kt.sliced_add_layernorm_fwd(f, x, cu, w, *ln, 1e-5)[0]
            return kt.sliced_add_layernorm_fwd(y, f, cu, w, *ln, 1e-5)[0]

    graph, out = capture(step)
    w.copy_(torch.tensor(list(reversed(WIDTHS)), dtype=w.dtype, device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step())
    f = reference.sliced_ffn(x, cu, w, *ffn, R)
    y = reference.sliced_add_layernorm(f, x, cu, w, *ln, 1e-5)
    torch.testing.assert_close(out, reference.sliced_add_layernorm(y, f, cu, w, *ln, 1e-5),
                               atol=1e-3, rtol=1e-3)


def test_model_routed_matches_masked():
    # the whole CANet model on CUDA: routed (canet ops) against the paper's
    # masked formulation, loss and every parameter gradient, fp32
    from test_model import batch, loss_and_grads, model, tiny_cfg
    cfg = tiny_cfg()
    m = model(cfg, torch.float32).to(DEV)
    res = loss_and_grads(m, *(t.to(DEV) for t in batch(cfg)))
    torch.testing.assert_close(res["routed"][0], res["masked"][0], atol=1e-4, rtol=1e-4)
    for k, g in res["masked"][1].items():
        torch.testing.assert_close(res["routed"][1][k], g, atol=1e-4, rtol=1e-3, msg=k)


def test_train_runs_on_the_gpu(tmp_path):
    # `canet train --device cuda`: a short run end to end (router, routed
    # ops on Triton, evaluation, checkpoint), then resumed on the GPU
    from canet_kernels import data as Dt
    from canet_kernels import train as T
    from canet_kernels.model import CANetConfig
    split = Dt.leave_one_out(Dt.synthetic(80, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, max_len=8, emb_widths=(8, 16),
                      hidden_widths=(8, 16), depths=(1, 2), num_heads=2, router_width=8,
                      router_heads=2, router_ffn=16)
    tcfg = T.TrainConfig(epochs=2, batch_size=32, progress=False, device="cuda")
    model, res = T.train(cfg, tcfg, split, out_dir=str(tmp_path), log=lambda *_: None)
    assert next(model.parameters()).is_cuda
    assert 0 <= res["test"]["ndcg@10"] <= 1 and res["epochs_run"] == 2
    tcfg = T.TrainConfig(epochs=3, batch_size=32, progress=False, device="cuda")
    _, res = T.train(cfg, tcfg, split, out_dir=str(tmp_path), resume=True,
                     log=lambda *_: None)
    assert res["epochs_run"] == 3


# --------------------------------------------------------- routed scoring --

def scoring_case(N=300, V=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = torch.tensor([128, 96, 64])[torch.randint(0, 3, (N,), generator=g)]
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = 0      # the padding item, ignored below
    targets[::11] = -1
    h = rand(N, D, seed=seed + 1)
    for i, w in enumerate(widths.tolist()):
        h[i, w:] = float("nan")  # garbage beyond each width
    return (h, widths.to(DEV), rand(V, D, scale=D ** -0.5, seed=seed + 2),
            rand(V, scale=0.1, seed=seed + 3), targets.to(DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_cross_entropy_matches_reference(dtype):
    h, widths, table, bias, t = scoring_case()
    clean = [torch.nan_to_num(h, nan=0.0), table, bias]

    def ref(h_, w_, b_):
        return reference.sliced_linear_cross_entropy(h_, widths, w_, b_, t, 0)

    def fn(h_, w_, b_):
        return op.sliced_linear_cross_entropy(h_, widths, w_, b_, t, 0)

    want = run(ref, clean, torch.float64, torch.tensor(1.0, device=DEV))
    got = run(fn, [h, table, bias], dtype, torch.tensor(1.0, device=DEV))
    if dtype == torch.bfloat16:
        low = run(ref, clean, dtype, torch.tensor(1.0, device=DEV))
        tols = [2 * err(lo, wa) + 1e-2 * (1 + wa.abs().max().item())
                for lo, wa in zip(low, want)]
    else:
        tols = [1e-4 * (1 + wa.abs().max().item()) for wa in want]
    names = ["loss", "grad_h", "grad_weight", "grad_bias"]
    bad = [f"{n}: {err(g, wa):.3g} > {tl:.3g}" for n, g, wa, tl in zip(names, got, want, tols)
           if not err(g, wa) <= tl]
    assert not bad, f"{dtype}: " + "; ".join(bad)


def test_linear_topk_matches_reference():
    h, widths, table, bias, _ = scoring_case(N=100, V=20000)
    h = torch.nan_to_num(h, nan=0.0).float()
    table, bias = table.float(), bias.float()
    ex = torch.randint(0, 20000, (100, 20), device=DEV)
    ex[:, 0] = 0
    v, i = op.sliced_linear_topk(h, widths, table, bias, 10, 4096, ex)
    scores = reference.sliced_linear_logits(h.double(), widths, table.double(), bias.double())
    scores[torch.arange(100, device=DEV)[:, None], ex] = float("-inf")
    torch.testing.assert_close(v.double(), scores.gather(1, i), atol=1e-4, rtol=1e-4)
    kth = scores.gather(1, i[:, -1:])
    assert (scores.scatter(1, i, float("-inf")) <= kth + 1e-4).all()


def test_linear_cross_entropy_keeps_no_logits():
    # 4096 rows x 200k items: the logits alone would take 3.3 GB
    g = torch.Generator(device=DEV).manual_seed(0)
    N, V = 4096, 200_000
    h = torch.randn(N, D, device=DEV, generator=g, requires_grad=True)
    table = (torch.randn(V, D, device=DEV, generator=g) * D ** -0.5).requires_grad_()
    widths = torch.full((N,), D, device=DEV)
    t = torch.randint(0, V, (N,), device=DEV, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    op.sliced_linear_cross_entropy(h, widths, table, None, t).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"  # grad_weight is 102 MB
