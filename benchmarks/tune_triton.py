"""Tile shapes of the Triton kernels, measured: each op of one routed layer
of the target batch (1024 samples x 200 tokens, uniform routes over widths
{64, 96, 128}, bf16, D 128, 4 heads; route-sorted as the model runs it),
forward and the weight-gradient kernels of the backward, under
alternative entries of `canet_kernels.triton._common.BLOCKS`, next to the
dense op in plain PyTorch on the same tokens at full width.

    python benchmarks/tune_triton.py [--json OUT.json] [--write-blocks BEST.json]

Each variant is captured in a CUDA graph and its replays timed
(benchmarks/timing.py graph_ms: median of CUDA-event-timed replays, L2
flushed before each), so launch overhead does not hide kernel differences.
Weights, batch and the dense sublayers come from benchmarks/providers.py. BEST.json holds the
fastest entry per kernel family, for `bench_triton.py --blocks BEST.json`
(and for the defaults in _common.BLOCKS once confirmed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_triton import HEADS, RATIO, make_batch  # noqa: E402

# kernel family -> variants (the first is the current default)
VARIANTS = {
    "ffn": [dict(BM=128, BH=64, BK=32, warps=8, stages=3, XRES=True),
            dict(BM=32, BH=64, BK=32, warps=4, stages=3),
            dict(BM=32, BH=64, BK=64, warps=4, stages=3),
            dict(BM=32, BH=128, BK=32, warps=4, stages=3),
            dict(BM=64, BH=64, BK=64, warps=4, stages=3),
            dict(BM=128, BH=64, BK=32, warps=8, stages=3),
            dict(BM=32, BH=64, BK=32, warps=4, stages=3, XRES=True),
            dict(BM=64, BH=64, BK=32, warps=4, stages=3, XRES=True),
            dict(BM=64, BH=128, BK=32, warps=8, stages=3, XRES=True),
            dict(BM=64, BH=64, BK=32, warps=4, stages=4, XRES=True)],
    "mm": [dict(BM=64, BN=128, BK=32, warps=4, stages=3),
           dict(BM=32, BN=128, BK=32, warps=4, stages=3),
           dict(BM=64, BN=128, BK=32, warps=4, stages=4),
           dict(BM=64, BN=128, BK=32, warps=8, stages=3),
           dict(BM=128, BN=128, BK=32, warps=8, stages=3),
           dict(BM=32, BN=128, BK=64, warps=4, stages=3)],
    # weight gradients (sliced_linear_backward of an FFN-sized weight: the
    # grad-x GEMM is the same in every variant); RB: the reduction's block
    "dw": [dict(BM=64, BN=64, BK=64, warps=4, stages=3),
           dict(BM=64, BN=64, BK=64, warps=4, stages=3, RB=256),
           dict(BM=64, BN=128, BK=64, warps=8, stages=3),
           dict(BM=64, BN=128, BK=128, warps=8, stages=3),
           dict(BM=64, BN=128, BK=128, warps=8, stages=3, RB=256),
           dict(BM=32, BN=128, BK=128, warps=8, stages=3),
           dict(BM=128, BN=64, BK=64, warps=8, stages=3)],
    "attn": [dict(BM=64, BN=32, warps=4, stages=3),
             dict(BM=32, BN=32, warps=4, stages=3),
             dict(BM=64, BN=32, warps=4, stages=4),
             dict(BM=64, BN=32, warps=2, stages=3),
             dict(BM=128, BN=32, warps=4, stages=3),
             dict(BM=32, BN=64, warps=4, stages=3)],
}


def graph_ms(fn, device):
    """Median ms of fn replayed from a CUDA graph (timing.graph_ms; on the
    CPU, under the interpreter: one plain call)."""
    from benchmarks import timing
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return timing.graph_ms(fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="all timings")
    ap.add_argument("--write-blocks", help="fastest entry per family (bf16)")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1), two variants each")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    elif not torch.cuda.is_available():
        sys.exit("tune_triton: needs a CUDA device (or --smoke)")
    import canet_kernels  # noqa: F401
    import canet_kernels.triton as kt
    from benchmarks import providers as P
    from canet_kernels.triton import _common

    if args.smoke:  # the interpreter takes the small CPU tiles: this only runs the code
        B, L, D, dt, dev = 3, 5, 32, torch.float32, torch.device("cpu")
        variants = {k: v[:2] for k, v in VARIANTS.items()}
    else:
        B, L, D, dt, dev = 1024, 200, 128, torch.bfloat16, torch.device("cuda")
        variants = VARIANTS
    batch = make_batch(B, L, [D // 2, 3 * D // 4, D], [8], D, dt, dev)
    x, cu, w = batch["plan"].layer(0, batch["x"])
    p = P.make_weights(D, 1, RATIO, HEADS, dtype=dt, device=dev)["layers"][0]
    T = x.shape[0]
    ratio_lin = float((w.double() ** 2).mean() / D ** 2)  # all samples have L tokens
    ops = {
        "ffn": lambda: kt.sliced_ffn_fwd(x, cu, w, p["w1"], p["b1"], p["w2"], p["b2"],
                                         RATIO, False),
        "mm": lambda: kt.sliced_linear(x, cu, w, w, p["w_o"], p["b_o"]),
        "attn": lambda: kt.sliced_attention_fwd(x, cu, w, p["w_qkv"], p["b_qkv"], p["w_o"],
                                                p["b_o"], HEADS, True, False),
        "dw": lambda: kt.sliced_linear_backward(dh, x, cu, w, RATIO * w, p["w1"], True),
    }
    xd = x.view(-1, L, D)
    dh = torch.randn(T, RATIO * D, dtype=dt, device=dev)
    dense = {  # providers' plain-PyTorch sublayers at full width
        "ffn": lambda: P.ffn(x, p, D, RATIO),
        "mm": lambda: F.linear(x, p["w_o"], p["b_o"]),
        "attn": lambda: P.padded_attention(xd, p, D, HEADS),
        "dw": lambda: (dh @ p["w1"], dh.t() @ x, dh.sum(0)),   # grad x, W, b
    }
    results, best = {}, {}
    print(f"tokens {T}, linear FLOP ratio {ratio_lin:.3f}; medians of CUDA-graph replays")
    for fam in args.only or list(variants):
        with torch.no_grad():
            dense_ms = graph_ms(dense[fam], dev)
            rows = []
            for v in variants[fam]:
                key = (fam, "half" if dt in _common.HALF else "full")
                old = _common.BLOCKS[key]
                _common.BLOCKS[key] = dict(v)
                try:
                    ms = graph_ms(ops[fam], dev)
                    err = None
                except Exception as exc:  # noqa: BLE001  a variant may not fit
                    ms, err = float("nan"), f"{type(exc).__name__}: {str(exc)[:200]}"
                finally:
                    _common.BLOCKS[key] = old
                rows.append(dict(blocks=v, ms=ms, over_dense=ms / dense_ms, error=err))
                print(f"{fam:5s} {json.dumps(v):60s} {ms:8.4f} ms  /dense {ms / dense_ms:6.3f}"
                      + (f"  {err}" if err else ""), flush=True)
        ok = [r for r in rows if r["error"] is None]
        results[fam] = dict(dense_ms=dense_ms, variants=rows)
        if ok:
            b = min(ok, key=lambda r: r["ms"])
            best[fam] = b["blocks"]
            print(f"{fam:5s} dense {dense_ms:.4f} ms; best {json.dumps(b['blocks'])} "
                  f"{b['ms']:.4f} ms ({rows[0]['ms'] / b['ms']:.2f}x the default)")
    out = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               torch=torch.__version__,
               tokens=T, linear_flop_ratio=ratio_lin, results=results, best=best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.write_blocks:
        with open(args.write_blocks, "w") as f:
            cls = "half" if dt in _common.HALF else "full"
            json.dump({f"{k}/{cls}": v for k, v in best.items()}, f, indent=2)
    return out


if __name__ == "__main__":
    main()
