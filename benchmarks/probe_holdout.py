"""Does a user's rung group tell which route serves them best? The probe's
choice measured on users it did not see.

CANet is trained as accuracy_real.py trains it, up to the rung epoch (the
same options; the run stops where the probe chooses the rungs). Then, on
the validation users split at random into two halves (--halves times),
the rung routes are chosen on one half as the probe chooses them
(train.choose_rungs: the same target, price floor and --rung-order) and
scored by NDCG@10 on the other half, against:
  one route   the best single route under the FLOP target, chosen on the
              first half: the static choice inside the same supernet;
  max route   the supernet's max route;
  shrunk      the probe with each group's metric shrunk toward all users'
              by lam pseudo-users, (n_g m_g + lam m) / (n_g + lam): lam = inf
              gives every group the same metric, so the groups differ only
              as --rung-order forces.
If the groups carried a real difference in which route is best, the probe
(lam = 0) would beat both one route and lam = inf on the held-out half.
Validation only: no test metric is read.

    python benchmarks/probe_holdout.py --datasets LastFM --seed 0 --balance switch \\
        --uniform-weight 3 --rungs 4 --rung-epoch 20 --rung-choice probe \\
        --rung-signal length --rung-cut served --rung-order rising --threads 1
    python benchmarks/probe_holdout.py --table runs/*_rising_probe_halves.json   # tables
Results: benchmarks/results/accuracy/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.accuracy_real import MODEL_DEFAULTS, TRAIN_DEFAULTS, read_dataset  # noqa: E402
from canet_kernels import data as D  # noqa: E402
from canet_kernels.model import CANetConfig  # noqa: E402
from canet_kernels.options import (MODEL_OPTIONS, TRAIN_OPTIONS, add_options,  # noqa: E402
                                   from_options)
from canet_kernels.train import (TrainConfig, choose_rungs, group_means,  # noqa: E402
                                 probe_groups, route_values, router_logits, served_cuts,
                                 train)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--datasets", nargs="+", default=["LastFM"])
    # accuracy_real.py's protocol defaults, so that its commands carry over
    add_options(p, CANetConfig, MODEL_OPTIONS, MODEL_DEFAULTS, "model")
    add_options(p, TrainConfig, TRAIN_OPTIONS, TRAIN_DEFAULTS, "training")
    p.add_argument("--halves", type=int, default=200,
                   help="random splits of the validation users into two halves")
    p.add_argument("--shrink", type=float, nargs="+", default=[0, 300, 1000, math.inf],
                   help="pseudo-users each group's metric is shrunk toward all users' by")
    p.add_argument("--limit-users", type=int, default=None, help="first N users (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the markdown table of these finished runs and exit")
    a = p.parse_args(argv)
    if a.halves < 1:
        p.error(f"--halves must be >= 1, got {a.halves}")
    if any(not lam >= 0 for lam in a.shrink):
        p.error(f"--shrink values must be >= 0, got {a.shrink}")
    return a


def choose(values, group, k, ratio, target, rising, lam):
    """The probe's rung routes [K] on these users, each group's metric
    shrunk toward all users' by `lam` pseudo-users."""
    n, m = group_means(values, group, k)
    every = values.mean(0)[None]
    m = every.expand_as(m).clone() if math.isinf(lam) else (n[:, None] * m + lam * every) / \
        (n[:, None] + lam)
    return choose_rungs(m, n, ratio, target, rising)


def held_out(values, group, k, ratio, target, rising, shrink, halves, seed):
    """Mean over random halves of the other half's NDCG@10 and FLOP ratio
    of each choice made on one half."""
    gen = torch.Generator().manual_seed(seed)
    cap = math.inf if target is None else target + 1e-9
    under = (ratio <= cap).nonzero().flatten()
    sums: dict = {}

    def add(name, ndcg, flops):
        s = sums.setdefault(name, [0.0, 0.0])
        s[0], s[1] = s[0] + ndcg / halves, s[1] + flops / halves

    for _ in range(halves):
        perm = torch.randperm(len(group), generator=gen)
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        for lam in shrink:
            r = choose(values[a], group[a], k, ratio, target, rising, lam)[group[b]]
            add(f"probe, shrink {lam:g}", float(values[b, r].mean()), float(ratio[r].mean()))
        one = under[values[a][:, under].mean(0).argmax()]
        add("one route", float(values[b, one].mean()), float(ratio[one]))
        top = ratio.argmax()
        add("max route", float(values[b, top].mean()), float(ratio[top]))
    return {name: {"ndcg@10": s[0], "flop_ratio": s[1]} for name, s in sums.items()}


def _over(x, one):
    return x / one if one else float("nan")     # a smoke run may score 0


def markdown(paths) -> str:
    """One row per data set and seed: each choice's held-out NDCG@10 as a
    multiple of one route's (FLOP ratio), then the means over seeds."""
    rows, by_data = [], {}
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        for name, d in rep["datasets"].items():
            res = d["held_out"]
            one = res["one route"]["ndcg@10"]
            by_data.setdefault(name, []).append({k: _over(v["ndcg@10"], one)
                                                  for k, v in res.items()})
            rows.append((name, rep["settings"]["seed"], res, one))
    names = list(rows[0][2]) if rows else []
    out = ["| data | seed | one route NDCG@10 | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for name, seed, res, one in sorted(rows, key=lambda r: (r[0], r[1])):
        cells = [f"{_over(res[k]['ndcg@10'], one):.3f} ({res[k]['flop_ratio']:.3f})"
                 for k in names]
        out.append(f"| {name} | {seed} | {one:.5f} | " + " | ".join(cells) + " |")
    for name, xs in sorted(by_data.items()):
        cells = []
        for k in names:
            v = torch.tensor([x[k] for x in xs], dtype=torch.float64)
            se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
            cells.append(f"{float(v.mean()):.3f} ({se:.3f})")
        out.append(f"| {name} | mean of {len(xs)} (standard error) | - | " + " | ".join(cells)
                   + " |")
    return "\n".join(out)


def main(argv=None):
    a = parse(argv)
    if a.table:
        print(markdown(a.table))
        return None
    if a.threads:
        torch.set_num_threads(a.threads)
    report = {"settings": vars(a), "datasets": {}}
    for name in a.datasets:
        ds = read_dataset(a.data_dir, name, a.limit_users)
        split = D.leave_one_out(ds, a.max_len)
        mcfg = from_options(CANetConfig, a, MODEL_OPTIONS, n_items=ds.n_items)
        if not mcfg.rungs or a.rung_choice != "probe":
            raise SystemExit("probe_holdout measures the probe: give --rungs K "
                             "--rung-choice probe")
        tcfg = from_options(TrainConfig, a, TRAIN_OPTIONS)
        # stop at the rung epoch: the weights the probe chose the rungs on
        tcfg = TrainConfig.from_dict(dict(tcfg.to_dict(), epochs=tcfg.rung_epoch,
                                          select_metric="ndcg@10"))
        model, _ = train(mcfg, tcfg, split)
        es = split.valid
        cuts = served_cuts(model, es) if tcfg.rung_cut == "served" else None
        group = probe_groups(model, es, router_logits(model, es), cuts)
        values = route_values(model, es, tcfg)
        ratio = model.route_ratio.cpu().double()
        res = held_out(values, group, mcfg.rungs, ratio, mcfg.flop_target,
                       tcfg.rung_order == "rising", a.shrink, a.halves, tcfg.seed)
        one = res["one route"]["ndcg@10"]
        sizes = torch.bincount(group, minlength=mcfg.rungs).tolist()
        print(f"{name}, seed {tcfg.seed}: {len(es)} validation users, groups {sizes}; "
              "held-out half:")
        for k, v in res.items():
            print(f"  {k:<22} NDCG@10 {v['ndcg@10']:.5f} ({_over(v['ndcg@10'], one):.3f} x one "
                  f"route)  FLOP ratio {v['flop_ratio']:.3f}")
        report["datasets"][name] = {"users": len(es), "held_out": res, "groups": sizes}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
