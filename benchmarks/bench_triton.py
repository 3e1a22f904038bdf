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
The routed stack is canet's layer (functional.routed_layer: sliced_attention
-> sliced_add_layernorm -> sliced_ffn -> sliced_add_layernorm) on the route
plan's prefix views, providers.routed_stack: forward through the Triton
launchers (ops.KernelOps, nothing saved), training through torch.ops.canet
served by Triton (register(force=True)). The dense model is providers'
dense_stack (F.linear + scaled_dot_product_attention + F.layer_norm at width
128 on every layer, all samples padded), on the same weights and batch
(providers.make_weights / make_batch). Providers are timed interleaved
(benchmarks/timing.py): medians and quartiles. FLOPs: canet_kernels/flops.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

HEADS, RATIO = 4, 4

# benchmarks.providers (and canet_kernels) are imported inside the functions:
# on a CUDA machine importing canet_kernels imports triton, which must come
# after --smoke has set TRITON_INTERPRET.


# ------------------------------------------------------------------ setup --

def make_batch(B, L, widths, depths, D, dtype, device, seed=0):
    """B samples of L tokens, routes drawn uniformly from `widths` x `depths`
    (single values give one route): the padded batch (providers.Batch), its
    route plan and its packed rows in plan order."""
    from benchmarks import providers as P
    from canet_kernels.routing import gather_tokens, plan_routes
    w, d = P.sample_routes(B, {(a, b): 1.0 for a in widths for b in depths}, seed=seed)
    batch = P.make_batch(w, d, L, D, dtype=dtype, device=device, seed=seed)
    plan = plan_routes(batch.lengths, batch.widths, batch.depths, num_layers=max(depths))
    return dict(batch=batch, plan=plan, x=gather_tokens(batch.x, batch.lengths, plan))


def routed_flop_ratio(batch, layers):
    from canet_kernels import flops as FL
    b = batch["batch"]
    return (FL.backbone_flops(b.lengths, b.widths, b.depths, RATIO)
            / FL.dense_flops(b.B, b.L, b.x.shape[-1], layers, RATIO))


# ---------------------------------------------------------------- timing --

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

def forward_scenario(name, cfg, batch, W, kt, device, graphs):
    from benchmarks import providers as P
    from benchmarks import timing
    from canet_kernels.ops import KernelOps
    plan, b = batch["plan"], batch["batch"]
    ops = KernelOps(kt.KERNELS)
    fns = {
        "routed": lambda: P.routed_stack(ops, plan, batch["x"], W),
        "dense": lambda: P.dense_stack(b.x, W),
    }
    errors = {}
    with torch.no_grad():
        if graphs:
            for key in ("routed", "dense"):
                try:
                    fns[key + "_graph"] = cuda_graph(fns[key])
                except Exception as exc:  # noqa: BLE001  reported, not fatal
                    errors[key + "_graph"] = f"{type(exc).__name__}: {exc}"
        res = timing.interleaved(fns, rounds=cfg["reps"], warmup=cfg["warmup"],
                                 device=device)
    ratio = res["routed"]["median_ms"] / res["dense"]["median_ms"]
    out = dict(B=b.B, L=b.L, providers=res, routed_over_dense=ratio,
               routed_flop_ratio=routed_flop_ratio(batch, cfg["layers"]))
    if "routed_graph" in res and "dense_graph" in res:
        out["graph_routed_over_dense"] = (res["routed_graph"]["median_ms"]
                                          / res["dense_graph"]["median_ms"])
    if errors:
        out["errors"] = errors
    return out


def training_scenario(cfg, batch, W, device):
    """Forward + backward; the routed stack through torch.ops.canet (the
    public ops and their autograd, served by Triton after register(force=True))."""
    from benchmarks import providers as P
    from benchmarks import timing
    plan, b = batch["plan"], batch["batch"]
    x = batch["x"].detach().requires_grad_()
    dx = b.x.detach().requires_grad_()
    g = torch.randn_like(x)
    dg = torch.randn_like(dx)
    params = P.weight_tensors(W)

    def routed():
        y = P.routed_stack(P.CF, plan, x, W)
        torch.autograd.grad(y, [x] + params, g, allow_unused=True)

    def dense():
        y = P.dense_stack(dx, W)
        torch.autograd.grad(y, [dx] + params, dg)

    res = timing.interleaved(dict(routed=routed, dense=dense), rounds=cfg["reps"],
                             warmup=cfg["warmup"], device=device)
    return dict(B=b.B, L=b.L, providers=res,
                routed_over_dense=res["routed"]["median_ms"] / res["dense"]["median_ms"],
                routed_flop_ratio=routed_flop_ratio(batch, cfg["layers"]))


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
    from benchmarks import providers as P
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
    weights = P.make_weights(D, layers, RATIO, HEADS, dtype=dtype, device=device)
    grad_weights = P.trainable(weights)
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
            res = training_scenario(cfg, batch, grad_weights, device)
        else:
            res = forward_scenario(name, cfg, batch, weights, kt, device,
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
        from canet_kernels.ops import KernelOps
        ops = KernelOps(kt.KERNELS)
        with torch.no_grad():
            results["profile"] = kernel_profile(dict(
                routed=lambda: P.routed_stack(ops, batch["plan"], batch["x"], weights),
                dense=lambda: P.dense_stack(batch["batch"].x, weights)))
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
