"""Serving latency: one user's top-10 on the CPU, every provider side by side.

    python benchmarks/bench_serving.py                # default: 300 requests, 4-client load
    python benchmarks/bench_serving.py --smoke        # seconds (CI): tiny model, no compile
    python benchmarks/bench_serving.py --mix trained  # the suite's documented skewed mix

One request = one user's history of 50 items (a Beauty user when
../shared/data/Beauty.txt is there, else random ids) against Beauty's item
table (12,101 items), top-10 with the history's items excluded. Providers:

  dense eager        the max-size model (emb 128, hidden 128, 8 layers, same
                     weights as CANet's max route) in plain PyTorch: F.linear,
                     F.scaled_dot_product_attention, F.layer_norm
  dense compile-*    the same function through torch.compile (each mode)
  dense aoti         the same exported and compiled by AOTInductor (extra)
  canet-model *      CANet.recommend, the model's batched path (before)
  canet eager *      canet_kernels.serving.Recommender (router included)
  canet aoti *       canet_kernels.serving.CompiledRecommender on the package
                     of Recommender.export (router included)

Routes: `smallest` (64, 64, 2), `max` (128, 128, 8), a `mix` (each request
draws its route from the distribution the CANet router produced on Beauty,
benchmarks/results/accuracy/beauty_s*_rezero.json, unless --mix says
otherwise) and `router` (the untrained router's own pick). The router always
runs: for a fixed route, its output layer is pinned to that route (a
per-route copy of the router head), so the request is the production path.

Timing: the providers alternate request by request in one process
(each request timed alone), after a warm-up; p50 / p99 over --requests.
Load: --clients threads send requests back to back; throughput and per-request
p50 / p99, the providers alternating in rounds. The machine's load average
is recorded before and after. JSON to benchmarks/results/serving/.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import providers as P  # noqa: E402
from benchmarks import timing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEAUTY = os.path.join(ROOT, "..", "shared", "data", "Beauty.txt")
BEAUTY_ROUTES = [os.path.join(HERE, "results", "accuracy", f"beauty_s{s}_rezero.json")
                 for s in (0, 1)]
OUT = os.path.join(HERE, "results", "serving")


# ----------------------------------------------------------------- inputs --

def beauty_history(n=50, n_items_default=12101, seed=0):
    """(history of n ids, n_items, source): the last n items of the first
    Beauty user with at least n, else random ids."""
    if os.path.exists(BEAUTY):
        best, n_items = None, 0
        with open(BEAUTY) as f:
            for line in f:
                items = [int(v) for v in line.split()[1:]]
                if items:
                    n_items = max(n_items, max(items))
                    if best is None and len(items) >= n:
                        best = items[-n:]
        if best is not None:
            return best, n_items, "Beauty.txt (first user with >= 50 items)"
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, n_items_default + 1, (n,), generator=g).tolist(),
            n_items_default, "random ids")


def route_mix(name, cfg):
    """({route id: share}, description) over cfg.routes()."""
    table = cfg.routes()
    if name == "beauty":
        counts = [0] * cfg.num_routes
        used = []
        for path in BEAUTY_ROUTES:
            if os.path.exists(path):
                with open(path) as f:
                    rc = json.load(f)["datasets"]["Beauty"]["canet"]["test"]["route_counts"]
                counts = [a + b for a, b in zip(counts, rc)]
                used.append(os.path.relpath(path, ROOT))
        if sum(counts) == 0:
            raise SystemExit("--mix beauty: no route counts found; use --mix trained")
        mix = {r: c for r, c in enumerate(counts) if c}
        desc = "CANet on Beauty (test users, seeds 0 and 1 pooled): " + ", ".join(used)
    elif name == "trained":
        mix = {}
        for (d, depth), p in P.DEFAULT_TRAINED_MIX.items():
            mix[table.index((d, d, depth))] = p
        desc = "providers.DEFAULT_TRAINED_MIX (hidden, depth), emb width = hidden width"
    else:
        with open(name) as f:
            rc = json.load(f)["route_counts"]
        mix = {r: c for r, c in enumerate(rc) if c}
        desc = f"route counts of {name}"
    total = sum(mix.values())
    return {r: c / total for r, c in mix.items()}, desc


# ------------------------------------------------------------------ dense --

class DenseServing(nn.Module):
    """The max-size model (CANet's max route, same weights) in plain
    PyTorch: one user's history [T] and seen ids [S] -> top-k (ids, scores)."""

    def __init__(self, model, k=10, last_row=False):
        super().__init__()
        net, cfg = model.net, model.cfg
        self.net, self.k, self.last_row = net, k, last_row
        self.heads, self.ratio, self.eps = cfg.num_heads, cfg.ffn_ratio, cfg.ln_eps
        self.D = cfg.D

    def forward(self, items, seen):
        net, D = self.net, self.D
        T = items.shape[0]
        h = F.embedding(items, net.item_emb.weight) + net.pos_emb.weight[:T]
        h = F.linear(h, net.w_p, net.b_p)[None]                            # [1, T, D]
        for l, layer in enumerate(net.layers):
            p = layer.params()
            s = layer.res_scale
            if self.last_row and l == len(net.layers) - 1:
                # reference: the last layer at the last position only
                a, h = self._last_query_attention(h, p), h[:, T - 1:]
            else:
                a = P.padded_attention(h, p, D, self.heads)
            a = a if s is None else a * s[0]
            h = F.layer_norm(a + h, (D,), p["ln1_w"], p["ln1_b"], self.eps)
            f = P.ffn(h, p, D, self.ratio)
            f = f if s is None else f * s[1]
            h = F.layer_norm(f + h, (D,), p["ln2_w"], p["ln2_b"], self.eps)
        scores = F.linear(h[0, -1], net.out_weight, net.b_out)             # [n + 1]
        mask = torch.zeros_like(scores, dtype=torch.bool).index_fill(0, seen, True)
        mask[0] = True
        top = scores.masked_fill(mask, float("-inf")).topk(self.k)
        return top.indices, top.values


    def _last_query_attention(self, h, p):
        """Attention of the last position over all T positions, [1, 1, D]."""
        D, H = self.D, self.heads
        T = h.shape[1]
        w, b = p["w_qkv"].reshape(3 * D, D), p["b_qkv"].reshape(3 * D)
        q = F.linear(h[:, T - 1:], w[:D], b[:D]).view(1, 1, H, D // H).transpose(1, 2)
        kv = F.linear(h, w[D:], b[D:]).view(1, T, 2, H, D // H).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, kv[0], kv[1])             # [1, H, 1, hd]
        return F.linear(ctx.transpose(1, 2).reshape(1, 1, D), p["w_o"], p["b_o"])


def pinned(model, route):
    """A copy of `model` (parameters shared) whose router always picks
    `route`: the router still runs in full, only its output layer differs."""
    head = model.router.head
    memo = {id(p): p for n, p in model.named_parameters() if not n.startswith("router.head")}
    memo.update({id(b): b for n, b in model.named_buffers() if n != "cost_bias"})
    m = copy.deepcopy(model, memo)
    with torch.no_grad():
        m.router.head.weight.zero_()
        m.router.head.bias.fill_(-1e4)
        m.router.head.bias[route] = 1e4
        m.cost_bias.zero_()
    assert m.router.head is not head
    return m


# ----------------------------------------------------------------- timing --

def pct(ts, p):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(round(p / 100 * (len(ts) - 1))))]


def summary(ts):
    return {"p50_ms": pct(ts, 50), "p90_ms": pct(ts, 90), "p99_ms": pct(ts, 99),
            "mean_ms": statistics.fmean(ts), "min_ms": min(ts), "max_ms": max(ts),
            "requests": len(ts)}


def latencies(fns: dict, n: int, warmup: int, burst: int = 1) -> dict:
    """Each fn(i) once per request i, providers alternating every `burst`
    requests (the start rotating every turn), every call timed alone.
    burst=1: every request follows other providers' (cold caches, the
    worst case); a larger burst is nearer a server that runs one model.
    name -> summary."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    ts = {name: [] for name in names}
    for t in range(0, n, burst):
        for j in range(len(names)):
            name = names[(t // burst + j) % len(names)]
            for i in range(t, min(n, t + burst)):
                t0 = time.perf_counter()
                fns[name](i)
                ts[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summary(v) for name, v in ts.items()}


def load(fns: dict, clients: int, per_client: int, rounds: int) -> dict:
    """`clients` threads, each sending `per_client` requests back to back;
    the providers alternate round by round. name -> throughput and latency."""
    out = {name: {"ts": [], "wall": 0.0, "n": 0} for name in fns}
    for fn in fns.values():
        fn(0)
    # an untimed round first: torch.compile'd functions guard on the thread
    # count (GLOBAL_STATE) and recompile once when the load test changes it
    for r in range(-1, rounds):
        for name, fn in (list(fns.items())[r % len(fns):] + list(fns.items())[:r % len(fns)]):
            ts = [[] for _ in range(clients)]
            errors = []
            start = threading.Barrier(clients + 1)

            def client(c, fn=fn):
                try:
                    start.wait()
                    for i in range(per_client):
                        t0 = time.perf_counter()
                        fn(c * per_client + i)
                        ts[c].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            start.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                raise errors[0]
            if r < 0:
                continue
            o = out[name]
            o["ts"] += [x for c in ts for x in c]
            o["wall"] += wall
            o["n"] += clients * per_client
    return {name: dict(summary(o["ts"]), throughput_rps=o["n"] / o["wall"], clients=clients)
            for name, o in out.items()}


# ------------------------------------------------------------------- main --

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1,
                    help="consecutive requests per provider before the next one's turn "
                         "(1: every request after other providers', cold caches)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--mix", default="beauty",
                    help="beauty (default), trained, or a route-stats --json file")
    ap.add_argument("--extra-mix", default="trained",
                    help="a second mix also measured ('' for none)")
    ap.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs",
                    help="torch.compile modes of the dense model ('' for none)")
    ap.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor packages")
    ap.add_argument("--variants", default="plain,ops",
                    help="export variants of the CANet package (serving.VARIANTS)")
    ap.add_argument("--no-last-row-dense", dest="last_row_dense", action="store_false",
                    help="skip the reference dense model computing its last layer at the "
                         "last position only")
    ap.add_argument("--package-dir", default=None,
                    help="where the AOTI packages go (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true",
                    help="use the packages already in --package-dir (checked against the "
                         "eager path on every route measured)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--load-threads", type=int, default=None,
                    help="torch intra-op threads during the load test (default: --threads)")
    ap.add_argument("--load-requests", type=int, default=25,
                    help="requests per client per round of the load test")
    ap.add_argument("--load-rounds", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few requests (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: results/serving/)")
    return ap.parse_args(argv)


def build(a):
    from canet_kernels.model import CANet, CANetConfig
    from canet_kernels.serving import CompiledRecommender, Recommender
    torch.manual_seed(a.seed)
    if a.smoke:
        history, n_items, source = list(range(3, 23)), 300, "smoke: ids 3..22"
        cfg = CANetConfig(n_items=n_items, max_len=20, emb_widths=(16, 32),
                          hidden_widths=(16, 32), depths=(1, 2), num_heads=2)
    else:
        history, n_items, source = beauty_history()
        cfg = CANetConfig(n_items=n_items, max_len=50)
    model = CANet(cfg).eval()
    with torch.no_grad():  # trained models have non-trivial residual scales
        for layer in model.net.layers:
            layer.res_scale.fill_(1.0)
    table = cfg.routes()
    smallest, largest = 0, cfg.max_route
    mixes = {}
    for name in [a.mix] + ([a.extra_mix] if a.extra_mix and a.extra_mix != a.mix else []):
        if a.smoke and name in ("beauty", "trained"):
            mixes[name] = ({r: 1 / cfg.num_routes for r in range(cfg.num_routes)},
                           "smoke: uniform over routes")
        else:
            mixes[name] = route_mix(name, cfg)
    routes_needed = {smallest, largest} | {r for m, _ in mixes.values() for r in m}
    free = Recommender(model)
    # one Recommender's weights for every route, as in production; only the
    # router's output layer differs
    recs = {}
    for r in sorted(routes_needed):
        recs[r] = copy.copy(free)
        recs[r].model = pinned(model, r)
    dense = DenseServing(model, a.k).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    rng = random.Random(a.seed)
    n_req = a.requests + a.warmup + a.clients * a.load_requests * 2
    draws = {name: rng.choices(list(m), weights=list(m.values()), k=n_req)
             for name, (m, _) in mixes.items()}
    hist_t = torch.tensor(history)
    items_in = torch.tensor([history[-cfg.max_len:]])
    lengths = torch.tensor([items_in.shape[1]])

    fns, notes = {}, {}

    def dense_fn(f):
        def run(i):
            with torch.inference_mode():
                return f(hist_t[-cfg.max_len:], hist_t)
        return run
    fns["dense eager"] = dense_fn(dense)
    for mode in [m for m in a.compile_modes.split(",") if m]:
        t0 = time.perf_counter()
        comp = torch.compile(dense, mode=None if mode == "default" else mode, dynamic=False)
        fns[f"dense compile-{mode}"] = dense_fn(comp)
        with torch.inference_mode():
            comp(hist_t[-cfg.max_len:], hist_t)
        notes[f"dense compile-{mode}"] = f"compiled in {time.perf_counter() - t0:.0f} s"
    if a.last_row_dense:
        # reference, not the anchor: the dense model with the serving path's
        # last-layer trick (last position only)
        dense_lr = DenseServing(model, a.k, last_row=True).eval()
        fns["dense-last-row eager"] = dense_fn(dense_lr)
        mode = a.compile_modes.split(",")[0] if a.compile_modes else ""
        if mode:
            comp = torch.compile(dense_lr, mode=None if mode == "default" else mode,
                                 dynamic=False)
            fns[f"dense-last-row compile-{mode}"] = dense_fn(comp)
    with torch.inference_mode():
        for rid, name in ((smallest, "smallest"), (largest, "max")):
            fns[f"canet-model {name}"] = (
                lambda i, rid=torch.tensor([rid]): model.recommend(
                    items_in, lengths, a.k, routes=rid, mask_seen=True))
    fns["canet eager smallest"] = lambda i: recs[smallest].recommend(history, a.k)
    fns["canet eager max"] = lambda i: recs[largest].recommend(history, a.k)
    for name in mixes:
        fns[f"canet eager mix-{name}"] = (
            lambda i, d=draws[name]: recs[d[i]].recommend(history, a.k))
    fns["canet eager router"] = lambda i: free.recommend(history, a.k)

    packages = {}
    if not a.no_aoti:
        import tempfile
        pdir = a.package_dir or tempfile.mkdtemp(prefix="canet-serving-")
        for variant in [v for v in a.variants.split(",") if v]:
            t0 = time.perf_counter()
            path = os.path.join(pdir, f"canet_{variant}.pt2")
            tag = f"canet aoti-{variant}"
            if a.reuse and os.path.exists(path):
                notes[tag] = f"reused {path}"
            else:
                free.export(path, k=a.k, variant=variant)
                notes[tag] = (f"exported and compiled in {time.perf_counter() - t0:.0f} s, "
                              f"{os.path.getsize(path) / 2**20:.0f} MiB")
            crec = CompiledRecommender(path)
            for r in sorted(routes_needed):  # same model, same answers (a stale package fails)
                want, got = free.recommend(history, a.k, route=r), crec.recommend(
                    history, a.k, route=r)
                if want.items != got.items:
                    raise SystemExit(f"{tag}: route {r}: {got.items} != eager {want.items}")
            packages[tag] = path
            fns[f"{tag} smallest"] = (
                lambda i, c=crec: c.recommend(history, a.k, route=smallest))
            fns[f"{tag} max"] = lambda i, c=crec: c.recommend(history, a.k, route=largest)
            for name in mixes:
                fns[f"{tag} mix-{name}"] = (
                    lambda i, c=crec, d=draws[name]: c.recommend(history, a.k, route=d[i]))
            fns[f"{tag} router"] = lambda i, c=crec: c.recommend(history, a.k)
        t0 = time.perf_counter()
        dpath = os.path.join(pdir, "dense.pt2")
        if not (a.reuse and os.path.exists(dpath)):
            T = torch.export.Dim("T", min=1, max=cfg.max_len)
            S = torch.export.Dim("S", min=1, max=1 << 20)
            with torch.no_grad():
                ep = torch.export.export(dense, (hist_t[-cfg.max_len:], hist_t),
                                         dynamic_shapes=({0: T}, {0: S}), strict=False)
            torch._inductor.aoti_compile_and_package(ep, package_path=dpath)
        drun = torch._inductor.aoti_load_package(dpath)
        packages["dense"] = dpath
        notes["dense aoti"] = f"exported and compiled in {time.perf_counter() - t0:.0f} s"
        lock, items_t = threading.Lock(), hist_t[-cfg.max_len:].contiguous()

        def dense_aoti(i):  # as CompiledRecommender: one runner, calls take turns
            with torch.inference_mode(), lock:
                return drun(items_t, hist_t)
        fns["dense aoti"] = dense_aoti
    info = dict(cfg=cfg, table=table, mixes=mixes, draws=draws, history=history,
                source=source, notes=notes, packages=packages, recs=recs,
                dense=dense, smallest=smallest, largest=largest)
    return fns, info


def check(fns, info, k):
    """The max-size providers recommend the same items (dense and CANet's
    max route share weights), and every provider returns k items."""
    def ids(r):
        if hasattr(r, "items"):
            return r.items
        return r[0].reshape(-1).tolist() if isinstance(r, tuple) else r[0][0].tolist()
    tops = {}
    for name, fn in fns.items():
        with torch.inference_mode():
            out = fn(0)
        got = ids(out)
        if len(got) != k:
            raise SystemExit(f"{name}: {len(got)} items, expected {k}")
        if name.startswith("dense") or name.endswith(" max"):
            tops[name] = got
    if len({tuple(t) for t in tops.values()}) != 1:
        raise SystemExit(f"max-size providers disagree: {tops}")
    return next(iter(tops.values()))


def main(argv=None):
    a = parse(argv)
    if a.smoke:
        a.requests, a.warmup, a.load_requests, a.load_rounds = 5, 1, 2, 1
        a.compile_modes, a.no_aoti = "", True
    torch.set_num_threads(a.threads)
    alloc = timing.pin_malloc()
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    fns, info = build(a)
    cfg = info["cfg"]
    top = check(fns, info, a.k)
    mi = timing.machine_info()
    print(f"serving benchmark: {timing.machine_name(mi)}; torch {mi['torch']}, canet "
          f"{mi['canet_commit']}; {cfg.n_items} items, history {len(info['history'])} "
          f"({info['source']}), top-{a.k}; {alloc}; load before {load_before}", flush=True)
    for name, (mix, desc) in info["mixes"].items():
        ratio = sum(p * cfg.route_flop_ratios()[r] for r, p in mix.items())
        print(f"  mix-{name}: {desc}; mean FLOP ratio {ratio:.3f}; routes "
              + ", ".join(f"{info['table'][r]} {p:.0%}" for r, p in mix.items()), flush=True)
    lat = latencies(fns, a.requests, a.warmup, a.burst)
    load_mid = os.getloadavg()
    load_names = [n for n in fns if n in ("dense eager", "dense aoti")
                  or n.startswith("dense compile")
                  or n.startswith("canet ")
                  and (n.endswith(" max") or n.endswith("mix-" + a.mix))]
    torch.set_num_threads(a.load_threads or a.threads)
    conc = load({n: fns[n] for n in load_names}, a.clients, a.load_requests, a.load_rounds)
    torch.set_num_threads(a.threads)
    load_after = os.getloadavg()

    dense_names = [n for n in lat if n == "dense eager" or n.startswith("dense compile")]
    anchor = min(dense_names, key=lambda n: lat[n]["p50_ms"])
    fastest_any = min([n for n in lat if n.startswith("dense")],
                      key=lambda n: lat[n]["p50_ms"])
    ratios = cfg.route_flop_ratios()

    def flop(name):
        if name.endswith("smallest"):
            return ratios[info["smallest"]]
        if name.endswith(" max") or name.startswith("dense"):
            return 1.0
        for mname, (mix, _) in info["mixes"].items():
            if name.endswith("mix-" + mname):
                return sum(p * ratios[r] for r, p in mix.items())
        return None

    targets = {"mix": 0.5, "smallest": 0.25, "max": 1.0}
    rows = []
    for name, s in lat.items():
        row = dict(provider=name, **s, flop_ratio=flop(name),
                   p50_over_dense=s["p50_ms"] / lat[anchor]["p50_ms"],
                   p50_over_fastest_dense=s["p50_ms"] / lat[fastest_any]["p50_ms"])
        kind = ("smallest" if name.endswith("smallest") else "max" if name.endswith(" max")
                else "mix" if name.endswith("mix-" + a.mix) else None)
        if name.startswith("canet ") and kind:
            row["target"] = targets[kind]
            row["meets_target"] = row["p50_over_dense"] <= targets[kind]
        rows.append(row)
    doc = {"machine": mi, "allocator": alloc, "args": vars(a),
           "load_average": {"before": load_before, "after_latency": load_mid,
                            "after_load_test": load_after},
           "finished": time.strftime("%Y-%m-%d %H:%M"),
           "seconds": time.perf_counter() - t_start,
           "n_items": cfg.n_items, "history_len": len(info["history"]),
           "history_source": info["source"], "top_k_max_route": top,
           "mixes": {n: {"description": d, "routes": {str(info["table"][r]): p
                                                      for r, p in m.items()}}
                     for n, (m, d) in info["mixes"].items()},
           "dense_anchor": anchor, "fastest_dense": fastest_any, "notes": info["notes"],
           "latency": rows, "load": conc}
    if a.out:
        out = a.out
    elif a.smoke:  # smoke runs measure nothing worth keeping
        import tempfile
        out = os.path.join(tempfile.gettempdir(), "canet_serving_smoke.json")
    else:
        out = os.path.join(OUT, f"serving_cpu_{a.threads}threads"
                           + (f"_burst{a.burst}" if a.burst > 1 else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(report(doc))
    print(f"written: {out}")
    return 0


def _rounded(xs):
    return tuple(round(x, 2) for x in xs)


def report(doc) -> str:
    a = doc["args"]
    lines = [f"One user, history {doc['history_len']}, {doc['n_items']} items, top-{a['k']}, "
             f"{a['threads']} threads, {a['requests']} requests per provider (interleaved, "
             f"{a['burst']} at a time); "
             f"load average before {_rounded(doc['load_average']['before'])}, "
             f"after {_rounded(doc['load_average']['after_load_test'])}. "
             f"Dense anchor: {doc['dense_anchor']} (fastest of eager and torch.compile); "
             f"fastest dense of any kind: {doc['fastest_dense']}.", "",
             "| provider | FLOP ratio | p50 ms | p99 ms | p50 / dense | p50 / fastest dense "
             "| target (p50 / dense) |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["latency"]:
        tgt = (f"<= {r['target']} ({'met' if r['meets_target'] else 'NOT met'})"
               if "target" in r else "")
        fr = "" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3f}"
        lines.append(f"| {r['provider']} | {fr} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['p50_over_dense']:.3f} | {r['p50_over_fastest_dense']:.3f} | "
                     f"{tgt} |")
    lines += ["", f"Load: {a['clients']} concurrent clients ({a['load_rounds']} rounds x "
              f"{a['load_requests']} requests each, providers alternating; "
              f"{a['load_threads'] or a['threads']} intra-op threads)", "",
              "| provider | requests/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name, r in doc["load"].items():
        lines.append(f"| {name} | {r['throughput_rps']:.0f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
