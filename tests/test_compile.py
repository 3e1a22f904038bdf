"""torch.compile(fullgraph=True) of a two-layer routed stack: the fake
kernels and the autograd registrations let the compiler trace every op."""
import torch

import canet_kernels  # noqa: F401
from canet_kernels import reference
from canet_kernels.routing import plan_routes
from helpers import one_thread  # noqa: F401  (autouse fixture)

op = torch.ops.canet
D, H = 32, 4


def make_layer(g):
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).requires_grad_()  # noqa: E731
    return dict(w_qkv=r(3, D, D, sc=D ** -0.5), b_qkv=r(3, D, sc=0.1), w_o=r(D, D, sc=D ** -0.5),
                b_o=r(D, sc=0.1), ln1_w=1 + r(D, sc=0.1), ln1_b=r(D, sc=0.1),
                w1=r(4 * D, D, sc=D ** -0.5), b1=r(4 * D, sc=0.1),
                w2=r(D, 4 * D, sc=(4 * D) ** -0.5), b2=r(D, sc=0.1),
                ln2_w=1 + r(D, sc=0.1), ln2_b=r(D, sc=0.1))


def block(ops, x, cu, widths, p):
    a = ops.sliced_attention(x, cu, widths, p["w_qkv"], p["b_qkv"], p["w_o"], p["b_o"], H, True)
    x = ops.sliced_add_layernorm(a, x, cu, widths, p["ln1_w"], p["ln1_b"], 1e-5)
    f = ops.sliced_ffn(x, cu, widths, p["w1"], p["b1"], p["w2"], p["b2"], 4)
    return ops.sliced_add_layernorm(f, x, cu, widths, p["ln2_w"], p["ln2_b"], 1e-5)


def stack(ops, x, cu0, w0, cu1, w1, t1, layers):
    # Layer 0 on every sample, layer 1 on the depth-2 prefix only.
    x0 = block(ops, x, cu0, w0, layers[0])
    x1 = block(ops, x0[:t1], cu1, w1, layers[1])
    return torch.cat([x1, x0[t1:]])


def test_compiled_two_layer_routed_stack_matches_reference():
    g = torch.Generator().manual_seed(0)
    layers = [make_layer(g), make_layer(g)]
    lengths = torch.tensor([5, 3, 7, 1, 4])
    plan = plan_routes(lengths, torch.tensor([32, 16, 32, 8, 24]), torch.tensor([2, 1, 2, 1, 2]))
    x = torch.randn(int(plan.cu_seqlens[-1]), D, generator=g, requires_grad=True)
    b1, t1 = plan.active_samples[1], plan.active_tokens[1]
    args = (x, plan.cu_seqlens, plan.widths, plan.cu_seqlens[:b1 + 1], plan.widths[:b1], t1, layers)

    compiled = torch.compile(lambda *a: stack(op, *a), fullgraph=True)
    got = compiled(*args)
    want = stack(reference, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    params = [x] + [p for layer in layers for p in layer.values()]
    gg = torch.autograd.grad(got.square().sum(), params)
    gw = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_routed_stack_keeps_one_graph_across_route_layouts():
    # a training stream: every batch has other routes, lengths and prefix
    # sizes per layer; with dynamic shapes the routed stack compiles once
    # (Python branches on the plan, such as whether a layer drops samples,
    # still specialise: every batch here has samples of both depths), where
    # a per-width-bucket model recompiles for every new layout
    from torch._dynamo.utils import counters

    from canet_kernels import functional as CF
    from canet_kernels.routing import run_layers

    g = torch.Generator().manual_seed(1)
    layers = [make_layer(g), make_layer(g)]

    def loss(x, plan):
        def layer(p, h, cu, w):
            return CF.routed_layer(h, cu, w, p, H, 4, 1e-5)
        return run_layers(plan, x, layers, layer).square().mean()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, dynamic=True, fullgraph=True)
    for seed in range(3):
        r = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, 8, (8,), generator=r)
        widths = torch.tensor([8, 16, 24, 32])[torch.randint(0, 4, (8,), generator=r)]
        depths = torch.tensor([1, 2] * 4)[torch.randperm(8, generator=r)]
        plan = plan_routes(lengths, widths, depths, num_layers=2)
        x = torch.randn(int(plan.cu_seqlens[-1]), D, generator=r)
        torch.testing.assert_close(compiled(x, plan), loss(x, plan), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
