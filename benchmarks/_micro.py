"""Shared body of the op microbenchmarks (bench_sliced_*.py): one op on a
small batch of uniformly random routes, canet's CPU op vs the plain-PyTorch
providers (sort + one call per width bucket, one call per route, dense,
masked)."""
from __future__ import annotations

import torch

from benchmarks import providers as P

B, N, D = 32, 20, 128
MICRO_PROVIDERS = ("canet-cpu", "bucket", "loop", "dense", "masked")
_cases: dict = {}


def case(op: str) -> P.OpCase:
    if op not in _cases:
        W = P.make_weights(D, 1)
        widths, depths = P.sample_routes(B, "uniform", seed=1)
        batch = P.make_batch(widths, depths, N, D, seed=1)
        res = P.make_batch(widths, depths, N, D, seed=2).x
        c = P.OpCase(op, W["layers"][0], batch, res)
        st = c.prepare("bucket")
        with torch.inference_mode():
            want = c.to_padded("bucket", st, c.call("bucket", st))
            st = c.prepare("canet-cpu")
            got = c.to_padded("canet-cpu", st, c.call("canet-cpu", st))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        _cases[op] = c
    return _cases[op]


def run(benchmark, op: str, provider: str, mode: str):
    c = case(op)
    benchmark.group = f"{op} {mode} (B={B}, n={N}, uniform widths)"
    st = c.prepare(provider, grad=mode == "train")
    if mode == "train":
        def fn():
            P.op_loss(c.call(provider, st)).backward()
    else:
        def fn():
            with torch.inference_mode():
                return c.call(provider, st)
    benchmark(fn)
