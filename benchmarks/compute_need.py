"""Is a user's gain from compute predictable? The ceiling of any router.

A router can only beat a static model of the same cost if the users who gain
from a larger model can be told apart before their next item is known. This
script measures that with two trained models of one data set and seed, a
large one (dense: the max route) and a small one (static: one cheap route),
each selected on validation (pass their run folders, e.g. `accuracy_real.py`'s
or `canet train`'s; the data and the split are the large run's):

* for every user, the target's cross-entropy under both models on the
  validation target and on the test target (one item later), and the gain
  from compute = CE(small) - CE(large);
* Spearman correlations: difficulty (the large model's CE) and gain between
  the validation and the test target of the same user, and the test gain
  against history length;
* routers with knowledge no real router has: a share f of the users takes
  the large model, the rest the small one, chosen by (a) the largest gain
  measured on the user's own validation target, (b) the longest histories,
  (c) the shortest; test NDCG@10 of each against a random choice of the same
  share (its expectation per user, f * large + (1 - f) * small), with a
  paired bootstrap interval over test users. If (a) does not beat random,
  the gain is not a property of the user that any router could learn.

    python benchmarks/compute_need.py --pair /tmp/r/LastFM/dense /tmp/r/LastFM/static_route29 \
        --out benchmarks/results/accuracy/compute_need_lastfm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from canet_kernels import data as D  # noqa: E402
from canet_kernels.train import evaluate, load_model  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from accuracy_real import bootstrap_ratio, target_losses  # noqa: E402


def spearman(a, b) -> float:
    """Spearman rank correlation of two [N] tensors (ties: average ranks)."""
    def ranks(x):
        x = x.double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # average the ranks of ties
        uniq, inv = torch.unique(x, return_inverse=True)
        s = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        n = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (s / n)[inv]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def per_user(model, es, mask_seen):
    """(target CE [U], NDCG@10 [U]) of the model's max route."""
    ce = target_losses(model, es, model.cfg.max_route)
    res = evaluate(model, es, (10,), mask_seen, route="max", per_user=True)
    return ce, torch.tensor(res["per_user"]["ndcg@10"], dtype=torch.float64)


def top_share(score, f):
    """bool [U]: the share f of users with the largest score (ties by order)."""
    k = int(round(f * len(score)))
    chosen = torch.zeros(len(score), dtype=torch.bool)
    chosen[score.double().argsort(descending=True, stable=True)[:k]] = True
    return chosen


def analyse(split, large, small, shares, mask_seen):
    ce_lv, _ = per_user(large, split.valid, mask_seen)
    ce_sv, _ = per_user(small, split.valid, mask_seen)
    ce_lt, nd_lt = per_user(large, split.test, mask_seen)
    ce_st, nd_st = per_user(small, split.test, mask_seen)
    if not torch.equal(split.valid.users, split.test.users):
        raise ValueError("validation and test users differ in order")
    gain_v, gain_t = ce_sv - ce_lv, ce_st - ce_lt
    length = split.test.lengths.double()
    out = {"users": len(split.test),
           "test_ndcg@10": {"large": float(nd_lt.mean()), "small": float(nd_st.mean())},
           "spearman": {"difficulty_valid_vs_test": spearman(ce_lv, ce_lt),
                        "gain_valid_vs_test": spearman(gain_v, gain_t),
                        "gain_test_vs_length": spearman(gain_t, length),
                        "difficulty_test_vs_length": spearman(ce_lt, length)},
           "mean_test_gain_by_length_quartile": quartiles(gain_t, length),
           "routers": {}}
    for f in shares:
        rows = {name: share_router(score, f, nd_lt, nd_st, gain_t)
                for name, score in (("validation_gain", gain_v), ("longest", length),
                                    ("shortest", -length))}
        rows["random"] = {"test_ndcg@10": float((f * nd_lt + (1 - f) * nd_st).mean())}
        out["routers"][str(f)] = rows
    return out


def share_router(score, f, large, small, gain):
    """The share f of users with the largest `score` on the large model, the
    rest on the small one: their mean metric (per-user `large`, `small`
    [U]), its ratio to a random choice of the same share (expectation
    f * large + (1 - f) * small per user) with a paired bootstrap interval,
    and the mean `gain` of the chosen users and of the others."""
    pick = top_share(score, f)
    got = torch.where(pick, large, small)
    rand = f * large + (1 - f) * small
    return {"test_ndcg@10": float(got.mean()), "vs_random": float(got.mean() / rand.mean()),
            "ci95": list(bootstrap_ratio(got.tolist(), rand.tolist())),
            "test_gain_of_chosen": float(gain[pick].mean()),
            "test_gain_of_others": float(gain[~pick].mean())}


def quartiles(value, key):
    """Mean of `value` per quartile of `key` (upper bounds, means)."""
    q = torch.quantile(key, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    g = torch.bucketize(key, q, right=True)
    return {"upper_bounds": q.tolist(),
            "mean": [float(value[g == i].mean()) if bool((g == i).any()) else None
                     for i in range(4)]}


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", nargs=2, action="append", required=True,
                   metavar=("LARGE_RUN", "SMALL_RUN"),
                   help="run folders of the large and the small model (repeat per seed)")
    p.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    return p.parse_args()


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    for f in a.shares:
        if not 0 < f < 1:
            raise SystemExit(f"--shares: each share must be in (0, 1), got {f}")
    report = {"pairs": []}
    for large_dir, small_dir in a.pair:
        large, cfg = load_model(large_dir)
        small, small_cfg = load_model(small_dir)
        if small_cfg["data"] != cfg["data"] or small.cfg.max_len != large.cfg.max_len:
            raise SystemExit(f"--pair {large_dir} {small_dir}: the runs' data or max_len differ")
        split = D.leave_one_out(D.load(cfg["data"]), large.cfg.max_len)
        mask_seen = bool(cfg["train"]["mask_seen"])
        res = analyse(split, large, small, a.shares, mask_seen)
        res.update(large=large_dir, small=small_dir, data=cfg["data"], mask_seen=mask_seen,
                   small_route=list(small.cfg.routes()[0]))
        report["pairs"].append(res)
        s = res["spearman"]
        print(f"{small_dir}: NDCG@10 large {res['test_ndcg@10']['large']:.4f} "
              f"small {res['test_ndcg@10']['small']:.4f} | spearman difficulty valid/test "
              f"{s['difficulty_valid_vs_test']:.3f}, gain valid/test {s['gain_valid_vs_test']:.3f}, "
              f"gain/length {s['gain_test_vs_length']:.3f} | test gain by length quartile "
              + " / ".join("-" if v is None else f"{v:.3f}"
                           for v in res["mean_test_gain_by_length_quartile"]["mean"]))
        for f, rows in res["routers"].items():
            print(f"  share {f} on the large model: random {rows['random']['test_ndcg@10']:.4f}; "
                  + "; ".join(f"{n} {r['test_ndcg@10']:.4f} (x{r['vs_random']:.3f} "
                              f"[{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}])"
                              for n, r in rows.items() if n != "random"))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
