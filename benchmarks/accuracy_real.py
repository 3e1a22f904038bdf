"""Accuracy and compute of CANet vs the dense max-size model on real data.

Beauty and LastFM (S3Rec preprocessing, ../shared/data), leave-one-out,
full ranking over all items, max length 50. The dense baseline is the same
code with every route fixed to the max; CANet trains the router with the
FLOP budget. Targets: CANet NDCG@10 >= 0.99 x dense with >= 55% fewer
routed FLOPs.

CANet here: --warmup-epochs of sandwich supernet training (router off), then
the router with the CANet losses; before every validation the inference
cost bias is set on validation users so the argmax routes meet --flop-target
(--no-calibrate-flops: plain argmax). Results and commands of the runs made so far:
benchmarks/results/accuracy/README.md.

    python benchmarks/accuracy_real.py --epochs 60
    python benchmarks/accuracy_real.py --datasets LastFM --epochs 1 --limit-users 200  # smoke

Not part of CI: a full run needs hours on 2 CPU cores (a GPU is better).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from canet_kernels import data as D  # noqa: E402
from canet_kernels.cli import route_table  # noqa: E402
from canet_kernels.metrics import format_metrics  # noqa: E402
from canet_kernels.model import CANetConfig  # noqa: E402
from canet_kernels.options import (MODEL_OPTIONS, TRAIN_OPTIONS, add_options,  # noqa: E402
                                   from_options)
from canet_kernels.train import TrainConfig, protocol, time_inference, train  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--datasets", nargs="+", default=["Beauty", "LastFM"])
    # this protocol's settings; everything else is CANetConfig's / TrainConfig's
    add_options(p, CANetConfig, MODEL_OPTIONS, {"flop_target": 0.40}, "model")
    add_options(p, TrainConfig, TRAIN_OPTIONS,
                {"epochs": 60, "patience": 10, "mask_seen": True,
                 "warmup_epochs": 10}, "training")
    p.add_argument("--models", nargs="+", default=["dense", "canet"],
                   choices=["dense", "canet"])
    p.add_argument("--windows", action="store_true",
                   help="cut long training histories into several examples")
    p.add_argument("--limit-users", type=int, default=None, help="first N users (smoke runs)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "accuracy_real"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "accuracy_real.json"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p.parse_args()


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    report = {"settings": vars(a), "datasets": {}}
    for name in a.datasets:
        # `Beauty` -> Beauty.txt (users format); `ml-100k.inter` -> that RecBole file
        fname = name if name.endswith(".inter") else f"{name}.txt"
        ds = D.read_file(os.path.join(a.data_dir, fname))  # format from the extension
        if a.limit_users:
            ds.sequences, ds.users = ds.sequences[:a.limit_users], ds.users[:a.limit_users]
        print(ds.summary())
        split = D.leave_one_out(ds, a.max_len, windows=a.windows)
        mcfg = from_options(CANetConfig, a, MODEL_OPTIONS, n_items=ds.n_items)
        runs = {}
        kinds = [k for k in a.models if not (a.skip_dense and k == "dense")]
        for kind in kinds:
            tcfg = from_options(TrainConfig, a, TRAIN_OPTIONS,
                                fixed_route=mcfg.max_route if kind == "dense" else None)
            if kind == "dense":
                tcfg.warmup_epochs = 0
            out = os.path.join(a.run_dir, name, kind)
            resume = a.resume and os.path.exists(os.path.join(out, "last.safetensors"))
            print(f"--- {name}: {kind}")
            t0 = time.perf_counter()
            model, res = train(mcfg, tcfg, split, out, ds.source, resume=resume)
            wall = time.perf_counter() - t0
            route = "max" if kind == "dense" else None
            res["inference_seconds_test"] = time_inference(model, split.test, route,
                                                           repeats=1)
            res["wall_seconds"] = wall
            runs[kind] = res
            print(f"{kind}: test {format_metrics(res['test'])}  FLOP ratio "
                  f"{res['test']['flop_ratio']:.3f}  training {res['train_seconds']:.0f}s "
                  f"(best epoch {res['best_epoch']})")
            if kind == "canet":
                print(route_table(mcfg, res["test"]["route_counts"]))
        entry = {"protocol": protocol(tcfg) + f", max length {a.max_len}",
                 "users": len(ds.sequences), "items": ds.n_items, **runs}
        if "dense" in runs and "canet" in runs:
            dn, cn = runs["dense"]["test"], runs["canet"]["test"]
            ratio = cn["ndcg@10"] / dn["ndcg@10"] if dn["ndcg@10"] > 0 else float("nan")
            saved = 1 - cn["flop_ratio"]
            entry["ndcg10_ratio"] = ratio
            entry["flops_saved"] = saved
            entry["meets_target"] = bool(ratio >= 0.99 and saved >= 0.55)
            print(f"{name} [{entry['protocol']}]")
            print(f"  dense NDCG@10 {dn['ndcg@10']:.4f}  CANet NDCG@10 {cn['ndcg@10']:.4f} "
                  f"(x{ratio:.3f}, target >= 0.99); routed FLOPs {saved:.1%} fewer "
                  f"(target >= 55%) -> {'met' if entry['meets_target'] else 'NOT met'}")
        report["datasets"][name] = entry
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
