"""Compile every kernel variant the launchers use for a CUDA target, without
a GPU: the launchers run on CPU tensors with GPU tile sizes, and each launch
is compiled (Triton -> PTX -> cubin) instead of run. Catches what the
interpreter cannot: type errors of the compiler, unsupported ops, spills.

    python -m canet_kernels.triton._aot_check [--arch 90] [--dtypes bf16 fp32] [-v]
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--dims", nargs="+", type=int, default=[128], help="model widths D")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from . import KERNELS, _common

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
    target = GPUTarget("cuda", args.arch, 32)
    done, failed = {}, []

    def compile_launch(self, *a, grid, warmup=False, **kw):
        # stands in for JITFunction.run: compile with the launch's signature
        opts = {k: kw.pop(k) for k in list(kw) if k in ("num_warps", "num_stages")}
        vals = dict(zip([p.name for p in self.params], a), **kw)
        sig, const, attrs = {}, {}, {}
        for i, p in enumerate(self.params):
            v = vals[p.name]
            if p.is_constexpr or (type(v) is int and v == 1):
                sig[p.name], const[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + names[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[p.name] = "fp32"
        key = (self.fn.__name__, str(sorted(sig.items())), str(sorted(const.items())),
               str(sorted(attrs.items())), str(sorted(opts.items())))
        if key in done:
            return
        t0 = time.perf_counter()
        try:
            done[key] = triton.compile(ASTSource(self, sig, const, attrs=attrs), target=target,
                                       options=opts)
        except Exception as exc:  # noqa: BLE001  collected and reported
            failed.append(f"{self.fn.__name__} {const}: {type(exc).__name__}: {exc}")
            done[key] = None
            return
        if args.verbose:
            shown = {k: str(v) for k, v in const.items()}
            print(f"{self.fn.__name__:20s} {time.perf_counter() - t0:5.1f}s {shown} {opts}")

    JITFunction.run = compile_launch
    _common.small_blocks = lambda t: False  # GPU tile sizes

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64}
    cu = torch.tensor([0, 3, 10, 10, 30, 40])
    w = torch.tensor([128, 96, 64, 96, 64])
    for name in args.dtypes:
        dt = dtypes[name]
        for D in args.dims:
            ww = torch.clamp(w * D // 128, min=4)
            x = torch.zeros(40, D, dtype=dt)
            sq, vec = torch.zeros(D, D, dtype=dt), torch.zeros(D, dtype=dt)
            for bias in (vec, None):
                KERNELS["sliced_linear"](x, cu, ww, ww, sq, bias)
                KERNELS["sliced_linear_backward"](x, x, cu, ww, ww, sq, bias is not None)
            wq, bq = torch.zeros(3, D, D, dtype=dt), torch.zeros(3, D, dtype=dt)
            for causal in (True, False):
                _, qkv, ctx, lse = KERNELS["sliced_attention_fwd"](x, cu, ww, wq, bq, sq, vec, 4,
                                                                   causal)
                KERNELS["sliced_attention_backward"](x, x, cu, ww, wq, sq, qkv, ctx, lse, 4,
                                                     causal)
            w1, b1 = torch.zeros(4 * D, D, dtype=dt), torch.zeros(4 * D, dtype=dt)
            w2 = torch.zeros(D, 4 * D, dtype=dt)
            _, hidden = KERNELS["sliced_ffn_fwd"](x, cu, ww, w1, b1, w2, vec, 4)
            KERNELS["sliced_ffn_backward"](x, x, cu, ww, w1, w2, hidden, 4)
            _, mean, rstd = KERNELS["sliced_add_layernorm_fwd"](x, x, cu, ww, vec, vec, 1e-5)
            KERNELS["sliced_add_layernorm_backward"](x, x, x, cu, ww, vec, mean, rstd)
            # routed scoring: 4 rows of mixed widths against 300 items
            table, items = torch.zeros(300, D, dtype=dt), torch.zeros(300, dtype=dt)
            rows = torch.zeros(4, D, dtype=dt)
            rw = torch.clamp(torch.tensor([128, 96, 64, 64]) * D // 128, min=4)
            tg = torch.tensor([1, 2, -1, 0])
            seen = torch.zeros(4, 2, dtype=torch.int64)
            for bias in (items, None):
                loss, lse = KERNELS["sliced_linear_cross_entropy_fwd"](rows, rw, table, bias, tg,
                                                                      0)
                KERNELS["sliced_linear_cross_entropy_backward"](loss, rows, rw, table, bias, tg,
                                                                lse, 0, 4096)
                for ex in (seen, None):
                    KERNELS["sliced_linear_topk"](rows, rw, table, bias, 10, 4096, ex)
    print(f"compiled {len(done) - len(failed)} kernel variants for sm_{args.arch}, "
          f"{len(failed)} failed")
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
