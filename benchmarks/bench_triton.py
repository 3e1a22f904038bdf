"""The Triton backend's target benchmark: a routed SASRec stack against the
dense max-size model in plain PyTorch.

    python benchmarks/bench_triton.py [--json OUT.json]          # CUDA, bf16
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --smoke  # CPU, seconds

Scenarios (forward unless said):
  mixed      1024 samples x 200 tokens, uniform random routes over widths
             {64, 96, 128} and depths {2, 4, 6, 8}: routed / dense time next to
             the routed FLOP ratio (the time a perfect backend would reach)
  max_route  every sample on the max route (width 128, depth 8): routed /
             dense, target <= 1.05
  latency    64 samples x 50 tokens, mixed routes
  training   forward + backward of the mixed batch
Forward scenarios are timed eager and replayed from CUDA graphs (both models
captured alike): the graph figures show the kernels without Python's launch
overhead.
Per layer the routed stack runs sliced_attention -> sliced_add_layernorm
(residual) -> sliced_ffn -> sliced_add_layernorm (residual) on the route
plan's prefix views; the dense model runs F.linear + scaled_dot_product_attention
+ F.layer_norm at width 128 on every layer, all samples padded. Providers are
timed interleaved; medians with 20/80 percentiles.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HEADS, RATIO, EPS = 4, 4, 1e-5


# ------------------------------------------------------------------ setup --

def make_weights(D, layers, dtype, device, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(dtype=dtype, device=device).requires_grad_(grad)

    return [dict(w_qkv=r(3, D, D, scale=D ** -0.5), b_qkv=r(3, D, scale=0.02),
                 w_o=r(D, D, scale=D ** -0.5), b_o=r(D, scale=0.02),
                 ln1_w=r(D, scale=0.05, shift=1.0), ln1_b=r(D, scale=0.02),
                 w1=r(RATIO * D, D, scale=D ** -0.5), b1=r(RATIO * D, scale=0.02),
                 w2=r(D, RATIO * D, scale=(RATIO * D) ** -0.5), b2=r(D, scale=0.02),
                 ln2_w=r(D, scale=0.05, shift=1.0), ln2_b=r(D, scale=0.02))
            for _ in range(layers)]


def make_batch(B, L, widths, depths, D, dtype, device, seed=0):
    """Route plan and inputs of B samples of L tokens; routes drawn uniformly
    from `widths` x `depths` (single values give one route)."""
    from canet_kernels.routing import plan_routes
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(widths)[torch.randint(len(widths), (B,), generator=g)]
    d = torch.tensor(depths)[torch.randint(len(depths), (B,), generator=g)]
    lengths = torch.full((B,), L)
    plan = plan_routes(lengths.to(device), w.to(device), d.to(device), num_layers=max(depths))
    T = int(lengths.sum())
    x = torch.randn(T, D, generator=g).to(dtype=dtype, device=device)
    dense_x = torch.randn(B, L, D, generator=g).to(dtype=dtype, device=device)
    return dict(plan=plan, x=x, dense_x=dense_x, widths=w, depths=d, L=L, B=B)


def flops_layer(n, d):
    """Forward FLOPs of one layer on one sample of n tokens at width d
    (projections, causal attention, FFN; multiply-add = 2)."""
    proj = 2 * n * d * 4 * d
    attn = 2 * 2 * d * n * (n + 1) / 2
    ffn = 2 * 2 * n * d * RATIO * d
    return proj + attn + ffn


def routed_flop_ratio(batch, D, layers):
    routed = sum(int(dep) * flops_layer(batch["L"], int(w))
                 for w, dep in zip(batch["widths"], batch["depths"]))
    return routed / (batch["B"] * layers * flops_layer(batch["L"], D))


# ---------------------------------------------------------------- models --

class TritonOps:
    """The four ops, forward only (inference: nothing saved for backward),
    straight from the Triton launchers."""

    def __init__(self, kt):
        self.kt = kt

    def attention(self, x, cu, w, p):
        return self.kt.sliced_attention_fwd(x, cu, w, p["w_qkv"], p["b_qkv"], p["w_o"],
                                            p["b_o"], HEADS, True, False)[0]

    def ffn(self, x, cu, w, p):
        return self.kt.sliced_ffn_fwd(x, cu, w, p["w1"], p["b1"], p["w2"], p["b2"], RATIO,
                                      False)[0]

    def add_ln(self, x, res, cu, w, weight, bias):
        return self.kt.sliced_add_layernorm_fwd(x, res, cu, w, weight, bias, EPS)[0]


class DispatchOps:
    """The public torch.ops.canet ops (autograd), served by Triton after
    register(force=True)."""

    def __init__(self):
        self.op = torch.ops.canet

    def attention(self, x, cu, w, p):
        return self.op.sliced_attention(x, cu, w, p["w_qkv"], p["b_qkv"], p["w_o"], p["b_o"],
                                        HEADS, True)

    def ffn(self, x, cu, w, p):
        return self.op.sliced_ffn(x, cu, w, p["w1"], p["b1"], p["w2"], p["b2"], RATIO)

    def add_ln(self, x, res, cu, w, weight, bias):
        return self.op.sliced_add_layernorm(x, res, cu, w, weight, bias, EPS)


def routed_forward(ops, x, plan, weights):
    """The routed stack: layer l runs on the prefix of samples deeper than l;
    rows of samples that stop are set aside and merged back at the end."""
    from canet_kernels.routing import run_layers

    def run(p, h, cu, w):
        a = ops.attention(h, cu, w, p)
        h = ops.add_ln(a, h, cu, w, p["ln1_w"], p["ln1_b"])
        f = ops.ffn(h, cu, w, p)
        return ops.add_ln(f, h, cu, w, p["ln2_w"], p["ln2_b"])

    return run_layers(plan, x, weights, run)


def dense_forward(x, weights):
    """The dense max-size model: every sample at full width and depth."""
    B, L, D = x.shape
    hd = D // HEADS
    for p in weights:
        qkv = F.linear(x, p["w_qkv"].reshape(3 * D, D), p["b_qkv"].reshape(3 * D))
        q, k, v = qkv.view(B, L, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = F.linear(a.transpose(1, 2).reshape(B, L, D), p["w_o"], p["b_o"])
        h = F.layer_norm(a + x, (D,), p["ln1_w"], p["ln1_b"], EPS)
        f = F.linear(F.gelu(F.linear(h, p["w1"], p["b1"])), p["w2"], p["b2"])
        x = F.layer_norm(f + h, (D,), p["ln2_w"], p["ln2_b"], EPS)
    return x


# ---------------------------------------------------------------- timing --

def time_interleaved(fns, reps, warmup, device):
    """Median and 20/80 percentiles (ms) per provider; one call of each per
    round, providers taken in turn so drifts hit all alike."""
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        q = (lambda f: s[min(len(s) - 1, int(f * len(s)))])  # noqa: E731
        out[name] = dict(median_ms=statistics.median(s), p20_ms=q(0.2), p80_ms=q(0.8), n=len(s))
    return out


def cuda_graph(fn):
    """A replay function for fn captured in a CUDA graph (fn reads fixed
    buffers), or raises when capture fails (e.g. an op synchronises)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ------------------------------------------------------------- scenarios --

def forward_scenario(name, cfg, batch, weights, dense_weights, kt, device, graphs):
    plan = batch["plan"]
    ops = TritonOps(kt)
    fns = {
        "routed": lambda: routed_forward(ops, batch["x"], plan, weights),
        "dense": lambda: dense_forward(batch["dense_x"], dense_weights),
    }
    errors = {}
    if graphs:
        for key in ("routed", "dense"):
            try:
                fns[key + "_graph"] = cuda_graph(fns[key])
            except Exception as exc:  # noqa: BLE001  reported, not fatal
                errors[key + "_graph"] = f"{type(exc).__name__}: {exc}"
    with torch.no_grad():
        res = time_interleaved(fns, cfg["reps"], cfg["warmup"], device)
    ratio = res["routed"]["median_ms"] / res["dense"]["median_ms"]
    out = dict(B=batch["B"], L=batch["L"], providers=res, routed_over_dense=ratio,
               routed_flop_ratio=routed_flop_ratio(batch, cfg["D"], cfg["layers"]))
    if "routed_graph" in res and "dense_graph" in res:
        out["graph_routed_over_dense"] = (res["routed_graph"]["median_ms"]
                                          / res["dense_graph"]["median_ms"])
    if errors:
        out["errors"] = errors
    return out


def training_scenario(cfg, batch, weights, dense_weights, device):
    plan = batch["plan"]
    ops = DispatchOps()
    x = batch["x"].detach().requires_grad_()
    dx = batch["dense_x"].detach().requires_grad_()
    g = torch.randn_like(x)
    dg = torch.randn_like(dx)
    params = [t for p in weights for t in p.values()]
    dparams = [t for p in dense_weights for t in p.values()]

    def routed():
        y = routed_forward(ops, x, plan, weights)
        torch.autograd.grad(y, [x] + params, g, allow_unused=True)

    def dense():
        y = dense_forward(dx, dense_weights)
        torch.autograd.grad(y, [dx] + dparams, dg)

    res = time_interleaved(dict(routed=routed, dense=dense), cfg["reps"], cfg["warmup"], device)
    return dict(B=batch["B"], L=batch["L"], providers=res,
                routed_over_dense=res["routed"]["median_ms"] / res["dense"]["median_ms"],
                routed_flop_ratio=routed_flop_ratio(batch, cfg["D"], cfg["layers"]))


def kernel_profile(fns, top=12):
    """Device time per kernel name (ms, summed over one call of each fn),
    read from the profiler's kernel events: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = e.name[:80]
                t, n = per.get(k, (0.0, 0))
                per[k] = (t + e.time_range.elapsed_us() / 1e3, n + 1)
        total = sum(t for t, _ in per.values())
        rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
        out[name] = dict(kernel_ms=total, launches=sum(n for _, n in per.values()),
                         top=[dict(kernel=k, ms=t, calls=n) for k, (t, n) in rows])
        print(f"profile {name}: {total:.3f} ms of kernels in "
              f"{out[name]['launches']} launches")
        for k, (t, n) in rows:
            print(f"  {t:8.3f} ms {n:5d}x  {k}")
    return out


# scenario: (samples, tokens per sample, widths, depths)
CONFIGS = {
    "full": dict(D=128, layers=8, dtype=torch.bfloat16, reps=15, warmup=3,
                 scenarios=dict(mixed=(1024, 200, [64, 96, 128], [2, 4, 6, 8]),
                                max_route=(1024, 200, [128], [8]),
                                latency=(64, 50, [64, 96, 128], [2, 4, 6, 8]),
                                training=(1024, 200, [64, 96, 128], [2, 4, 6, 8]))),
    "smoke": dict(D=32, layers=2, dtype=torch.float32, reps=1, warmup=0,
                  scenarios=dict(mixed=(3, 5, [16, 24, 32], [1, 2]),
                                 max_route=(2, 3, [32], [2]),
                                 latency=(2, 3, [16, 32], [1, 2]),
                                 training=(3, 4, [16, 32], [1, 2]))),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1), to exercise the code")
    ap.add_argument("--only", nargs="*", help="scenarios to run (default: all)")
    ap.add_argument("--blocks", help="JSON of tile-shape overrides, as written by "
                    "tune_triton.py --write-blocks ({'ffn/half': {...}, ...})")
    ap.add_argument("--profile", action="store_true",
                    help="also print device time per kernel of the mixed forward (CUDA)")
    args = ap.parse_args(argv)

    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_triton: no CUDA device (use --smoke for the CPU interpreter)")
        device = torch.device("cuda")
    import triton

    import canet_kernels  # noqa: F401  registers the ops
    import canet_kernels.triton as kt
    kt.register(force=True)
    blocks = {}
    if args.blocks:
        from canet_kernels.triton import _common
        with open(args.blocks) as f:
            blocks = json.load(f)
        for key, value in blocks.items():
            _common.BLOCKS[tuple(key.split("/"))] = value
    if args.smoke:  # the training step dispatches on CPU tensors: send it to Triton too
        for name, fn in kt.KERNELS.items():
            torch.library.register_kernel(f"canet::{name}", "cpu", fn)

    D, layers, dtype = cfg["D"], cfg["layers"], cfg["dtype"]
    weights = make_weights(D, layers, dtype, device)
    grad_weights = make_weights(D, layers, dtype, device, grad=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()}, triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype),
                D=D, layers=layers, heads=HEADS, ffn_ratio=RATIO, smoke=args.smoke,
                block_overrides=blocks)
    results = {}
    todo = args.only or list(cfg["scenarios"])
    for name in todo:
        B, L, widths, depths = cfg["scenarios"][name]
        batch = make_batch(B, L, widths, depths, D, dtype, device, seed=len(results))
        t0 = time.perf_counter()
        if name == "training":
            res = training_scenario(cfg, batch, grad_weights, grad_weights, device)
        else:
            res = forward_scenario(name, cfg, batch, weights, weights, kt, device,
                                   graphs=device.type == "cuda")
        res["wall_s"] = time.perf_counter() - t0
        results[name] = res
        extra = (f", graphs {res['graph_routed_over_dense']:.3f}"
                 if "graph_routed_over_dense" in res else "")
        print(f"{name:10s} B={B} L={L}: routed {res['providers']['routed']['median_ms']:.3f} ms, "
              f"dense {res['providers']['dense']['median_ms']:.3f} ms, routed/dense "
              f"{res['routed_over_dense']:.3f} (FLOP ratio {res['routed_flop_ratio']:.3f}){extra}",
              flush=True)
        for key, err in res.get("errors", {}).items():
            print(f"  {key}: {err}")
    if args.profile and device.type == "cuda":
        B, L, widths, depths = cfg["scenarios"]["mixed"]
        batch = make_batch(B, L, widths, depths, D, dtype, device)
        ops = TritonOps(kt)
        with torch.no_grad():
            results["profile"] = kernel_profile(dict(
                routed=lambda: routed_forward(ops, batch["x"], batch["plan"], weights),
                dense=lambda: dense_forward(batch["dense_x"], weights)))
    if "max_route" in results:
        results["max_route"]["target"] = "routed/dense <= 1.05"
        results["max_route"]["meets_target"] = results["max_route"]["routed_over_dense"] <= 1.05
    out = dict(meta=meta, results=results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
