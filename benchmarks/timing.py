"""Timing, memory and machine-description utilities of the benchmarks.

Providers are timed interleaved (round-robin, the start rotating every
round) so that slow drifts of a shared machine hit every provider alike;
each sample is the mean of `number` back-to-back calls, calibrated once so a
sample lasts at least `min_sample_s`. Reported: median, quartiles, min, max.
On the CPU a sample is wall-clock time; on CUDA, with clock="events", it is
the time between two CUDA events around the calls (the device's view: what
`cuda_graph` replays are timed with).

CUDA graphs: `cuda_graph(fn)` captures a callable that reads and writes
fixed buffers and returns its replay; `graph_ms(fn)` times the replays of
one such capture alone (median, L2 flushed before each, as
triton.testing.do_bench does), for kernel-level comparisons.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _once(fn: Callable, number: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / number


def _once_events(fn: Callable, number: int, device) -> float:
    """Seconds per call between two CUDA events on the current stream."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def _timer(device, clock: str):
    if clock not in ("wall", "events"):
        raise ValueError(f"clock must be 'wall' or 'events', not {clock!r}")
    if clock == "events" and torch.device(device).type == "cuda":
        return _once_events
    return _once


def summarize(samples: list) -> dict:
    """Seconds -> milliseconds statistics."""
    ms = sorted(s * 1e3 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    med = statistics.median(ms)
    return {"median_ms": med, "p25_ms": q[0], "p75_ms": q[2], "min_ms": ms[0],
            "max_ms": ms[-1], "iqr_pct": 100 * (q[2] - q[0]) / med if med else 0.0,
            "samples": len(ms)}


def interleaved(fns: dict, rounds: int = 15, warmup: int = 2, device="cpu",
                min_sample_s: float = 0.02, max_number: int = 1000,
                budget_s: float | None = None, clock: str = "wall") -> dict:
    """Times every callable of `fns` (name -> fn) round-robin.

    Returns name -> summary dict (see `summarize`), plus `number` (calls per
    sample). With `budget_s` the rounds stop early (never below 3) once the
    estimated time runs out. clock="events" times CUDA samples with CUDA
    events (the CPU always uses the wall clock).
    """
    once = _timer(device, clock)
    names = list(fns)
    number = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t = once(fns[name], 1, device)
        number[name] = max(1, min(max_number, int(min_sample_s / max(t, 1e-7))))
    samples = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(once(fns[name], number[name], device))
        if budget_s is not None and r >= 2:
            spent = time.perf_counter() - start
            if spent / (r + 1) * (r + 2) > budget_s:
                break
    out = {}
    for name in names:
        out[name] = summarize(samples[name])
        out[name]["number"] = number[name]
    return out


def latencies(fn: Callable, n: int, warmup: int = 3, device="cpu") -> dict:
    """Per-call latency percentiles (serving): every call timed alone."""
    for _ in range(warmup):
        fn()
    ts = [_once(fn, 1, device) * 1e3 for _ in range(n)]
    ts.sort()

    def pct(p):
        return ts[min(len(ts) - 1, int(round(p / 100 * (len(ts) - 1))))]
    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "mean_ms": statistics.fmean(ts), "min_ms": ts[0], "calls": n}


# ----------------------------------------------------------- CUDA graphs --

class Graph:
    """A captured CUDA graph: calling it replays the graph and returns the
    output of the captured call (the same tensors, rewritten by each
    replay)."""

    def __init__(self, graph, out):
        self.graph, self.out = graph, out

    def __call__(self):
        self.graph.replay()
        return self.out


def cuda_graph(fn: Callable, warmup: int = 2, warmup_fn: Callable | None = None,
               before_capture: Callable | None = None, pool=None) -> Graph:
    """Captures one call of `fn` in a CUDA graph and returns it (`Graph`).

    `fn` must read and write fixed buffers (its inputs are what they are at
    capture: a replay recomputes from their current contents). It is first
    run `warmup` times (`warmup_fn`, default fn, e.g. a training step that
    also resets gradients) on a side stream, as capture requires (lazy
    initialisation, autotuning, cuBLAS workspaces), then `before_capture()`
    runs and one call is captured. Raises when capture fails (an op that
    synchronises with the host, allocates pinned memory, ...)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            (warmup_fn or fn)()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    torch.cuda.synchronize()
    return Graph(graph, out)


def graph_ms(fn: Callable, reps: int = 100, warmup: int = 10,
             flush_l2: bool = True) -> float:
    """Median ms of one replay of `fn` captured in a CUDA graph, each replay
    timed alone with CUDA events after a 256 MB write that evicts the L2
    cache (flush_l2), as triton.testing.do_bench times kernels."""
    replay = fn if isinstance(fn, Graph) else cuda_graph(fn)
    for _ in range(warmup):
        replay()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def device_peaks(dtype=torch.bfloat16, copy_bytes: int = 2 << 30, n: int = 8192) -> dict:
    """The two ceilings of this GPU, measured: device-to-device copy
    bandwidth (bytes read + written) and the matrix rate of an n^3 product
    in `dtype` on random data (zeros run faster), each the median of CUDA
    events over several calls after warm-up."""
    def median_ms(fn, reps=10):
        for _ in range(3):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    src = torch.randint(0, 127, (copy_bytes,), dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    mm_ms = median_ms(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return dict(copy_tb_s=2 * copy_bytes / copy_ms / 1e9,
                matmul_tflop_s=2 * n ** 3 / mm_ms / 1e9,
                how=f"copy of {copy_bytes >> 20} MiB (read + write); "
                    f"{n}^3 {str(dtype).replace('torch.', '')} product, random data")


# ---------------------------------------------------------------- memory --

def pin_malloc() -> str:
    """Keep freed CPU memory in the process (glibc): no mmap for big blocks,
    no trimming. Without it, whether a tensor of a few MB gets recycled heap
    or fresh zero pages depends on glibc's sliding mmap threshold, so the same
    forward pass flips between two speeds run to run: the dense stack
    measured 380-400 ms with the allocator pinned and 430-540 ms with
    60-90k page faults per call unpinned (2 threads, 256 x 50 tokens).
    Pinning puts every provider on recycled memory. Returns what was done."""
    if os.environ.get("CANET_BENCH_DEFAULT_MALLOC"):
        return "default allocator (CANET_BENCH_DEFAULT_MALLOC set)"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        big = 1 << 30
        if libc.mallopt(M_MMAP_THRESHOLD, big) and libc.mallopt(M_TRIM_THRESHOLD, big):
            return "glibc malloc pinned (mmap and trim thresholds 1 GiB)"
    except (OSError, AttributeError):
        pass
    return "default allocator (not glibc)"


def peak_memory_bytes(fn: Callable, device="cpu") -> tuple[float, str]:
    """Peak bytes allocated by one call of `fn` above what was live before.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocation and free
    events torch.profiler(profile_memory=True) records for torch's CPU
    allocator, replayed in order (tensors only; Python objects and BLAS
    scratch are not seen). Returns (bytes, method).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), \
            "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():  # kineto logs its start and stop on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak), "torch.profiler profile_memory (CPU allocator events, replayed)"


class _quiet_stderr:
    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            self.null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.null, 2)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            os.close(self.null)
        return False


# --------------------------------------------------------------- machine --

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device="cpu") -> dict:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "canet_commit": _git_commit(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import canet_kernels
        info["canet"] = canet_kernels.__version__
    except ImportError:
        info["canet"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_name(info: dict) -> str:
    s = f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads)"
    if info.get("gpu"):
        s = f"{info['gpu']} + " + s
    return s
