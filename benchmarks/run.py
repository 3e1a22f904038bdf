"""canet's benchmark suite: every provider side by side, per op and for the
whole backbone, forward (inference) and training step (forward + backward).

    python -m benchmarks.run                    # CPU default sweep (< ~10 min)
    python -m benchmarks.run --quick            # CPU, < 2 min
    python -m benchmarks.run --smoke --out DIR  # seconds (CI)
    python -m benchmarks.run --device cuda --out DIR   # GPU sweep (~2 min)
    python -m benchmarks.run --full             # large points too (slow on CPU)
    python -m benchmarks.run --report           # only rewrite OUT/latest.md

Sections: ops, model, padding (Beauty, packed vs padded), serving (batch-1
top-10 latency, CPU), memory (peak of a training step; per-point peaks too,
except with --quick / --smoke / --no-memory). Results go to
OUT/results_<device>.json and .csv, plots to OUT/*.png and a markdown table
to OUT/latest.md (default OUT: benchmarks/results).

Definitions: canet_kernels/flops.py (FLOPs, bytes), benchmarks/timing.py
(interleaved timing, peak memory), benchmarks/providers.py (providers).
"time / dense" is a provider's median over the dense max-size stack's at the
same point; "realized / theory" is that over the routed FLOP ratio (1.0 =
time shrinks exactly as the FLOPs do).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import random
import signal
import sys
import time
import traceback

import torch

from benchmarks import providers as P
from benchmarks import timing
from canet_kernels import flops as FL

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEAUTY = os.path.join(ROOT, "..", "shared", "data", "Beauty.txt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
D, LAYERS, HEADS, RATIO = 128, 8, 4, 4
ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ---------------------------------------------------------------- sweeps ----

def _pt(section, mode, B, n, mix="uniform", dtype="fp32", op="backbone"):
    return dict(section=section, mode=mode, batch=B, seq_len=n, mix=mix, dtype=dtype,
                op=op)


def sweep(device: str, level: str) -> list:
    """The points of one run, most important first (a time budget cuts the
    tail). level: smoke | quick | default | full."""
    pts = []
    ops = FL.OPS
    if level == "smoke":
        pts += [_pt("model", "fwd", 3, 8), _pt("model", "train", 3, 8)]
        pts += [_pt("ops", "fwd", 3, 8, op=o) for o in ops]
        pts += [_pt("ops", "train", 3, 8, op=ops[1])]
        pts += [_pt("padding", "fwd", 8, 50), _pt("memory", "train", 3, 8)]
        if device == "cpu":
            pts += [_pt("serving", "fwd", 1, 50)]
        return pts
    if device == "cuda":
        pts += [_pt("model", "fwd", B, 50) for B in (16, 256, 1024, 4096)]
        pts += [_pt("model", "fwd", 1024, 50, dtype="bf16"),
                _pt("model", "train", 1024, 50), _pt("memory", "train", 1024, 50)]
        pts += [_pt("model", "fwd", 1024, 50, m) for m in ("trained", "all-max", "all-min")]
        pts += [_pt("padding", "fwd", 1024, 50)]
        pts += [_pt("ops", "fwd", 4096, 50, op=o) for o in ops]
        pts += [_pt("model", "fwd", 1024, n) for n in (20, 200)]
        pts += [_pt("model", "fwd", 1, 50), _pt("model", "fwd", 4096, 50, dtype="bf16"),
                _pt("model", "fwd", 1024, 50, dtype="fp16"),
                _pt("model", "train", 1024, 50, dtype="bf16"),
                _pt("model", "fwd", 1024, 50, "trained", dtype="bf16")]
        pts += [_pt("ops", "fwd", 4096, 50, dtype="bf16", op=o) for o in ops]
        pts += [_pt("ops", "train", 1024, 50, op=o) for o in ops]
        if level == "full":
            pts += [_pt("model", "fwd", 4096, n) for n in (20, 200)]
            pts += [_pt("model", "fwd", 4096, 200, dtype=d) for d in ("bf16", "fp16")]
            pts += [_pt("model", "train", 4096, 50, dtype=d) for d in ("fp32", "bf16")]
            pts += [_pt("ops", "fwd", B, n, op=o) for B in (256, 4096) for n in (20, 200)
                    for o in ops]
        return pts
    if level == "quick":
        pts += [_pt("model", "fwd", B, 50) for B in (16, 64)]
        pts += [_pt("model", "train", 16, 50), _pt("memory", "train", 16, 50)]
        pts += [_pt("ops", "fwd", 32, 50, op=o) for o in ops]
        pts += [_pt("serving", "fwd", 1, 50), _pt("padding", "fwd", 32, 50),
                _pt("model", "fwd", 64, 50, "trained")]
        return pts
    pts += [_pt("model", "fwd", B, 50) for B in (1, 4, 16, 64, 256)]
    pts += [_pt("model", "fwd", 64, 50, m) for m in ("trained", "all-max", "all-min")]
    pts += [_pt("model", "fwd", 16, n) for n in (20, 200)]
    pts += [_pt("ops", "fwd", B, 50, op=o) for B in (16, 256) for o in ops]
    pts += [_pt("model", "train", B, 50) for B in (16, 64)]
    pts += [_pt("model", "train", 16, 50, "trained"), _pt("memory", "train", 64, 50)]
    pts += [_pt("padding", "fwd", 128, 50)]
    pts += [_pt("ops", "train", 64, 50, op=o) for o in ops]
    pts += [_pt("serving", "fwd", 1, 50)]
    if level == "full":
        pts += [_pt("model", "fwd", B, 50) for B in (1024, 4096)]
        pts += [_pt("model", "fwd", 256, n) for n in (20, 200)]
        pts += [_pt("model", "train", 256, 50)]
        pts += [_pt("ops", "fwd", 4096, n, op=o) for n in (20, 50, 200) for o in ops]
    return pts


# ------------------------------------------------------------ the points --

class Ctx:
    """Settings and caches of one run."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.weights = {}
        self.mix = P.load_route_mix(args.mix_json) if args.mix_json else "trained"
        self.mix_source = args.mix_json or "default skewed mix (providers.DEFAULT_TRAINED_MIX)"
        self.checked = set()

    def W(self, dtype):
        if dtype not in self.weights:
            self.weights[dtype] = P.make_weights(D, LAYERS, RATIO, HEADS, dtype=dtype,
                                                 device=self.device)
        return self.weights[dtype]

    def routes(self, B, mix, seed=0):
        return P.sample_routes(B, self.mix if mix == "trained" else mix, seed=seed)

    def providers(self, names=None):
        names = names or self.args.providers
        return P.backbone_providers(self.device, names)


def _tol(dtype):
    return {torch.float32: 2e-4, torch.bfloat16: 1e-1, torch.float16: 3e-2}[dtype]


def _rows_for(pt, res, flop, flop_dense, bytes_, bytes_dense, ratio, peaks, info):
    """Result rows (one per provider) of a timed point."""
    dense_ms = res.get("dense", {}).get("median_ms")
    rows = []
    for name, s in res.items():
        dense = name == "dense"
        fl, by = (flop_dense, bytes_dense) if dense else (flop, bytes_)
        rel = s["median_ms"] / dense_ms if dense_ms else None
        row = dict(pt, provider=name, **{k: s[k] for k in (
            "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "iqr_pct", "samples",
            "number")})
        row.update(flop_ratio=ratio, time_over_dense=rel,
                   realized_over_theory=(rel / ratio if rel is not None and not dense
                                         and ratio else None),
                   gflops=fl / (s["median_ms"] * 1e6),
                   gbps=by / (s["median_ms"] * 1e6),
                   peak_mb=peaks.get(name, (None,))[0], **info)
        rows.append(row)
    return rows


def _peaks(ctx, fns):
    out = {}
    if ctx.args.no_memory:
        return out
    for name, fn in fns.items():
        try:
            b, method = timing.peak_memory_bytes(fn, ctx.device)
            out[name] = (b / 2 ** 20, method)
        except Exception as exc:  # noqa: BLE001  memory is best effort
            out[name] = (None, f"failed: {exc}")
    return out


def _timed(ctx, fns, budget):
    a = ctx.args
    return timing.interleaved(fns, rounds=a.rounds, warmup=a.warmup, device=ctx.device,
                              min_sample_s=a.min_sample_s, budget_s=budget)


def _check_backbone(ctx, provs, W, batch, dtype, key):
    """Every provider against canet (or the masked formulation) once per
    dtype and kind of mix (dense only at the max route); raises on an fp32
    mismatch, warns on a 16-bit one."""
    if key in ctx.checked:
        return None
    ctx.checked.add(key)
    ref = provs.get("canet-cpu") or provs.get("canet-cuda") or P.Masked()
    with torch.inference_mode():
        want = ref.padded(ref.forward(W, batch), batch).float()
        errs = {}
        for name, p in provs.items():
            if name == "dense" and not bool((batch.widths == D).all() and
                                            (batch.depths == LAYERS).all()):
                continue
            got = p.padded(p.forward(W, batch), batch).float()
            errs[name] = ((got - want) * batch.valid()).abs().max().item()
    bad = {n: e for n, e in errs.items() if not e <= _tol(dtype) * 10}
    if bad and dtype == torch.float32:
        raise RuntimeError(f"providers disagree with {ref.name}: {bad}")
    if bad:
        print(f"    warning: {dtype} outputs differ from {ref.name} by {bad} "
              f"(low-precision drift over {LAYERS} layers?)", flush=True)
    return errs


def run_model(ctx, pt, budget):
    dtype = DTYPES[pt["dtype"]]
    W = ctx.W(dtype)
    widths, depths = ctx.routes(pt["batch"], pt["mix"])
    batch = P.make_batch(widths, depths, pt["seq_len"], D, dtype=dtype, device=ctx.device)
    provs, skipped = ctx.providers()
    check = _check_backbone(ctx, provs, W, batch, dtype, (pt["dtype"], pt["mix"] == "all-max"))
    train = pt["mode"] == "train"
    if train:
        Wt = P.trainable(W)
        fns = {n: (lambda p=p: P.train_step(p, Wt, batch)) for n, p in provs.items()}
    else:
        fns = {n: (lambda p=p: P.run_forward(p, W, batch)) for n, p in provs.items()}
    res = _timed(ctx, fns, budget)
    peaks = _peaks(ctx, fns)
    k = 3 if train else 1
    lengths = batch.lengths.cpu()
    fl = FL.backbone_flops(lengths, widths, depths) * k
    fd = FL.dense_flops(pt["batch"], pt["seq_len"], D, LAYERS) * k
    by = FL.backbone_bytes(lengths, widths, depths, ELEM[dtype]) * k
    bd = FL.dense_bytes(pt["batch"], pt["seq_len"], D, LAYERS, ELEM[dtype]) * k
    info = {"check_max_abs_diff": max(check.values()) if check else None}
    rows = _rows_for(pt, res, fl, fd, by, bd, fl / fd, peaks, info)
    return rows, skipped, {n: v[1] for n, v in peaks.items()}


def run_op(ctx, pt, budget):
    dtype = DTYPES[pt["dtype"]]
    W = ctx.W(dtype)
    widths, depths = ctx.routes(pt["batch"], pt["mix"])
    batch = P.make_batch(widths, depths, pt["seq_len"], D, dtype=dtype, device=ctx.device)
    res_in = P.make_batch(widths, depths, pt["seq_len"], D, dtype=dtype,
                          device=ctx.device, seed=7).x
    case = P.OpCase(pt["op"], W["layers"][0], batch, res_in, HEADS, RATIO)
    train = pt["mode"] == "train"
    fns, skipped = {}, {}
    for name in ctx.args.providers:
        if name not in P.OP_PROVIDERS:
            continue
        ok, why = case.available(name, ctx.device)
        if not ok:
            skipped[name] = why
            continue
        st = case.prepare(name, grad=train)
        if train:
            def fn(name=name, st=st):
                out = case.call(name, st)
                P.op_loss(out).backward()
        else:
            def fn(name=name, st=st):
                with torch.inference_mode():
                    return case.call(name, st)
        fns[name] = fn
    res = _timed(ctx, fns, budget)
    peaks = _peaks(ctx, fns)
    k = 3 if train else 1
    lengths = batch.lengths.cpu()
    B, n, op = pt["batch"], pt["seq_len"], pt["op"]
    fl = FL.ops_flops(op, lengths, widths) * k
    fd = FL.ops_flops(op, [n] * B, [D] * B) * k
    by = FL.op_bytes(op, lengths, widths, ELEM[dtype]) * k
    bd = FL.op_bytes(op, [n] * B, [D] * B, ELEM[dtype]) * k
    ratio = fl / fd if fd else FL.op_bytes(op, lengths, widths, 1) / FL.op_bytes(
        op, [n] * B, [D] * B, 1)
    rows = _rows_for(pt, res, fl, fd, by, bd, ratio, peaks, {})
    return rows, skipped, {n: v[1] for n, v in peaks.items()}


def beauty_lengths(B, max_len=50, seed=0, path=BEAUTY):
    """History lengths (last `max_len` items) of B random Beauty users; None
    when the file is missing."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lens = [min(len(line.split()) - 1, max_len) for line in f if line.strip()]
    rng = random.Random(seed)
    return torch.tensor([rng.choice(lens) for _ in range(B)], dtype=torch.int64)


def run_padding(ctx, pt, budget):
    """Beauty lengths: the packed route plan vs the same batch padded to
    max_len, same routes."""
    dtype = DTYPES[pt["dtype"]]
    W = ctx.W(dtype)
    B, L = pt["batch"], pt["seq_len"]
    lengths = beauty_lengths(B, L)
    source = "Beauty.txt"
    if lengths is None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.clamp((-torch.rand(B, generator=g).log() * 6).long() + 3, max=L)
        source = "synthetic (Beauty.txt not found): 3 + exponential(6)"
    widths, depths = ctx.routes(B, pt["mix"])
    packed = P.make_batch(widths, depths, L, D, lengths=lengths, dtype=dtype,
                          device=ctx.device)
    padded = P.Batch(packed.x, torch.full_like(packed.lengths, L), packed.widths,
                     packed.depths)
    provs, skipped = ctx.providers()
    fns = {}
    names = {"canet-cpu": "canet-cpu", "canet-cuda": "canet-cuda",
             "canet-triton": "canet-triton", "bucket": "bucket"}
    for name, p in provs.items():
        if name in names:
            fns[f"{name} packed"] = (lambda p=p: P.run_forward(p, W, packed))
            fns[f"{name} padded"] = (lambda p=p: P.run_forward(p, W, padded))
    for name in ("dense", "masked"):
        if name in provs:
            fns[f"{name} padded"] = (lambda p=provs[name]: P.run_forward(p, W, padded))
    res = _timed(ctx, fns, budget)
    peaks = _peaks(ctx, fns)
    fl_packed = FL.backbone_flops(lengths, widths, depths)
    fl_padded = FL.backbone_flops([L] * B, widths, depths)
    fd = FL.dense_flops(B, L, D, LAYERS)
    by_p = FL.backbone_bytes(lengths, widths, depths, ELEM[dtype])
    by_d = FL.backbone_bytes([L] * B, widths, depths, ELEM[dtype])
    rows = []
    for name, s in res.items():
        is_packed = name.endswith("packed")
        fl = fl_packed if is_packed else (fd if name.startswith("dense") else fl_padded)
        by = by_p if is_packed else by_d
        base = name.rsplit(" ", 1)[0]
        other = res.get(f"{base} padded") if is_packed else None
        row = dict(pt, provider=name, **{k: s[k] for k in (
            "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "iqr_pct", "samples",
            "number")})
        row.update(flop_ratio=fl / fd, gflops=fl / (s["median_ms"] * 1e6),
                   gbps=by / (s["median_ms"] * 1e6),
                   padded_over_packed=(other["median_ms"] / s["median_ms"]
                                       if other else None),
                   mean_len=float(lengths.float().mean()), max_len=int(lengths.max()),
                   lengths_source=source, peak_mb=peaks.get(name, (None,))[0],
                   time_over_dense=(s["median_ms"] / res["dense padded"]["median_ms"]
                                    if "dense padded" in res else None))
        rows.append(row)
    return rows, skipped, {}


def _serving_model(n_items):
    """canet_kernels.model's CANet when its API is there, else None."""
    try:
        from canet_kernels.model import CANet, CANetConfig
        cfg = CANetConfig(n_items=n_items, max_len=50)
        model = CANet(cfg).eval()
        return model
    except Exception:  # noqa: BLE001  the model package is optional here
        return None


def _beauty_user(target_len):
    """One Beauty history (last 50 items) whose length is closest to
    target_len, and the item count."""
    if not os.path.exists(BEAUTY):
        return None, None
    best, n_items = None, 0
    with open(BEAUTY) as f:
        for line in f:
            items = [int(v) for v in line.split()[1:]]
            if not items:
                continue
            n_items = max(n_items, max(items))
            items = items[-50:]
            if best is None or abs(len(items) - target_len) < abs(len(best) - target_len):
                best = items
    return best, n_items


def run_serving(ctx, pt, budget):
    """Batch-1 top-10 latency (p50/p99) on the CPU: routed at fixed routes
    vs the max route vs dense PyTorch vs the masked formulation."""
    smoke = ctx.args.level == "smoke"
    calls = {"smoke": 3, "quick": 30}.get(ctx.args.level, 150)
    rows = []
    for target in ((9,) if smoke else (9, pt["seq_len"])):
        items, n_items = _beauty_user(target)
        if items is None:
            g = torch.Generator().manual_seed(target)
            n_items = 12101
            items = torch.randint(1, n_items + 1, (target,), generator=g).tolist()
        model = _serving_model(n_items)
        fns, note = _serving_fns(model, items, n_items)
        # the max-size providers must agree on the recommendation
        tops = {n: _top_ids(f()) for n, f in fns.items() if "max" in n}
        agree = len({tuple(t) for t in tops.values()}) == 1
        if not agree:
            print(f"    warning: max-route top-10s differ: {tops}", flush=True)
        for name, fn in fns.items():
            lat = timing.latencies(fn, calls, warmup=1 if smoke else 5)
            rows.append(dict(pt, provider=name, seq_len=len(items), **lat,
                             median_ms=lat["p50_ms"], note=note, max_top10_agree=agree))
    return rows, {}, {}


def _top_ids(r):
    """Item ids of a top-k result (a topk namedtuple or recommend()'s tuple)."""
    ids = r.indices if hasattr(r, "indices") else r[0]
    return ids.reshape(-1).tolist()


def _serving_fns(model, items, n_items):
    x = torch.tensor([items], dtype=torch.int64)
    lengths = torch.tensor([len(items)])
    fns = {}
    if model is not None:
        cfg = model.cfg
        table = cfg.routes()
        picks = {"routed (64,64,2)": (64, 64, 2), "routed (96,96,4)": (96, 96, 4),
                 "routed max (128,128,8)": (128, 128, 8)}
        for name, r in picks.items():
            rid = torch.tensor([table.index(r)])
            fns[name] = (lambda rid=rid: model.recommend(x, lengths, k=10, routes=rid))
        rmax = torch.tensor([cfg.max_route])
        fns["masked max"] = (lambda: model.recommend(x, lengths, k=10, routes=rmax,
                                                     path="masked"))
        net = model.net
        Wd = {"D": cfg.D, "ratio": cfg.ffn_ratio, "heads": cfg.num_heads,
              "layers": [{k: v.detach() for k, v in dict(lay.named_parameters()).items()}
                         for lay in net.layers]}
        emb, pos_emb = net.item_emb.weight.detach(), net.pos_emb.weight.detach()
        w_p, b_p = net.w_p.detach(), net.b_p.detach()
        w_out, b_out = net.w_out.detach(), net.b_out.detach()
        note = "canet_kernels.model.CANet (random init), recommend(); dense: same weights"
    else:
        g = torch.Generator().manual_seed(0)
        Wd = P.make_weights(D, LAYERS, RATIO, HEADS)
        emb = torch.randn(n_items + 1, D, generator=g) * 0.02
        pos_emb = torch.randn(50, D, generator=g) * 0.02
        w_p, b_p = torch.randn(D, D, generator=g) * D ** -0.5, torch.zeros(D)
        w_out, b_out = torch.randn(n_items + 1, D, generator=g) * 0.02, torch.zeros(n_items + 1)
        note = "backbone + item table (canet_kernels.model not importable)"
        cu, cu1 = torch.tensor([0, len(items)]), torch.tensor([0, 1])
        canet = P.Canet()
        for name, (w, dpt) in {"routed (64,2)": (64, 2), "routed (96,4)": (96, 4),
                               "routed max (128,8)": (128, 8)}.items():
            def routed(w=w, dpt=dpt):
                with torch.inference_mode():
                    wt = torch.tensor([w])
                    h = emb[x[0]] + pos_emb[:len(items)]
                    h = P.CF.sliced_linear(h, cu, wt, wt, w_p, b_p)
                    b = P.Batch(h[None], lengths, wt, torch.tensor([dpt]))
                    out, _ = canet.forward(Wd, b)
                    s = P.CF.sliced_linear(out[-1:], cu1, wt,
                                           torch.tensor([n_items + 1]), w_out, b_out)
                    s[:, 0] = -math.inf
                    return s.topk(10)
            fns[name] = routed
    dense = P.Dense()

    def dense_fn():
        with torch.inference_mode():
            h = _linear(emb[x[0]] + pos_emb[:len(items)], w_p, b_p)
            b = P.Batch(h[None], lengths, torch.tensor([D]), torch.tensor([LAYERS]))
            out = dense.forward(Wd, b)
            s = _linear(out[0, -1:], w_out, b_out)
            s[:, 0] = -math.inf
            return s.topk(10)
    fns["dense PyTorch (max)"] = dense_fn
    return fns, note


def _linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


def run_memory(ctx, pt, budget):
    """Peak memory of one training step per provider (no timing)."""
    dtype = DTYPES[pt["dtype"]]
    W = P.trainable(ctx.W(dtype))
    widths, depths = ctx.routes(pt["batch"], pt["mix"])
    batch = P.make_batch(widths, depths, pt["seq_len"], D, dtype=dtype, device=ctx.device)
    names = ["dense", "canet-cpu"] if ctx.args.level == "smoke" else None
    provs, skipped = ctx.providers(names)
    rows, methods = [], {}
    dense_mb = None
    for name, p in provs.items():
        P.train_step(p, W, batch)                     # grads allocated, warm
        b, method = timing.peak_memory_bytes(lambda p=p: P.train_step(p, W, batch),
                                             ctx.device)
        methods[name] = method
        mb = b / 2 ** 20
        if name == "dense":
            dense_mb = mb
        rows.append(dict(pt, provider=name, peak_mb=mb, memory_method=method))
    fl = FL.backbone_flops(batch.lengths.cpu(), widths, depths)
    fd = FL.dense_flops(pt["batch"], pt["seq_len"], D, LAYERS)
    for r in rows:
        r["flop_ratio"] = fl / fd
        r["peak_over_dense"] = r["peak_mb"] / dense_mb if dense_mb else None
    return rows, skipped, methods


RUNNERS = {"model": run_model, "ops": run_op, "padding": run_padding,
           "serving": run_serving, "memory": run_memory}


# --------------------------------------------------------------- output ----

CSV_FIELDS = ["section", "op", "mode", "device", "dtype", "batch", "seq_len", "mix",
              "provider", "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "iqr_pct",
              "samples", "flop_ratio", "time_over_dense", "realized_over_theory",
              "gflops", "gbps", "peak_mb", "peak_over_dense", "padded_over_packed",
              "p50_ms", "p99_ms", "error"]


def write_results(out_dir, device, doc):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"results_{device}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    m = doc["machine"]
    fixed = {"machine": timing.machine_name(m), "torch": m["torch"],
             "triton": m.get("triton"), "canet_commit": m["canet_commit"]}
    with open(os.path.join(out_dir, f"results_{device}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + list(fixed), extrasaction="ignore")
        w.writeheader()
        for r in doc["rows"]:
            w.writerow({**{k: _fmt_csv(r.get(k)) for k in CSV_FIELDS}, **fixed})
    return path


def _fmt_csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plot(out_dir, device, rows):
    """time vs batch (model forward, seq 50, uniform, fp32) per provider, and
    realized time ratio vs the FLOP ratio over every model point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    sel = [r for r in rows if r["section"] == "model" and r["mode"] == "fwd"
           and r["seq_len"] == 50 and r["mix"] == "uniform" and r["dtype"] == "fp32"
           and r.get("median_ms")]
    if sel:
        fig, ax = plt.subplots(figsize=(6, 4))
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["batch"], r["median_ms"]) for r in sel if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (samples of 50 tokens)")
        ax.set_ylabel("median ms")
        ax.set_title(f"backbone forward, uniform routes, fp32 ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        f = os.path.join(out_dir, f"time_vs_batch_{device}.png")
        fig.tight_layout()
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f)
    sel = [r for r in rows if r["section"] == "model" and r.get("time_over_dense")
           and r["provider"] != "dense"]
    if sel:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for prov in sorted({r["provider"] for r in sel}):
            pts = [(r["flop_ratio"], r["time_over_dense"]) for r in sel
                   if r["provider"] == prov]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=prov, s=18)
        hi = max(1.05, max(r["time_over_dense"] for r in sel) * 1.05)
        ax.plot([0, 1.05], [0, 1.05], "k--", lw=1, label="time = FLOPs")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, min(hi, 6))
        ax.set_xlabel("routed FLOP ratio (theory)")
        ax.set_ylabel("time / dense time (realized)")
        ax.set_title(f"realized vs theory, model points ({device})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        f = os.path.join(out_dir, f"realized_vs_theory_{device}.png")
        fig.tight_layout()
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f)
    return files


def _f(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def report(out_dir) -> str:
    """Rewrite OUT/latest.md from every OUT/results_*.json."""
    parts = []
    for path in sorted(glob.glob(os.path.join(out_dir, "results_*.json"))):
        with open(path) as f:
            doc = json.load(f)
        parts.append(_report_one(doc))
    text = "\n\n".join(parts) if parts else "No results yet: run `python -m benchmarks.run`."
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write(text + "\n")
    return text


def _report_one(doc):
    m, rows = doc["machine"], doc["rows"]
    dev = doc["args"]["device"]
    lines = [f"### canet benchmarks on {timing.machine_name(m)}",
             "",
             f"torch {m['torch']}, triton {m.get('triton')}, canet {m['canet_commit']}, "
             f"{doc['args']['level']} sweep, {doc['finished']}; medians of "
             f"{doc['args']['rounds']} interleaved rounds (IQR in %). time/dense: median over "
             "the dense max-size stack's; FLOP ratio: routed / dense FLOPs; "
             "realized/theory = (time/dense) / FLOP ratio.", ""]
    model = [r for r in rows if r["section"] == "model" and r.get("median_ms")]
    provs = [p for p in ("dense", "masked", "loop", "bucket", "canet-cpu", "canet-cuda",
                         "canet-triton") if any(r["provider"] == p for r in model)]
    if model:
        lines += ["**Backbone (8 layers, D 128, 4 heads): median ms (IQR %)**", "",
                  "| mode | dtype | batch x len | mix | FLOP ratio | "
                  + " | ".join(provs) + " | canet realized/theory |",
                  "|" + "---|" * (5 + len(provs) + 1)]
        keys = []
        for r in model:
            k = (r["mode"], r["dtype"], r["batch"], r["seq_len"], r["mix"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            rs = {r["provider"]: r for r in model
                  if (r["mode"], r["dtype"], r["batch"], r["seq_len"], r["mix"]) == k}
            ratio = next(iter(rs.values()))["flop_ratio"]
            cells = [f"{rs[p]['median_ms']:.3g} ({rs[p]['iqr_pct']:.0f}%)" if p in rs else ""
                     for p in provs]
            canet = next((rs[p] for p in ("canet-cuda", "canet-triton", "canet-cpu")
                          if p in rs and rs[p].get("realized_over_theory")), None)
            rot = _f(canet["realized_over_theory"]) + f" ({canet['provider']})" if canet else ""
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} x {k[3]} | {k[4]} | {ratio:.3f} | "
                         + " | ".join(cells) + f" | {rot} |")
        lines.append("")
    ops = [r for r in rows if r["section"] == "ops" and r.get("median_ms")]
    if ops:
        oprov = [p for p in ("dense", "masked", "loop", "bucket", "canet-cpu", "canet-cuda",
                             "canet-triton") if any(r["provider"] == p for r in ops)]
        lines += ["**Ops: median ms**", "",
                  "| op | mode | dtype | batch x len | " + " | ".join(oprov) + " |",
                  "|" + "---|" * (4 + len(oprov))]
        keys = []
        for r in ops:
            k = (r["op"], r["mode"], r["dtype"], r["batch"], r["seq_len"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            rs = {r["provider"]: r for r in ops
                  if (r["op"], r["mode"], r["dtype"], r["batch"], r["seq_len"]) == k}
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} x {k[4]} | " + " | ".join(
                f"{rs[p]['median_ms']:.3g}" if p in rs else "" for p in oprov) + " |")
        lines.append("")
    pad = [r for r in rows if r["section"] == "padding" and r.get("median_ms")]
    if pad:
        r0 = pad[0]
        lines += [f"**Padding ({r0['lengths_source']}, batch {r0['batch']}, mean length "
                  f"{r0['mean_len']:.1f}, max {r0['max_len']}, uniform routes, forward)**",
                  "", "| provider | median ms | padded / packed |", "|---|---|---|"]
        for r in pad:
            lines.append(f"| {r['provider']} | {r['median_ms']:.3g} | "
                         f"{_f(r.get('padded_over_packed'))} |")
        lines.append("")
    srv = [r for r in rows if r["section"] == "serving"]
    if srv:
        lines += ["**Serving: one user's top-10 (batch 1, CPU)**", "",
                  "| history length | provider | p50 ms | p99 ms |", "|---|---|---|---|"]
        for r in srv:
            lines.append(f"| {r['seq_len']} | {r['provider']} | {r['p50_ms']:.3g} | "
                         f"{r['p99_ms']:.3g} |")
        lines.append("")
    mem = [r for r in rows if r["section"] == "memory"]
    if mem:
        r0 = mem[0]
        lines += [f"**Peak memory of a training step (batch {r0['batch']} x "
                  f"{r0['seq_len']}, {r0['mix']} routes, FLOP ratio {r0['flop_ratio']:.3f}; "
                  f"{r0['memory_method']})**", "",
                  "| provider | peak MB | / dense |", "|---|---|---|"]
        for r in mem:
            lines.append(f"| {r['provider']} | {r['peak_mb']:.1f} | "
                         f"{_f(r.get('peak_over_dense'))} |")
        lines.append("")
    if doc.get("skipped"):
        lines.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in doc["skipped"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------ main ----

def parse(argv=None):
    ap = argparse.ArgumentParser(description="canet benchmark suite")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    lv = ap.add_mutually_exclusive_group()
    lv.add_argument("--quick", action="store_true", help="< 2 minutes")
    lv.add_argument("--smoke", action="store_true", help="seconds; CI")
    lv.add_argument("--full", action="store_true", help="large points too (opt-in)")
    ap.add_argument("--sections", default="model,ops,padding,serving,memory")
    ap.add_argument("--providers", default=",".join(P.OP_PROVIDERS))
    ap.add_argument("--dtypes", default=None,
                    help="keep only points of these dtypes (comma list)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-sample-s", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new points after this many seconds")
    ap.add_argument("--mix-json", default=None,
                    help="route distribution of a trained router (see "
                         "providers.load_route_mix); default: a documented skewed mix")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip per-point peak memory")
    ap.add_argument("--report", action="store_true", help="only rewrite OUT/latest.md")
    a = ap.parse_args(argv)
    a.level = "smoke" if a.smoke else "quick" if a.quick else "full" if a.full else "default"
    a.providers = [p.strip() for p in a.providers.split(",") if p.strip()]
    gpu = a.device == "cuda"
    if a.rounds is None:
        a.rounds = {"smoke": 3, "quick": 5}.get(a.level, 7)
    if a.min_sample_s is None:
        a.min_sample_s = 0.0 if a.level == "smoke" else (0.01 if gpu else 0.05)
    if a.budget_s is None:
        # the GPU check gives the suite 150 s, startup and compiles included
        a.budget_s = {"smoke": 120, "quick": 100}.get(a.level, 100 if gpu else 540)
        if a.level == "full":
            a.budget_s = 7200
    if a.level in ("smoke", "quick"):
        a.no_memory = True          # the memory section still runs
    if a.smoke:
        a.warmup = 1
        # tiny ops: a second OpenMP thread only adds barrier waits (CI is shared)
        a.threads = a.threads or 1
    return a


def main(argv=None):
    a = parse(argv)
    if a.report:
        print(report(a.out))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    alloc = timing.pin_malloc() if a.device == "cpu" else "n/a"
    ctx = Ctx(a)
    sections = set(a.sections.split(","))
    pts = [p for p in sweep(a.device, a.level) if p["section"] in sections]
    if a.dtypes:
        keep = set(a.dtypes.split(","))
        pts = [p for p in pts if p["dtype"] in keep]
    info = timing.machine_info(a.device)
    print(f"canet benchmarks: {timing.machine_name(info)}; torch {info['torch']}, "
          f"triton {info['triton']}, canet {info['canet_commit']}; {a.level} sweep, "
          f"{len(pts)} points, budget {a.budget_s:.0f} s; {alloc}", flush=True)
    t0 = time.perf_counter()
    rows, skipped, not_run, methods = [], {}, [], {}

    def doc(state):
        return {"machine": info, "args": vars(a), "allocator": alloc,
                "finished": time.strftime("%Y-%m-%d %H:%M"),
                "state": state, "seconds": time.perf_counter() - t0,
                "mix_trained": ctx.mix_source, "memory_methods": sorted(set(methods.values())),
                "flop_convention": FL.__doc__, "skipped": skipped, "not_run": not_run,
                "rows": rows}

    # A caller's `timeout` sends SIGTERM: keep what was measured.
    signal.signal(signal.SIGTERM, _stop)
    state = "complete"
    try:
        for i, pt in enumerate(pts):
            left = a.budget_s - (time.perf_counter() - t0)
            if left <= 0:
                not_run.append(pt)
                continue
            pt = dict(pt, device=a.device)
            t1 = time.perf_counter()
            try:
                r, sk, me = RUNNERS[pt["section"]](ctx, pt, min(left, a.budget_s / 4))
                skipped.update(sk)
                methods.update(me)
            except Exception as exc:  # noqa: BLE001  one bad point must not end the run
                r = [dict(pt, provider="*", error=f"{type(exc).__name__}: {exc}")]
                traceback.print_exc()
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
            rows += r
            _print_point(i, len(pts), pt, r, time.perf_counter() - t1)
            write_results(a.out, a.device, doc("partial"))
    except (KeyboardInterrupt, _Stopped):
        state = "interrupted"
        print("interrupted: writing what was measured", flush=True)
    if not_run:
        print(f"time budget spent: {len(not_run)} points not run", flush=True)
    path = write_results(a.out, a.device, doc(state))
    files = plot(a.out, a.device, rows)
    report(a.out)
    print(f"wrote {path}, {', '.join(os.path.basename(f) for f in files + [path[:-4] + 'csv'])} and "
          f"{os.path.join(a.out, 'latest.md')} in {time.perf_counter() - t0:.0f} s")
    return 0


class _Stopped(BaseException):
    pass


def _stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Stopped()


def _print_point(i, n, pt, rows, secs):
    head = (f"[{i + 1}/{n}] {pt['section']} {pt['op'] if pt['section'] == 'ops' else ''} "
            f"{pt['mode']} {pt['dtype']} B={pt['batch']} n={pt['seq_len']} {pt['mix']} "
            f"({secs:.1f} s)")
    print(head.replace("  ", " "), flush=True)
    for r in rows:
        if r.get("error"):
            print(f"    ERROR {r['error']}")
            continue
        parts = [f"    {r['provider']:<24}"]
        if r.get("p99_ms") is not None:
            parts.append(f"p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms")
        elif r.get("median_ms") is not None:
            parts.append(f"{r['median_ms']:10.3f} ms ±{r.get('iqr_pct', 0):4.0f}%")
        if r.get("time_over_dense") is not None:
            parts.append(f"  /dense {r['time_over_dense']:.3f}")
        if r.get("realized_over_theory") is not None:
            parts.append(f"  real/theory {r['realized_over_theory']:.2f}")
        if r.get("padded_over_packed") is not None:
            parts.append(f"  padded/packed {r['padded_over_packed']:.2f}")
        if r.get("peak_mb") is not None:
            parts.append(f"  peak {r['peak_mb']:.1f} MB")
        if r.get("peak_over_dense") is not None:
            parts.append(f"  /dense {r['peak_over_dense']:.2f}")
        print("".join(parts))


if __name__ == "__main__":
    sys.exit(main())
