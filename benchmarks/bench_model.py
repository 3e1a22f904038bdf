"""Backbone forward: canet's routed CPU ops vs the dense max-size stack vs the
official masked formulation, on one batch of uniformly random routes.

    python benchmarks/bench_model.py [--batch 256] [--seq-len 50] [--rounds 15]
                                     [--threads N] [--json PATH]

Every provider runs the same weights on the same batch; canet's output is
checked against the masked formulation's before anything is timed. Timing is
interleaved round-robin; medians and quartiles are printed. FLOPs: see
canet_kernels/flops.py (causal attention counts n (n + 1) / 2 score pairs, for
dense and routed alike).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import providers as P  # noqa: E402
from benchmarks import timing  # noqa: E402
from canet_kernels import flops as FL  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--providers", default="canet-cpu,dense,masked",
                    help="comma list; also: loop, bucket, proto (a prototype of "
                         "faster attention/LayerNorm kernels, see ProtoOps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--width-bound", action="store_true",
                    help="also measure the dense PyTorch layer at each width and "
                         "print the time ratio that per-width efficiency allows")
    return ap.parse_args(argv)


class ProtoOps:
    """Prototype, not a library path: the ops object of the `proto` provider
    (canet's layer and route plan through P.Canet): canet's sliced_ffn, but
    the attention core through F.scaled_dot_product_attention and LayerNorm
    through F.layer_norm, one call per run of equal-width samples. Shows what
    the C++ attention and LayerNorm kernels leave on the table."""

    sliced_ffn = staticmethod(P.CF.sliced_ffn)

    @staticmethod
    def _runs(cu, widths):
        """(row0, row1, width, lengths) per run of equal widths."""
        cu, widths = cu.tolist(), widths.tolist()
        runs, s = [], 0
        while s < len(widths):
            e = s
            while e < len(widths) and widths[e] == widths[s]:
                e += 1
            runs.append((cu[s], cu[e], widths[s],
                         [b - a for a, b in zip(cu[s:e], cu[s + 1:e + 1])]))
            s = e
        return runs

    def sliced_attention(self, x, cu, widths, w_qkv, b_qkv, w_o, b_o, heads, causal=True):
        p = dict(w_qkv=w_qkv, b_qkv=b_qkv, w_o=w_o, b_o=b_o)
        out = torch.zeros_like(x)
        for r0, r1, w, lens in self._runs(cu, widths):
            out[r0:r1, :w] = P.Bucket._attention(x[r0:r1, :w], p, w, heads, lens)
        return out

    def sliced_add_layernorm(self, x, res, cu, widths, weight, bias, eps=P.EPS):
        out = torch.zeros_like(x)
        for r0, r1, w, _ in self._runs(cu, widths):
            out[r0:r1, :w] = torch.nn.functional.layer_norm(
                x[r0:r1, :w] + res[r0:r1, :w], (w,), weight[:w], bias[:w], eps)
        return out


def width_bound(W, widths, depths, seq_len, rounds):
    """Time ratio a backend reaches if each sample runs exactly as fast as
    the dense PyTorch stack does at that sample's width: sum_b depth_b t(w_b)
    over B * layers * t(D), with t(w) the measured per-sample-layer time of
    padded_layer at width w (64 samples, 2 layers, interleaved)."""
    B, layers = 64, 2
    fns = {}
    for w in sorted(set(widths.tolist())) + [W["D"]]:
        x = torch.randn(B, seq_len, w)

        def f(x=x, w=w):
            with torch.inference_mode():
                for p in W["layers"][:layers]:
                    P.padded_layer(x, p, w, W["heads"], W["ratio"])
        fns[w] = f
    res = timing.interleaved(fns, rounds=rounds, warmup=1)
    t = {w: r["median_ms"] / (B * layers) for w, r in res.items()}
    total = sum(int(d) * t[int(w)] for w, d in zip(widths, depths))
    return total / (len(widths) * len(W["layers"]) * t[W["D"]]), \
        {w: t[w] / t[W["D"]] for w in t}


def verify(W, batch, canet, masked) -> float:
    """Max abs difference of canet vs the masked formulation on real tokens;
    raises when they differ."""
    with torch.inference_mode():
        got = canet.padded(canet.forward(W, batch), batch)
        want = masked.forward(W, batch)
    v = batch.valid()
    diff = ((got - want) * v).abs().max().item()
    if not torch.allclose(got * v, want * v, atol=1e-4, rtol=1e-4):
        raise SystemExit(f"canet's output differs from the masked formulation "
                         f"(max abs diff {diff:.3g}): refusing to time it")
    return diff


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    alloc = timing.pin_malloc()
    D, layers, heads = 128, 8, 4
    W = P.make_weights(D, layers, heads=heads, seed=args.seed)
    widths, depths = P.sample_routes(args.batch, "uniform", seed=args.seed)
    batch = P.make_batch(widths, depths, args.seq_len, D, seed=args.seed)
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    provs, skipped = P.backbone_providers("cpu", names)
    for n, why in skipped.items():
        print(f"skipping {n}: {why}")
    diff = verify(W, batch, P.Canet(), P.Masked())
    if "proto" in names:
        provs["proto"] = P.Canet("proto", ProtoOps())
        d2 = verify(W, batch, provs["proto"], P.Masked())
        print(f"check: proto == masked (max abs diff {d2:.2e})")
    print(f"check: canet-cpu == masked on every real token (max abs diff {diff:.2e})")

    lengths = batch.lengths
    routed = FL.backbone_flops(lengths, widths, depths)
    dense = FL.dense_flops(args.batch, args.seq_len, D, layers)
    ratio = routed / dense
    fns = {n: (lambda p=p: P.run_forward(p, W, batch)) for n, p in provs.items()}
    res = timing.interleaved(fns, rounds=args.rounds, warmup=args.warmup)
    info = timing.machine_info()
    print(f"machine: {timing.machine_name(info)}; torch {info['torch']}; "
          f"canet {info['canet_commit']}; {alloc}")
    print(f"batch {args.batch} x {args.seq_len} tokens, uniform routes over widths "
          f"{P.WIDTHS} x depths {P.DEPTHS}, {heads} heads, fp32, forward; "
          f"{args.rounds} interleaved rounds")
    print(f"routed FLOP ratio {ratio:.3f} (routed {routed / 1e9:.2f} GFLOP, "
          f"dense {dense / 1e9:.2f} GFLOP; causal pairs n(n+1)/2)")
    dense_ms = res["dense"]["median_ms"] if "dense" in res else None
    print(f"{'provider':<12}{'median ms':>11}{'p25-p75 ms':>19}{'min-max ms':>19}"
          f"{'/ dense':>9}{'/ (dense*ratio)':>17}{'GFLOP/s':>9}")
    rows = []
    for n in names:
        if n not in res:
            continue
        s = res[n]
        fl = dense if n == "dense" else routed
        rel = s["median_ms"] / dense_ms if dense_ms else float("nan")
        row = dict(provider=n, **s, time_over_dense=rel,
                   realized_over_theory=rel / ratio if n != "dense" else None,
                   gflops=fl / (s["median_ms"] * 1e6))
        rows.append(row)
        rot = f"{rel / ratio:17.3f}" if n != "dense" else f"{'':>17}"
        print(f"{n:<12}{s['median_ms']:11.1f}{s['p25_ms']:9.1f}-{s['p75_ms']:<9.1f}"
              f"{s['min_ms']:9.1f}-{s['max_ms']:<9.1f}{rel:9.3f}{rot}"
              f"{row['gflops']:9.1f}")
    if "canet-cpu" in res and dense_ms:
        rel = res["canet-cpu"]["median_ms"] / dense_ms
        target = 1.05 * ratio
        verdict = "meets" if rel <= target else "misses"
        print(f"target canet-cpu / dense <= 1.05 x FLOP ratio = {target:.3f}: "
              f"measured {rel:.3f} -> {verdict}")
    bound = None
    if args.width_bound:
        bound, rel_t = width_bound(W, widths, depths, args.seq_len, args.rounds)
        flops_rel = {w: (w / D) ** 2 for w in rel_t}
        print("dense PyTorch layer time at width w / at 128 (FLOPs ~ (w/128)^2): "
              + ", ".join(f"{w}: {rel_t[w]:.3f} ({flops_rel[w]:.3f})" for w in sorted(rel_t)))
        print(f"per-width efficiency bound for this batch: time ratio {bound:.3f} "
              f"= {bound / ratio:.3f} x FLOP ratio")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "allocator": alloc,
                       "flop_ratio": ratio,
                       "width_bound": bound,
                       "routed_gflop": routed / 1e9, "dense_gflop": dense / 1e9,
                       "check_max_abs_diff": diff, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
