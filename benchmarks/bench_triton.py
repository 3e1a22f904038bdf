"""The Triton backend's target benchmark: a routed SASRec stack against the
strongest plain-PyTorch dense model of each scenario.

    python benchmarks/bench_triton.py [--json OUT.json]          # CUDA, bf16
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --smoke  # CPU, tiny shapes

Scenarios (forward unless said):
  mixed      1024 samples x 200 tokens, uniform random routes over widths
             {64, 96, 128} and depths {2, 4, 6, 8}. Target: routed in CUDA
             graphs / fastest dense <= 1.10 x the routed FLOP ratio (the
             ratio a perfect backend would reach)
  max_route  every sample on the max route (width 128, depth 8). Target:
             fastest routed / fastest dense <= 1.0
  latency    64 samples x 50 tokens, mixed routes. Target: routed in CUDA
             graphs below the fastest dense
  training   one training step of the mixed batch as a user runs it: forward,
             loss, backward, AdamW step (fused on CUDA) over the weights, the
             input's gradient too (what the embeddings need). Target: fastest
             routed / fastest dense <= 1.25 x the FLOP ratio

Variants, each on the same weights and batch (providers.make_weights /
make_batch), timed interleaved (benchmarks/timing.py; CUDA events on CUDA):
  routed                 canet's layer (functional.routed_layer:
                         sliced_attention -> sliced_add_layernorm ->
                         sliced_ffn -> sliced_add_layernorm) on the route
                         plan's prefix views (providers.routed_stack); forward
                         through the Triton launchers (ops.KernelOps, nothing
                         saved), training through torch.ops.canet served by
                         Triton (register(force=True))
  dense                  providers.dense_stack: F.linear +
                         scaled_dot_product_attention + F.layer_norm at width
                         128 on every layer, every sample (eager)
  dense-compile          the same through torch.compile (inductor,
                         dynamic=False, fullgraph) in the mode measured
                         fastest at the start of the run (--compile-modes)
  routed-compile         the routed stack through torch.ops.canet under
                         torch.compile (fullgraph, mode "default"): a model
                         built on the ops, compiled as a user would
  bucket, bucket-compile the sort-by-width alternative (providers.Bucket):
                         one plain-PyTorch call per width bucket and op,
                         eager and compiled
  *-graphs               the variant captured in one CUDA graph
                         (timing.cuda_graph) and replayed: no Python or launch
                         overhead; training captures the whole step (capturable
                         AdamW). CUDA only: on the CPU they are listed as
                         unavailable, with the reason
Every ratio is against the fastest dense variant of its scenario (dense,
dense-graphs, dense-compile, dense-compile-graphs), named in the output. The
route plan and the bucket layout are built once per batch outside the timed
calls, as a model builds them once for all its layers; torch.compile
compiles once per shape before timing (compile_s in the JSON). FLOPs:
canet_kernels/flops.py.
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

# scenario -> (routed variant the target reads: a name or "fastest",
#              "flop" (limit x the FLOP ratio) or "plain" (limit), limit, strict <)
TARGETS = {
    "mixed": ("routed-graphs", "flop", 1.10, False),
    "max_route": ("fastest", "plain", 1.0, False),
    "latency": ("routed-graphs", "plain", 1.0, True),
    "training": ("fastest", "flop", 1.25, False),
    "training_stream": ("fastest", "flop", 1.25, False),
}


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


def _err(exc) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:300] if msg else ''}"


def _out_tensor(out):
    """A comparable tensor of a variant's output (Bucket: its rows, cat)."""
    if isinstance(out, (list, tuple)):
        return torch.cat([h.reshape(-1) for _, h in out])
    return out


# Set by --deadline: compiled variants not yet built when it passes are
# skipped (and reported so; the others build in seconds), so that a run cut
# short by its time limit still has whole scenarios. Builders come in order
# of importance.
DEADLINE = None


def build_variants(builders, unavailable, device):
    """Builds each variant (name -> zero-arg builder returning the timed
    callable) and calls it once: compiles, captures, warms. Returns the
    callables, seconds to build and first-call, the first outputs and the
    errors (a variant that fails is reported, not fatal)."""
    from benchmarks import timing
    fns, compile_s, outs, errors = {}, {}, {}, {}
    for name, build in builders.items():
        if name in unavailable:
            continue
        if "compile" in name and DEADLINE is not None and time.perf_counter() > DEADLINE:
            unavailable[name] = "skipped: the run's --deadline had passed"
            continue
        try:
            t0 = time.perf_counter()
            fn = build()
            outs[name] = fn()
            timing.sync(device)
            compile_s[name] = time.perf_counter() - t0
            fns[name] = fn
            if compile_s[name] > 1:
                print(f"  ({name} built in {compile_s[name]:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001  reported, not fatal
            errors[name] = _err(exc)
    return fns, compile_s, outs, errors


def variant_set(device, mode, skip):
    """name -> reason for the variants that cannot run here."""
    from benchmarks import providers as P
    unavailable = {}
    gok, gwhy = P.graphs_available(device)
    cok, cwhy = P.compile_available(device)
    if mode is None:
        cok, cwhy = False, "no compile mode compiled (see compile_mode_selection)"
    for name in ("routed-graphs", "dense-graphs", "dense-compile-graphs",
                 "routed-compile-graphs", "bucket-compile-graphs"):
        if not gok:
            unavailable[name] = gwhy
    for name in ("dense-compile", "dense-compile-graphs", "routed-compile",
                 "routed-compile-graphs", "bucket-compile", "bucket-compile-graphs"):
        if not cok:
            unavailable.setdefault(name, cwhy)
    for name in skip:
        unavailable.setdefault(name, "skipped (--skip)")
    return unavailable


# ------------------------------------------------------------- scenarios --

def select_compile_mode(modes, cfg, batch, W, device):
    """The torch.compile mode of the dense forward measured fastest on
    `batch` (the run's first scenario): (mode or None, per-mode figures)."""
    from benchmarks import providers as P
    from benchmarks import timing
    b = batch["batch"]
    info, fns = {}, {}
    ok, why = P.compile_available(device)
    if not ok:
        return None, {m: dict(error=why) for m in modes}
    with torch.no_grad():
        for mode in modes:
            prov = P.DenseCompiled(mode)
            try:
                t0 = time.perf_counter()
                fn = (lambda prov=prov: prov.forward(W, b))
                fn()
                timing.sync(device)
                info[mode] = dict(compile_s=time.perf_counter() - t0)
                fns[mode] = fn
            except Exception as exc:  # noqa: BLE001
                info[mode] = dict(error=_err(exc))
        if not fns:
            return None, info
        if len(fns) == 1:
            return next(iter(fns)), info
        res = timing.interleaved(fns, rounds=min(cfg["reps"], 5), warmup=cfg["warmup"],
                                 device=device, clock="events")
    for mode, r in res.items():
        info[mode]["median_ms"] = r["median_ms"]
    return min(res, key=lambda m: res[m]["median_ms"]), info


def forward_scenario(cfg, batch, W, kt, device, mode, skip):
    from benchmarks import providers as P
    from benchmarks import timing
    from canet_kernels.ops import KernelOps
    plan, b = batch["plan"], batch["batch"]
    ops = KernelOps(kt.KERNELS)
    bucket = P.Bucket()
    layout = bucket.layout(b)
    dc, bc = P.DenseCompiled(mode or "default"), P.BucketCompiled(cfg["bucket_mode"])
    rc = P.compiled(P.routed_forward, "default")
    base = {   # in order of importance (--deadline)
        "routed": lambda: P.routed_stack(ops, plan, batch["x"], W),
        "dense": lambda: P.dense_stack(b.x, W),
        "dense-compile": lambda: dc.forward(W, b),
        "routed-compile": lambda: rc(batch["x"], W, plan),
        "bucket": lambda: bucket.run(W, b.x, layout),
        "bucket-compile": lambda: bc.run(W, b.x, layout),
    }
    builders = {}
    for name, fn in base.items():
        builders[name] = (lambda fn=fn: fn)
        if name != "bucket":
            builders[name + "-graphs"] = (lambda fn=fn: timing.cuda_graph(fn))
    unavailable = variant_set(device, mode, skip)
    with torch.no_grad():
        fns, compile_s, outs, errors = build_variants(builders, unavailable, device)
        check = {}
        for name, out in outs.items():
            ref = outs.get("bucket" if name.startswith("bucket") else
                           "routed" if name.startswith("routed") else "dense")
            if ref is not None and ref is not out:
                check[name] = (_out_tensor(out).float() - _out_tensor(ref).float()
                               ).abs().max().item()
        del outs
        res = timing.interleaved(fns, rounds=cfg["reps"], warmup=cfg["warmup"],
                                 device=device, clock="events")
    return dict(B=b.B, L=b.L, providers=res, compile_s=compile_s,
                max_abs_diff_vs_eager=check, unavailable=unavailable, errors=errors,
                routed_flop_ratio=routed_flop_ratio(batch, cfg["layers"]))


def training_scenario(cfg, batch, weights, device, mode, skip):
    """One training step per variant, each on its own trainable copy of the
    weights with its own AdamW; the routed stack through torch.ops.canet
    (the public ops and their autograd, served by Triton after
    register(force=True))."""
    from benchmarks import providers as P
    plan, b = batch["plan"], batch["batch"]
    layout = P.Bucket.layout(b)
    dc, bc = P.DenseCompiled(mode or "default"), P.BucketCompiled(cfg["bucket_mode"])
    rc = P.compiled(P.routed_loss, "default")

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def step(make_loss, graphs):
        """make_loss(W, x) -> zero-arg loss; a TrainStep on fresh leaves."""
        def build():
            W = P.trainable(weights)
            x = leaf(batch["x"] if make_loss in (routed, routed_compile) else b.x)
            scope = P.shared_plans if make_loss in (routed, routed_compile) else None
            return P.TrainStep(make_loss(W, x), W, extra=[x], graphs=graphs, scope=scope)
        return build

    def routed(W, x):
        return lambda: P.routed_loss(x, W, plan)

    def routed_compile(W, x):
        return lambda: rc(x, W, plan)

    def dense(W, x):
        return lambda: P._dense_loss(x, W)

    def bucket(W, x):
        return lambda: P._bucket_loss(x, W, layout)

    makers = {"routed": routed, "dense": dense,   # in order of importance (--deadline)
              "dense-compile": lambda W, x: dc.loss_fn(W, x),
              "routed-compile": routed_compile,
              "bucket": bucket,
              "bucket-compile": lambda W, x: bc.loss_fn(W, x, layout)}
    builders = {}
    for name, make in makers.items():
        builders[name] = step(make, False)
        if name != "bucket":
            builders[name + "-graphs"] = step(make, True)
    unavailable = variant_set(device, mode, skip)
    from benchmarks import timing
    fns, compile_s, _, errors = build_variants(builders, unavailable, device)
    res = timing.interleaved(fns, rounds=cfg["reps"], warmup=cfg["warmup"],
                             device=device, clock="events")
    return dict(B=b.B, L=b.L, providers=res, compile_s=compile_s,
                unavailable=unavailable, errors=errors, optimizer="AdamW lr 1e-5 "
                "(fused; capturable in the graphs variants)",
                routed_flop_ratio=routed_flop_ratio(batch, cfg["layers"]))


STREAM = 3   # batches the training_stream scenario rotates through


def stream_scenario(cfg, batches, weights, device, mode, skip):
    """Training steps over a stream of batches whose routes differ (as in
    training, where every batch brings a new route layout), each step on
    the next of `batches`: the variants that need no recompile or recapture
    per layout. routed-compile is compiled with dynamic shapes (one graph
    for every layout); the compiled bucket model is left out: its graph
    depends on the layout, so it recompiles for each new batch. Dense does
    not depend on the routes: its steps run on the first batch."""
    import itertools

    from benchmarks import providers as P
    rc = P.compiled(P.routed_loss, "default", dynamic=True)
    dc = P.DenseCompiled(mode or "default")

    def leaf(t):
        return t.detach().clone().requires_grad_()

    def rotating(make_loss, scope=None, graphs=False, first_only=False):
        def build():
            W = P.trainable(weights)
            use = batches[:1] if first_only else batches
            xs = [leaf(bt["x"] if make_loss is not dense else bt["batch"].x) for bt in use]
            losses = itertools.cycle([make_loss(W, x, bt) for x, bt in zip(xs, use)])
            return P.TrainStep(lambda: next(losses)(), W, extra=xs, graphs=graphs,
                               scope=scope)
        return build

    def routed(W, x, bt):
        return lambda: P.routed_loss(x, W, bt["plan"])

    def routed_compile(W, x, bt):
        return lambda: rc(x, W, bt["plan"])

    def bucket(W, x, bt):
        layout = P.Bucket.layout(bt["batch"])
        return lambda: P._bucket_loss(x, W, layout)

    def dense(W, x, bt):
        return dc.loss_fn(W, x)

    builders = {"routed": rotating(routed, P.shared_plans),
                "dense-compile": rotating(dense, first_only=True),
                "dense-compile-graphs": rotating(dense, graphs=True, first_only=True),
                "routed-compile": rotating(routed_compile, P.shared_plans),
                "bucket": rotating(bucket)}
    unavailable = {k: v for k, v in variant_set(device, mode, skip).items() if k in builders}
    unavailable.setdefault("bucket-compile", "recompiles for every new route layout "
                           "(its graph depends on the bucket sizes per layer)")
    from benchmarks import timing
    fns, compile_s, _, errors = build_variants(builders, unavailable, device)
    res = timing.interleaved(fns, rounds=cfg["reps"], warmup=max(cfg["warmup"], STREAM),
                             device=device, clock="events")
    ratios = [routed_flop_ratio(bt, cfg["layers"]) for bt in batches]
    return dict(B=batches[0]["batch"].B, L=batches[0]["batch"].L, batches=len(batches),
                providers=res, compile_s=compile_s, unavailable=unavailable, errors=errors,
                routed_flop_ratio=sum(ratios) / len(ratios))


def analyse(name, res):
    """Adds the fastest dense variant, every variant over it, and the
    scenario's target to a scenario result."""
    ms = {n: r["median_ms"] for n, r in res["providers"].items()}
    dense = {n: t for n, t in ms.items() if n.startswith("dense")}
    routed = {n: t for n, t in ms.items() if n.startswith("routed")}
    fr = res["routed_flop_ratio"]
    if "routed" in ms and "dense" in ms:
        res["routed_over_dense"] = ms["routed"] / ms["dense"]          # eager / eager
    if "routed-graphs" in ms and "dense-graphs" in ms:
        res["graph_routed_over_dense"] = ms["routed-graphs"] / ms["dense-graphs"]
    if not dense:
        return res
    best = min(dense, key=dense.get)
    res["best_dense"] = dict(name=best, median_ms=dense[best])
    res["over_best_dense"] = {n: t / dense[best] for n, t in ms.items()}
    if routed:
        fastest = min(routed, key=routed.get)
        res["best_routed"] = dict(name=fastest, median_ms=routed[fastest])
        res["routed_over_best_dense"] = routed[fastest] / dense[best]
        res["over_flop_ratio"] = res["routed_over_best_dense"] / fr
    which, kind, limit, strict = TARGETS.get(name, (None, None, None, None))
    if which is None:
        return res
    basis = min(routed, key=routed.get) if which == "fastest" and routed else which
    text = (f"{'fastest routed' if which == 'fastest' else which} / fastest dense "
            f"{'<' if strict else '<='} {limit}"
            + (" x the FLOP ratio" if kind == "flop" else ""))
    res["target"] = text
    if basis not in ms:
        res["meets_target"] = None
        res["target_note"] = f"{which} not measured here"
        return res
    ratio = ms[basis] / dense[best]
    value = ratio / fr if kind == "flop" else ratio
    res["target_routed"] = basis
    res["target_value"] = value
    res["meets_target"] = bool(value < limit if strict else value <= limit)
    return res


def report(name, res):
    best = res.get("best_dense")
    print(f"{name} B={res['B']} L={res['L']}: FLOP ratio {res['routed_flop_ratio']:.3f}"
          + (f"; fastest dense: {best['name']} {best['median_ms']:.3f} ms" if best else ""),
          flush=True)
    for n, r in res["providers"].items():
        rel = res.get("over_best_dense", {}).get(n)
        line = f"  {n:22s} {r['median_ms']:10.3f} ms"
        if rel is not None:
            line += f"  / fastest dense {rel:6.3f}"
            if n.startswith("routed"):
                line += f"  (/ FLOP ratio {rel / res['routed_flop_ratio']:6.3f})"
        if n in res.get("compile_s", {}):
            line += f"  [build {res['compile_s'][n]:.1f} s]"
        print(line)
    for n, why in res.get("unavailable", {}).items():
        print(f"  {n:22s} unavailable: {why}")
    for n, err in res.get("errors", {}).items():
        print(f"  {n:22s} failed: {err}")
    if "target" in res:
        met = res["meets_target"]
        state = ("not measured: " + res.get("target_note", "")) if met is None else \
            f"{res['target_value']:.3f} -> {'met' if met else 'missed'}"
        print(f"  target: {res['target']}: {state}", flush=True)


# kernel name -> family of the profile (first match); canet's Triton kernels
# by their jit names, the dense model's by library naming
FAMILIES = (
    ("attention projections", ("_mm_kernel",)),
    ("attention core", ("_attn_fwd_kernel",)),
    ("add + LayerNorm", ("_ln_fwd_kernel",)),
    ("FFN", ("_ffn_fwd_kernel",)),
    ("tile plans", ("_plan_kernel",)),
    ("backward: weight gradients", ("_dw_kernel", "_reduce_kernel")),
    ("backward: attention", ("_attn_dq_kernel", "_attn_dkdv_kernel")),
    ("backward: FFN", ("_ffn_bwd_kernel",)),
    ("backward: add + LayerNorm", ("_ln_bwd_kernel",)),
    ("optimizer", ("adam", "Adam")),
    ("inductor fused", ("triton_",)),
    ("attention (library)", ("flash", "fmha", "sdpa", "attention")),  # before GEMM: cuDNN's
    ("GEMM (library)", ("gemm", "nvjet", "xmma", "cutlass", "sm90_")),  # names say sm90 too
    ("LayerNorm (library)", ("layer_norm",)),
)


def family_of(kernel: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in kernel for k in keys):
            return fam
    return "other (copies, elementwise)"


def families(per: dict, counts: dict | None = None, peaks: dict | None = None) -> dict:
    """Kernel time per family from per-kernel {name: (ms, calls)}, slowest
    first; with counts ({family: (FLOPs, bytes)}) each family's achieved
    TFLOP/s and TB/s, and with `peaks` (timing.device_peaks) their share."""
    fam = {}
    for k, (t, n) in per.items():
        f = fam.setdefault(family_of(k), dict(ms=0.0, calls=0))
        f["ms"] += t
        f["calls"] += n
    for f, row in fam.items():
        flops, nbytes = (counts or {}).get(f, (None, None))
        if flops is None or row["ms"] <= 0:
            continue
        row.update(gflop=flops / 1e9, gb=nbytes / 1e9,
                   tflop_s=flops / row["ms"] / 1e9, tb_s=nbytes / row["ms"] / 1e9)
        if peaks:
            row["of_peak_flop"] = row["tflop_s"] / peaks["matmul_tflop_s"]
            row["of_peak_bw"] = row["tb_s"] / peaks["copy_tb_s"]
    return dict(sorted(fam.items(), key=lambda kv: -kv[1]["ms"]))


def kernel_profile(fns, counts=None, peaks=None, top=12):
    """Device time per kernel name and per family (ms, summed over one call of
    each fn), read from the profiler's kernel events: where the time goes.
    counts: name -> {family: (FLOPs, bytes)} adds each family's achieved
    rates (`families`)."""
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
                         families=families(per, (counts or {}).get(name), peaks),
                         top=[dict(kernel=k, ms=t, calls=n) for k, (t, n) in rows])
        print(f"profile {name}: {total:.3f} ms of kernels in "
              f"{out[name]['launches']} launches")
        for f, row in out[name]["families"].items():
            line = f"  {row['ms']:8.3f} ms {row['calls']:5d}x  {f}"
            if "tflop_s" in row:
                line += (f"   {row['tflop_s']:6.1f} TFLOP/s ({100 * row.get('of_peak_flop', 0):4.1f}%)"
                         f"  {row['tb_s']:5.2f} TB/s ({100 * row.get('of_peak_bw', 0):4.1f}%)")
            print(line)
        print("  top kernels:")
        for k, (t, n) in rows:
            print(f"  {t:8.3f} ms {n:5d}x  {k}")
    return out


# scenario: (samples, tokens per sample, widths, depths). The smoke shapes of
# mixed, max_route and training match, so the compiled dense forward is
# compiled once for them.
CONFIGS = {
    "full": dict(D=128, layers=8, dtype=torch.bfloat16, reps=15, warmup=3,
                 bucket_mode="default",
                 scenarios=dict(mixed=(1024, 200, [64, 96, 128], [2, 4, 6, 8]),
                                max_route=(1024, 200, [128], [8]),
                                latency=(64, 50, [64, 96, 128], [2, 4, 6, 8]),
                                training=(1024, 200, [64, 96, 128], [2, 4, 6, 8]),
                                training_stream=(1024, 200, [64, 96, 128], [2, 4, 6, 8]))),
    "smoke": dict(D=32, layers=2, dtype=torch.float32, reps=1, warmup=0,
                  bucket_mode="default",
                  scenarios=dict(mixed=(3, 5, [16, 24, 32], [1, 2]),
                                 max_route=(3, 5, [32], [2]),
                                 latency=(2, 3, [16, 32], [1, 2]),
                                 training=(3, 5, [16, 32], [1, 2]),
                                 training_stream=(3, 5, [16, 32], [1, 2]))),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1), to exercise the code")
    ap.add_argument("--only", nargs="*", help="scenarios to run (default: all)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="variants not to run (e.g. bucket-compile bucket-compile-graphs)")
    ap.add_argument("--compile-modes",
                    help="comma-separated torch.compile modes measured on the first "
                    "scenario's dense forward; the fastest compiles every compiled "
                    "variant (default: default,max-autotune-no-cudagraphs; --smoke: "
                    "default, to keep its compiles few)")
    ap.add_argument("--blocks", help="JSON of tile-shape overrides, as written by "
                    "tune_triton.py --write-blocks ({'ffn/half': {...}, ...})")
    ap.add_argument("--bucket-compile-mode",
                    help="torch.compile mode of the bucket variants (default: "
                    "\"default\": its GEMMs have a shape per width and depth, "
                    "3 x 8 x 4 of them, too many to autotune in a run's budget)")
    ap.add_argument("--profile", action="store_true",
                    help="also print device time per kernel and kernel family of the "
                    "mixed forward and of a training step, with each family's achieved "
                    "TFLOP/s and TB/s against the GPU's measured peaks (CUDA)")
    ap.add_argument("--deadline", type=float,
                    help="seconds: compiled variants not built by then are skipped "
                    "(reported), so a time limit keeps whole results")
    args = ap.parse_args(argv)

    global DEADLINE
    start = time.perf_counter()
    if args.deadline is not None:
        DEADLINE = start + args.deadline
    cfg = dict(CONFIGS["smoke" if args.smoke else "full"])
    if args.bucket_compile_mode:
        cfg["bucket_mode"] = args.bucket_compile_mode
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        device = torch.device("cpu")
        # tiny shapes: one thread (OpenMP hand-offs of a loaded machine cost
        # more than the work; measured 250 ms for a 2-layer dense forward
        # with 2 threads, 0.15 ms with 1)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_triton: no CUDA device (use --smoke for the CPU interpreter)")
        device = torch.device("cuda")
    import triton

    import canet_kernels  # noqa: F401  registers the ops
    import canet_kernels.triton as kt
    from benchmarks import providers as P
    from benchmarks import timing
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
    # training second: its compiles take longest, and a --deadline should
    # cut the cheaper scenarios' compiled variants rather than its own
    todo = args.only or [n for n in ("mixed", "training", "max_route", "latency",
                                     "training_stream") if n in cfg["scenarios"]]
    batches = {}

    def batch_of(name):
        if name not in batches:
            B, L, widths, depths = cfg["scenarios"][name]
            batches[name] = make_batch(B, L, widths, depths, D, dtype, device,
                                       seed=list(cfg["scenarios"]).index(name))
        return batches[name]

    modes = args.compile_modes or ("default" if args.smoke else ",".join(P.COMPILE_MODES))
    modes = [m.strip() for m in modes.split(",") if m.strip()]
    t0 = time.perf_counter()
    mode, selection = select_compile_mode(modes, cfg, batch_of(todo[0]), weights, device)
    print(f"torch.compile mode: {mode} ({time.perf_counter() - t0:.1f} s; "
          + ", ".join(f"{m}: " + (f"{v['median_ms']:.3f} ms" if "median_ms" in v else
                                  v.get("error", f"compiled in {v['compile_s']:.1f} s"))
                      for m, v in selection.items()) + ")", flush=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()}, triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype),
                D=D, layers=layers, heads=HEADS, ffn_ratio=RATIO, smoke=args.smoke,
                block_overrides=blocks, compile_mode=mode, compile_mode_selection=selection,
                bucket_compile_mode=cfg["bucket_mode"], routed_compile_mode="default",
                timing="interleaved medians; CUDA events on CUDA, wall clock on the CPU",
                machine=timing.machine_info(device))
    if device.type == "cuda":
        meta["peaks"] = peaks(timing)
        print("peaks: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                    for k, v in meta["peaks"].items()), flush=True)
    results = {}
    for name in todo:
        batch = batch_of(name)
        t0 = time.perf_counter()
        if name == "training":
            res = training_scenario(cfg, batch, weights, device, mode, args.skip)
        elif name == "training_stream":
            seed = list(cfg["scenarios"]).index(name)
            B, L, widths, depths = cfg["scenarios"][name]
            stream = [make_batch(B, L, widths, depths, D, dtype, device, seed=100 * seed + i)
                      for i in range(STREAM)]
            res = stream_scenario(cfg, stream, weights, device, mode, args.skip)
        else:
            res = forward_scenario(cfg, batch, weights, kt, device, mode, args.skip)
        res["wall_s"] = time.perf_counter() - t0
        results[name] = analyse(name, res)
        report(name, res)
        write(args.json, dict(meta=meta, results=results))  # a later timeout keeps these
    if args.profile and device.type == "cuda":
        # not cut by --deadline: it reuses the scenarios' compiles (about 20 s)
        results["profile"] = profiles(batch_of("mixed"), weights, kt, mode, meta["peaks"])
    out = dict(meta=meta, results=results)
    write(args.json, out)
    return out


# datasheet peaks (dense bf16 tensor-core TFLOP/s, HBM TB/s), SXM parts;
# the measured ceilings are what the report divides by
DATASHEET = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}


def peaks(timing) -> dict:
    out = timing.device_peaks()
    name = torch.cuda.get_device_name()
    for key, (tflops, tbs) in DATASHEET.items():
        if key in name:
            out.update(datasheet_tflop_s=tflops, datasheet_tb_s=tbs)
    return out


def profiles(batch, weights, kt, mode, peak) -> dict:
    """Kernel time per family of the mixed forward (routed with each family's
    achieved rates; dense eager and compiled) and of one training step
    (routed through torch.ops.canet; dense compiled)."""
    from benchmarks import providers as P
    from canet_kernels import flops as FL
    from canet_kernels.ops import KernelOps
    b, plan = batch["batch"], batch["plan"]
    ops = KernelOps(kt.KERNELS)
    elem = b.x.element_size()
    fwd = FL.stack_kernel_counts(b.lengths, b.widths, b.depths, elem, RATIO)
    dense = FL.stack_kernel_counts([b.L] * b.B, [b.x.shape[-1]] * b.B,
                                   [len(weights["layers"])] * b.B, elem, RATIO)
    dense_total = (sum(f for f, _ in dense.values()), sum(n for _, n in dense.values()))
    fns = dict(routed=lambda: P.routed_stack(ops, plan, batch["x"], weights),
               dense=lambda: P.dense_stack(b.x, weights))
    if mode is not None:
        dc = P.DenseCompiled(mode)
        fns["dense-compile"] = lambda: dc.forward(weights, b)
    counts = {"routed": fwd}
    with torch.no_grad():
        out = dict(forward=kernel_profile(fns, counts, peak))
    for name in ("dense", "dense-compile"):   # the whole forward's achieved rates
        if name in out["forward"]:
            ms = out["forward"][name]["kernel_ms"]
            out["forward"][name].update(tflop_s=dense_total[0] / ms / 1e9,
                                        tb_s=dense_total[1] / ms / 1e9)
    Wr = P.trainable(weights)
    xr = batch["x"].detach().clone().requires_grad_()
    steps = dict(routed=P.TrainStep(lambda: P.routed_loss(xr, Wr, plan), Wr, extra=[xr],
                                    scope=P.shared_plans))
    if mode is not None:
        Wd = P.trainable(weights)
        xd = b.x.detach().clone().requires_grad_()
        steps["dense-compile"] = P.TrainStep(dc.loss_fn(Wd, xd), Wd, extra=[xd])
    out["training_step"] = kernel_profile(steps, None, peak)
    return out


def write(path, out):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
