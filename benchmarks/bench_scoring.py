"""Routed scoring over the item table, canet's chunked ops vs plain PyTorch on
the same batch: a training step (linear + cross-entropy, forward and
backward) and full-ranking top-k evaluation, at several item counts.

    python benchmarks/bench_scoring.py [--items 12000,100000,1000000]
        [--threads 2] [--rounds 5] [--tag run1] [--out benchmarks/results/scoring]
    python benchmarks/bench_scoring.py --device cuda [--dtype bfloat16] [--deadline 50]
    python benchmarks/bench_scoring.py --providers fused,gemm,plain [--gemm-chunk 8192]

Training batch: `--batch` x `--seq-len` scored positions (256 x 50 = 12800
rows), each sample at a width from `--widths` (64, 96, 128; rows of one
sample share it, the batch route-sorted so equal widths are contiguous, as
canet packs it), hidden size D 128, item table [V, 128] plus a bias, every
position labelled.
  fused: canet.sliced_linear_cross_entropy(h, widths, W, b, targets), backward
  gemm:  canet_kernels.scoring_gemm.cross_entropy(h, widths, W, b, targets,
         chunk_size=--gemm-chunk), backward: the same loss by torch.mm
         (cuBLAS) over chunks of items (not in the default --providers)
  plain: F.cross_entropy(F.linear(h * mask, W, b), targets), backward; h is
         zeroed beyond each row's width, so it is the same loss at full width
Evaluation: `--eval-rows` rows (256), top `--k` (10) with the padding item 0
and `--seen` (50) seen items per row excluded.
  fused: canet.sliced_linear_topk(h, widths, W, b, k, exclude=seen)
  gemm:  canet_kernels.scoring_gemm.topk(h, widths, W, b, k, --gemm-chunk, seen)
  plain: F.linear, scatter -inf into the seen items, torch.topk
Every provider but plain is checked against plain on the batch first (the
loss, or the top-k values).

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

--device cuda (canet's ops served by its Triton kernels, kt.register()):
inputs in --dtype (default bfloat16; float32 on the CPU), all in one
process. Each provider is called once first (Triton JIT, cuBLAS workspace),
then memory: torch.cuda.max_memory_allocated over one call minus what was
allocated before it (timing.peak_memory_bytes); time: timing.interleaved
with CUDA events. A provider that runs out of memory (or fails) is reported
as not run, with the reason, and the run goes on.

--deadline S (either device): no new case (mode, items) starts once S
seconds have passed since the script started; the rest are reported as
skipped. The JSON is rewritten after every case, so a killed run keeps the
cases it finished.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

T0 = time.monotonic()  # --deadline counts from here, before the slow imports

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
    ap.add_argument("--gemm-chunk", type=int, default=8192,
                    help="items per product of the gemm provider (its chunk_size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                    default=None, help="of h, W, b (default float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (cpu), 10 (cuda)")
    ap.add_argument("--big-rounds", type=int, default=None,
                    help="rounds of training steps at >= 500k items; default 2 (cpu), 5 (cuda)")
    ap.add_argument("--modes", default="train,eval")
    ap.add_argument("--providers", default="fused,plain")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="run plain only where its estimated peak fits; default 20 (cpu), "
                         "60 (cuda)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no new case starts (the rest: skipped)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scoring"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    for name, cpu_default, cuda_default in (("dtype", "float32", "bfloat16"), ("rounds", 5, 10),
                                            ("big_rounds", 2, 5), ("mem_limit_gb", 20.0, 60.0)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if cuda else cpu_default)
    return args


# ----------------------------------------------------------------- cases --

class Case:
    """Inputs of one (mode, V); the same seed gives the same tensors."""

    def __init__(self, args, mode, V, grad=True):
        dev = torch.device(args.device)
        # drawn on the device itself: a 1M-item table is slow to draw on the host
        g = torch.Generator(dev).manual_seed(args.seed)
        D, dtype = args.dim, getattr(torch, args.dtype)
        choices = torch.tensor([int(w) for w in args.widths.split(",")], device=dev)
        if mode == "train":
            B, L = args.batch, args.seq_len
        else:
            B, L = args.eval_rows, 1
        per_sample = choices[torch.randint(0, len(choices), (B,), generator=g, device=dev)]
        per_sample = per_sample.sort().values            # route-sorted batch
        self.widths = per_sample.repeat_interleave(L)
        N = B * L
        # drawn in float32 whatever --dtype (.to is a no-op for float32)
        self.h = torch.empty(N, D, device=dev).normal_(generator=g).to(dtype)
        self.W = torch.empty(V, D, device=dev).normal_(generator=g).mul_(D ** -0.5).to(dtype)
        self.b = torch.empty(V, device=dev).normal_(generator=g).mul_(0.1).to(dtype)
        self.mask = (torch.arange(D, device=dev)[None, :] < self.widths[:, None]).to(dtype)
        self.targets = torch.randint(1, V, (N,), generator=g, device=dev)
        seen = torch.randint(1, V, (N, args.seen), generator=g, device=dev)
        self.exclude = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=dev), seen], 1)
        if mode == "train" and grad:
            for t in (self.h, self.W, self.b):
                t.requires_grad_()
        self.mode, self.V, self.N, self.args = mode, V, N, args

    def grad_bytes(self):
        return self.h.element_size() * (self.h.numel() + self.W.numel() + self.b.numel())


def _train_step(c, loss):
    """A training step of provider `loss` (-> scalar): forward, backward,
    the gradients dropped."""
    def step():
        out = loss()
        out.backward()
        c.h.grad = c.W.grad = c.b.grad = None
        return out.detach()
    return step


def fused_fn(c):
    op = torch.ops.canet
    if c.mode == "train":
        return _train_step(c, lambda: op.sliced_linear_cross_entropy(
            c.h, c.widths, c.W, c.b, c.targets, -100, c.args.chunk))

    def evaluate():
        return op.sliced_linear_topk(c.h, c.widths, c.W, c.b, c.args.k, c.args.chunk,
                                     c.exclude)
    return evaluate


def plain_fn(c):
    if c.mode == "train":
        return _train_step(c, lambda: F.cross_entropy(F.linear(c.h * c.mask, c.W, c.b),
                                                      c.targets))

    def evaluate():
        scores = F.linear(c.h * c.mask, c.W, c.b)
        scores.scatter_(1, c.exclude, float("-inf"))
        top = scores.topk(c.args.k, dim=1)
        return top.values, top.indices
    return evaluate


def gemm_fn(c):
    from canet_kernels import scoring_gemm
    if c.mode == "train":
        return _train_step(c, lambda: scoring_gemm.cross_entropy(
            c.h, c.widths, c.W, c.b, c.targets, -100, c.args.gemm_chunk))

    def evaluate():
        return scoring_gemm.topk(c.h, c.widths, c.W, c.b, c.args.k, c.args.gemm_chunk,
                                 c.exclude)
    return evaluate


PROVIDERS = {"fused": fused_fn, "gemm": gemm_fn, "plain": plain_fn}


def plain_estimate(args, mode, V):
    """Bytes plain PyTorch needs beyond its inputs: the [N, V] logits three
    times at once in a training step (log-softmax output, its gradient, the
    logits' gradient), once in evaluation; in --dtype."""
    N = args.batch * args.seq_len if mode == "train" else args.eval_rows
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    return (3 if mode == "train" else 1) * elem * N * V


def fits(args, provider, mode, V):
    return provider != "plain" or plain_estimate(args, mode, V) <= args.mem_limit_gb * GB


def not_run_reason(args, provider, mode, V):
    if fits(args, provider, mode, V):
        return None
    est = plain_estimate(args, mode, V) / GB
    return f"estimated {est:.1f} GB > --mem-limit-gb {args.mem_limit_gb}"


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
                 "gemm_chunk", "threads", "seed", "dtype"):
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


def check_agree(case, fns, provider):
    """`provider` computes what plain PyTorch does on this batch, within the
    rounding of --dtype (plain's bf16 loss and logits carry ~3 digits)."""
    half = case.h.dtype in (torch.float16, torch.bfloat16)
    with grad_mode(case.mode):
        if case.mode == "train":
            a, b = fns[provider]().float().item(), fns["plain"]().float().item()
            err, tol = abs(a - b) / abs(b), (2e-2 if half else 1e-4)
            return {"loss_rel_err": err, "tol": tol, "ok": err < tol,
                    "why": f"loss differs: {provider} {a} plain {b}"}
        (va, ia), (vb, ib) = fns[provider](), fns["plain"]()
        va, vb = va.float(), vb.float()
        err = (va - vb).abs().max().item()
        tol = 5e-2 * max(1.0, vb.abs().max().item()) if half else 1e-3
        return {"topk_value_max_err": err, "topk_index_agree": (ia == ib).float().mean().item(),
                "tol": tol, "ok": err < tol,
                "why": f"top-k values differ by {err} ({provider} vs plain)"}


def agreeing(fns):
    """The providers to check against plain (all others, where plain runs)."""
    return [p for p in fns if p != "plain"] if "plain" in fns else []


def grad_mode(mode):
    return torch.no_grad() if mode == "eval" else torch.enable_grad()


# ------------------------------------------------------------- one case --


def cpu_case(args, mode, V, provs, row):
    """Memory in a fresh subprocess per provider, then time in this one."""
    for p in provs:
        why = not_run_reason(args, p, mode, V)
        if why:
            row[p]["memory"] = {"not_run": why}
        elif not args.skip_memory:
            row[p]["memory"] = measure_memory(args, mode, V, p)
        if why or not args.skip_memory:
            print(f"[memory] {mode} V={V} {p}: {row[p]['memory']}", flush=True)
    if args.skip_time:
        return
    case = Case(args, mode, V)
    fns = {p: PROVIDERS[p](case) for p in provs if fits(args, p, mode, V)}
    for p in agreeing(fns):
        agree = check_agree(case, fns, p)
        why = agree.pop("why")
        assert agree["ok"], why
        row[p]["agreement_with_plain"] = agree
    rounds = args.big_rounds if (mode == "train" and V >= 500_000) else args.rounds
    with grad_mode(mode):
        t = measure_time(fns, rounds)
    for p, s in t.items():
        row[p]["time"] = s
        print(f"[time] {mode} V={V} {p}: median {s['median_ms']:.1f} ms "
              f"(IQR {s['iqr_pct']:.0f}%, {s['samples']} rounds)", flush=True)


def failure(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(e).__name__}: {str(e)[:500]}"


def free(case=None):
    """After a failure or a case: drop gradients a failed step left, hand the
    allocator's cached blocks back before the next call."""
    if case is not None:
        case.h.grad = case.W.grad = case.b.grad = None
    gc.collect()
    torch.cuda.empty_cache()


def inproc_case(args, mode, V, provs, row):
    """CUDA: everything in this process. A provider that fails (out of memory,
    a kernel error) is reported and dropped; the run goes on."""
    case = Case(args, mode, V)
    fns = {}
    for p in provs:
        why = not_run_reason(args, p, mode, V)
        if why:
            row[p]["memory"] = {"not_run": why}
            continue
        fn = PROVIDERS[p](case)
        try:
            with grad_mode(mode):
                fn()  # first call: Triton JIT, cuBLAS workspace, allocator pools
            timing.sync(args.device)
            fns[p] = fn
        except Exception as e:  # noqa: BLE001
            row[p]["memory"] = {"not_run": failure(e)}
            free(case)
        print(f"[warm-up] {mode} V={V} {p}: {row[p].get('memory', 'ok')}", flush=True)
    for p in agreeing(fns):
        agree = check_agree(case, fns, p)
        why = agree.pop("why")
        if not agree["ok"]:  # report, do not lose the rest of a short GPU run
            print(f"WARNING {mode} V={V}: {why}", flush=True)
        row[p]["agreement_with_plain"] = agree
    grads = case.grad_bytes() if mode == "train" else 0
    if not args.skip_memory:
        for p in list(fns):
            try:
                with grad_mode(mode):
                    peak, method = timing.peak_memory_bytes(fns[p], args.device)
                row[p]["memory"] = {"peak_bytes": peak, "grad_bytes": grads, "method": method}
            except Exception as e:  # noqa: BLE001
                row[p]["memory"] = {"not_run": failure(e)}
                del fns[p]
                free(case)
            print(f"[memory] {mode} V={V} {p}: {row[p]['memory']}", flush=True)
    if args.skip_time or not fns:
        return
    rounds = args.big_rounds if (mode == "train" and V >= 500_000) else args.rounds
    try:
        with grad_mode(mode):
            t = timing.interleaved(fns, rounds, warmup=1, device=args.device, clock="events")
    except Exception as e:  # noqa: BLE001
        for p in fns:
            row[p]["time_error"] = failure(e)
        print(f"[time] {mode} V={V}: {failure(e)}", flush=True)
        return
    for p, s in t.items():
        row[p]["time"] = s
        print(f"[time] {mode} V={V} {p}: median {s['median_ms']:.3f} ms "
              f"(IQR {s['iqr_pct']:.0f}%, {s['samples']} rounds of {s['number']})", flush=True)


# ------------------------------------------------------------------ main --

def fmt_mb(b):
    return "-" if b is None else f"{b / 1e6:.0f}"


def fmt_ms(ms):
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def write_json(path, meta, rows):
    # through a temporary file: a kill mid-write keeps the previous version
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    os.replace(path + ".tmp", path)


def print_table(rows):
    by_key = {(r["mode"], r["items"], r["provider"]): r for r in rows}
    print()
    print("| step | items | provider | time (median ms) | time / plain | peak memory added (MB) "
          "| net of gradients (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("memory", {})
        t = r.get("time")
        plain_t = by_key.get((r["mode"], r["items"], "plain"), {}).get("time")
        ratio = (f"{t['median_ms'] / plain_t['median_ms']:.2f}"
                 if r["provider"] != "plain" and t and plain_t else "")
        if "skipped" in r:
            tm, peak, net = f"skipped: {r['skipped']}", "-", "-"
        else:
            if "not_run" in mem:
                why = mem["not_run"]  # estimate, OOM or error (details in the JSON)
                peak = net = "not run" if why.startswith("estimated") else \
                    f"not run ({why.split(':')[0]})"
            elif "peak_bytes" in mem:
                peak = fmt_mb(mem["peak_bytes"])
                net = fmt_mb(mem["peak_bytes"] - mem["grad_bytes"])
            else:
                peak = net = "-"
            tm = fmt_ms(t["median_ms"]) if t else \
                ("not run" if "not_run" in mem else "failed" if "time_error" in r else "-")
        print(f"| {r['mode']} | {r['items']} | {r['provider']} | {tm} | {ratio} | {peak} | {net} |")


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child_memory(args, args.child)
    import canet_kernels  # noqa: F401
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_scoring: no CUDA device (--device cuda)")
        import canet_kernels.triton as kt
        served = kt.register()  # canet's ops on CUDA tensors -> its Triton kernels
        alloc = "torch CUDA caching allocator"
        method = ("in process, after one warm-up call: torch.cuda.max_memory_allocated over "
                  "one call - torch.cuda.memory_allocated before it")
    else:
        served = None
        alloc = timing.pin_malloc()  # this process only: the memory children start fresh
        method = ("fresh subprocess per (case, provider): VmHWM after one call "
                  "(reset via /proc/self/clear_refs) - VmRSS before it")
    torch.set_num_threads(args.threads)
    items = [int(v) for v in args.items.split(",")]
    modes = args.modes.split(",")
    provs = args.providers.split(",")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_scoring_{args.device}_{args.tag}.json")
    meta = {"machine": timing.machine_info(args.device), "device": args.device,
            "dtype": args.dtype, "triton_ops": served, "args": vars(args), "allocator": alloc,
            "memory_method": method}
    rows = []
    for mode in modes:
        for V in items:
            row = {p: {"mode": mode, "items": V, "provider": p} for p in provs}
            rows += row.values()
            if args.deadline is not None and time.monotonic() - T0 > args.deadline:
                for r in row.values():
                    r["skipped"] = "deadline"
                print(f"[skipped] {mode} V={V}: past --deadline {args.deadline} s", flush=True)
            elif args.device == "cuda":
                inproc_case(args, mode, V, provs, row)
                free()
            else:
                cpu_case(args, mode, V, provs, row)
            write_json(path, meta, rows)
    rows.sort(key=lambda r: (modes.index(r["mode"]), r["items"], provs.index(r["provider"])))
    print_table(rows)
    meta["seconds"] = time.monotonic() - T0
    write_json(path, meta, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
