"""Wall time per training epoch of `canet train` on 1 process and under
torchrun on several (gloo, CPU), with and without --shard-items.

    python benchmarks/bench_distributed.py [--epochs 3] [--users 4000] [--items 400]
                                           [--two-threads]

Each setting is one `canet train` run on the synthetic data (the demo's
routing space); the time per epoch is the run's training time (evaluation
excluded, the slowest rank's) over its epochs. `--two-threads` adds one
process on 2 intra-op threads (on a loaded machine OpenMP can stall it
badly). Prints a table and writes JSON to benchmarks/results/distributed/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (  # (processes, threads per process, extra arguments)
    (1, 1, []), (2, 1, []), (2, 1, ["--shard-items"]))


def run(procs, threads, extra, args, out):
    cmd = [sys.executable, "-m", "canet_kernels.cli", "train"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(procs), "--standalone", "-m", "canet_kernels.cli", "train"]
    cmd += ["--synthetic-users", str(args.users), "--synthetic-items", str(args.items),
            "--emb-widths", "32,48,64", "--hidden-widths", "32,48,64", "--depths", "1,2,3,4",
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--threads", str(threads), "--no-progress", "--out", out, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    return {"processes": procs, "threads": threads, "extra": " ".join(extra),
            "epoch_s": res["train_seconds"] / res["epochs_run"], "wall_s": wall,
            "test_ndcg@10": res["test"]["ndcg@10"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--two-threads", action="store_true",
                   help="also 1 process x 2 threads")
    args = p.parse_args()
    settings = SETTINGS + (((1, 2, []),) if args.two_threads else ())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (procs, threads, extra) in enumerate(settings):
            rows.append(run(procs, threads, extra, args, os.path.join(tmp, str(i))))
            r = rows[-1]
            print(f"{procs} process(es) x {threads} thread(s) {r['extra']:14s} "
                  f"{r['epoch_s']:7.2f} s/epoch   whole run {r['wall_s']:6.1f} s   "
                  f"test ndcg@10 {r['test_ndcg@10']:.4f}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out_dir = os.path.join(ROOT, "benchmarks", "results", "distributed")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, time.strftime("bench_distributed_%Y%m%d_%H%M.json"))
    with open(path, "w") as f:
        json.dump({"args": vars(args), "cpus": os.cpu_count(), "load_after": load,
                   "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
