"""Routed scoring over the item table, canet's chunked ops vs plain PyTorch on
the same batch: a training step (linear + cross-entropy, forward and
backward) and full-ranking top-k evaluation, at several item counts.

    python benchmarks/bench_scoring.py [--items 12000,100000,1000000]
        [--threads 2] [--rounds 5] [--tag run1] [--out benchmarks/results/scoring]

Training batch: `--batch` x `--seq-len` scored positions (256 x 50 = 12800
rows), each sample at a width from `--widths` (64, 96, 128; rows of one
sample share it, the batch route-sorted so equal widths are contiguous, as
canet packs it), hidden size D 128, item table [V, 128] plus a bias, every
position labelled.
  fused: canet.sliced_linear_cross_entropy(h, widths, W, b, targets), backward
  plain: F.cross_entropy(F.linear(h * mask, W, b), targets), backward; h is
         zeroed beyond each row's width, so it is the same loss at full width
Evaluation: `--eval-rows` rows (256), top `--k` (10) with the padding item 0
and `--seen` (50) seen items per row excluded.
  fused: canet.sliced_linear_topk(h, widths, W, b, k, exclude=seen)
  plain: F.linear, scatter -inf into the seen items, torch.topk

Memory: each (case, provider) runs once in a fresh subprocess, which builds
its inputs, runs a small warm-up call (thread pools, BLAS buffers), resets
the kernel's resident-set high-water mark (VmHWM, through
/proc/self/clear_refs) and reports VmHWM after one call minus VmRSS before
it: the peak resident memory the call added, whatever allocated it (torch,
BLAS, the kernels' own buffers). Also reported net of the gradients every
training step returns (grad h, W, b: the same for both providers). Plain runs
only where its estimated peak fits in --mem-limit-gb; the rest are reported
as not run.

Time: providers interleaved in one process (round-robin, the start rotating),
one warm-up call each, median of `--rounds` calls (`--big-rounds` for
training at >= 500k items); glibc's allocator pinned as in the other CPU
benchmarks (benchmarks/timing.pin_malloc).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import timing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="12000,100000,1000000")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--widths", default="64,96,128")
    ap.add_argument("--eval-rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seen", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=4096, help="canet's chunk_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--big-rounds", type=int, default=2,
                    help="rounds of training steps at >= 500k items")
    ap.add_argument("--modes", default="train,eval")
    ap.add_argument("--providers", default="fused,plain")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0,
                    help="run plain only where its estimated peak fits")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scoring"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------- cases --

class Case:
    """Inputs of one (mode, V); the same seed gives the same tensors."""

    def __init__(self, args, mode, V, grad=True):
        g = torch.Generator().manual_seed(args.seed)
        D = args.dim
        choices = torch.tensor([int(w) for w in args.widths.split(",")])
        if mode == "train":
            B, L = args.batch, args.seq_len
        else:
            B, L = args.eval_rows, 1
        per_sample = choices[torch.randint(0, len(choices), (B,), generator=g)]
        per_sample = per_sample.sort().values            # route-sorted batch
        self.widths = per_sample.repeat_interleave(L)
        N = B * L
        self.h = torch.empty(N, D).normal_(generator=g)
        self.W = torch.empty(V, D).normal_(generator=g).mul_(D ** -0.5)
        self.b = torch.empty(V).normal_(generator=g).mul_(0.1)
        self.mask = (torch.arange(D)[None, :] < self.widths[:, None]).float()
        self.targets = torch.randint(1, V, (N,), generator=g)
        seen = torch.randint(1, V, (N, args.seen), generator=g)
        self.exclude = torch.cat([torch.zeros(N, 1, dtype=torch.int64), seen], 1)
        if mode == "train" and grad:
            for t in (self.h, self.W, self.b):
                t.requires_grad_()
        self.mode, self.V, self.N, self.args = mode, V, N, args

    def grad_bytes(self):
        return 4 * (self.h.numel() + self.W.numel() + self.b.numel())


def fused_fn(c):
    op = torch.ops.canet
    if c.mode == "train":
        def step():
            loss = op.sliced_linear_cross_entropy(c.h, c.widths, c.W, c.b, c.targets, -100,
                                                  c.args.chunk)
            loss.backward()
            c.h.grad = c.W.grad = c.b.grad = None
            return loss.detach()
        return step

    def evaluate():
        return op.sliced_linear_topk(c.h, c.widths, c.W, c.b, c.args.k, c.args.chunk,
                                     c.exclude)
    return evaluate


def plain_fn(c):
    if c.mode == "train":
        def step():
            loss = F.cross_entropy(F.linear(c.h * c.mask, c.W, c.b), c.targets)
            loss.backward()
            c.h.grad = c.W.grad = c.b.grad = None
            return loss.detach()
        return step

    def evaluate():
        scores = F.linear(c.h * c.mask, c.W, c.b)
        scores.scatter_(1, c.exclude, float("-inf"))
        top = scores.topk(c.args.k, dim=1)
        return top.values, top.indices
    return evaluate


PROVIDERS = {"fused": fused_fn, "plain": plain_fn}


def plain_estimate(args, mode, V):
    """Bytes plain PyTorch needs beyond its inputs: the [N, V] logits three
    times at once in a training step (log-softmax output, its gradient, the
    logits' gradient), once in evaluation."""
    N = args.batch * args.seq_len if mode == "train" else args.eval_rows
    return (3 if mode == "train" else 1) * 4 * N * V


def fits(args, provider, mode, V):
    return provider != "plain" or plain_estimate(args, mode, V) <= args.mem_limit_gb * GB


# ---------------------------------------------------------------- memory --

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(args, spec):
    """One call of (mode, V, provider) in this fresh process; prints JSON."""
    import canet_kernels  # noqa: F401
    mode, V, provider = spec.split(":")
    V = int(V)
    torch.set_num_threads(args.threads)
    small = Case(args, mode, 2 * args.chunk + 5)
    PROVIDERS[provider](small)()
    del small
    case = Case(args, mode, V)
    fn = PROVIDERS[provider](case)
    method = "VmHWM after the call (reset through /proc/self/clear_refs) - VmRSS before"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        method = "ru_maxrss after the call - VmRSS before (no VmHWM reset)"
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    if method.startswith("VmHWM"):
        peak = _status_kb("VmHWM")
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = case.grad_bytes() if mode == "train" else 0
    print(json.dumps({"peak_bytes": (peak - before) * 1024.0, "grad_bytes": grads,
                      "rss_before_bytes": before * 1024.0, "seconds": seconds,
                      "method": method}))


def measure_memory(args, mode, V, provider):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{mode}:{V}:{provider}"]
    for name in ("batch", "seq_len", "dim", "widths", "eval_rows", "k", "seen", "chunk",
                 "threads", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, CANET_BENCH_DEFAULT_MALLOC="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ time --

def measure_time(fns, rounds):
    names = list(fns)
    for n in names:  # warm-up
        fns[n]()
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: dict(timing.summarize(s), raw_ms=[x * 1e3 for x in s])
            for n, s in samples.items()}


def check_agree(case, fns):
    """The fused op computes what plain PyTorch does on this batch."""
    with torch.no_grad() if case.mode == "eval" else torch.enable_grad():
        if case.mode == "train":
            a, b = fns["fused"](), fns["plain"]()
            err = abs(a.item() - b.item()) / abs(b.item())
            assert err < 1e-4, f"loss differs: fused {a.item()} plain {b.item()}"
            return {"loss_rel_err": err}
        (va, ia), (vb, ib) = fns["fused"](), fns["plain"]()
        err = (va - vb).abs().max().item()
        assert err < 1e-3, f"top-k values differ by {err}"
        return {"topk_value_max_err": err, "topk_index_agree": (ia == ib).float().mean().item()}


# ------------------------------------------------------------------ main --

def fmt_mb(b):
    return "-" if b is None else f"{b / 1e6:.0f}"


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child_memory(args, args.child)
    import canet_kernels  # noqa: F401
    torch.set_num_threads(args.threads)
    items = [int(v) for v in args.items.split(",")]
    modes = args.modes.split(",")
    provs = args.providers.split(",")
    results = []
    # memory first (fresh processes), timing last
    if not args.skip_memory:
        for mode in modes:
            for V in items:
                for p in provs:
                    row = {"mode": mode, "items": V, "provider": p}
                    if not fits(args, p, mode, V):
                        est = plain_estimate(args, mode, V) / GB
                        row["memory"] = {"not_run": f"estimated {est:.1f} GB > --mem-limit-gb "
                                                    f"{args.mem_limit_gb}"}
                    else:
                        row["memory"] = measure_memory(args, mode, V, p)
                    print(f"[memory] {mode} V={V} {p}: {row['memory']}", flush=True)
                    results.append(row)
    alloc = timing.pin_malloc()
    timed = {}
    if not args.skip_time:
        for mode in modes:
            for V in items:
                case = Case(args, mode, V)
                fns = {p: PROVIDERS[p](case) for p in provs if fits(args, p, mode, V)}
                agree = check_agree(case, fns) if len(fns) == 2 else {}
                rounds = args.big_rounds if (mode == "train" and V >= 500_000) else args.rounds
                with torch.no_grad() if mode == "eval" else torch.enable_grad():
                    t = measure_time(fns, rounds)
                for p, s in t.items():
                    timed[(mode, V, p)] = s
                    print(f"[time] {mode} V={V} {p}: median {s['median_ms']:.1f} ms "
                          f"(IQR {s['iqr_pct']:.0f}%, {s['samples']} rounds)", flush=True)
                timed[(mode, V, "agree")] = agree
                del case, fns
    by_key = {(r["mode"], r["items"], r["provider"]): r for r in results}
    for (mode, V, p), s in timed.items():
        if p == "agree":
            continue
        by_key.setdefault((mode, V, p), {"mode": mode, "items": V, "provider": p})["time"] = s
    for mode in modes:
        for V in items:
            a = timed.get((mode, V, "agree"))
            if a:
                by_key[(mode, V, "fused")]["agreement_with_plain"] = a
    rows = sorted(by_key.values(), key=lambda r: (modes.index(r["mode"]), r["items"],
                                                  provs.index(r["provider"])))

    # table
    print()
    print(f"| step | items | provider | time (median ms) | fused / plain | peak memory added (MB) "
          f"| net of gradients (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("memory", {})
        t = r.get("time")
        plain_t = by_key.get((r["mode"], r["items"], "plain"), {}).get("time")
        ratio = (f"{t['median_ms'] / plain_t['median_ms']:.2f}"
                 if r["provider"] == "fused" and t and plain_t else "")
        if "not_run" in mem:
            peak, net = "not run", "not run"
        elif "peak_bytes" in mem:
            peak = fmt_mb(mem["peak_bytes"])
            net = fmt_mb(mem["peak_bytes"] - mem["grad_bytes"])
        else:
            peak = net = "-"
        tm = f"{t['median_ms']:.0f}" if t else ("not run" if "not_run" in mem else "-")
        print(f"| {r['mode']} | {r['items']} | {r['provider']} | {tm} | {ratio} | {peak} | {net} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_scoring_cpu_{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"machine": timing.machine_info("cpu"), "args": vars(args), "allocator": alloc,
                   "memory_method": "fresh subprocess per (case, provider): VmHWM after one call "
                                    "(reset via /proc/self/clear_refs) - VmRSS before it",
                   "results": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
