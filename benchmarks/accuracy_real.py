"""Accuracy and compute of CANet against the alternatives a user would pick,
on real data.

Beauty and LastFM (S3Rec preprocessing, ../shared/data; any RecBole .inter
file too), leave-one-out, full ranking over all items, max length 50, every
model selected on validation and tested once. Models (--models):
  dense     the max-size model (every route fixed to the max)
  canet     router + supernet: --warmup-epochs of sandwich supernet training
            (router off), then the router with the CANet losses; before every
            validation the inference cost bias is set on validation users so
            the argmax routes meet --flop-target (--no-calibrate-flops: plain
            argmax)
  static    the best single route whose FLOP ratio is at most CANet's measured
            mean (validation users; --static-max-ratio without a canet run),
            trained on its own with the same epochs, patience and selection:
            the --static-candidates largest such routes are trained and the
            best on validation is tested
  supernet  the supernet trained by sandwich warm-up alone (no router),
            epochs selected on its max route, then its best fixed route under
            the same FLOP cap chosen on validation
FLOP ratios are always against the max route of the full routing space.
Every run's JSON has its route distribution and the mean FLOP ratio per
quartile of history length; CANet's also per quartile of the dense model's
test loss on each user (does the route follow how hard the user is?) and the
router's logit spread across users against between routes (a router that
learned a prior over routes has the first near 0). CANet against the others
gets a paired bootstrap 95% interval of the NDCG@10 ratio over test users.
The router switches of CANetConfig are options (--balance, --guide-signal,
...); --dense-from reuses a finished dense run, which they do not change.
Targets: CANet NDCG@10 >= 0.99 x dense with >= 55% fewer routed FLOPs, and
>= 1.02 x static.
Results and commands of the runs made so far:
benchmarks/results/accuracy/README.md.

    python benchmarks/accuracy_real.py --epochs 60
    python benchmarks/accuracy_real.py --datasets LastFM --epochs 1 --limit-users 200  # smoke
    python benchmarks/accuracy_real.py --table runs/lastfm_s0.json runs/lastfm_s1.json  # tables

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
import torch.nn.functional as F  # noqa: E402

from canet_kernels import data as D  # noqa: E402
from canet_kernels.cli import route_table  # noqa: E402
from canet_kernels.metrics import format_metrics  # noqa: E402
from canet_kernels.model import CANetConfig  # noqa: E402
from canet_kernels.options import (MODEL_OPTIONS, TRAIN_OPTIONS, add_options,  # noqa: E402
                                   from_options)
from canet_kernels.train import (TrainConfig, eval_batches, evaluate,  # noqa: E402
                                 load_model, logit_spread, probe_halves, protocol,
                                 quartile_means, route_flop_ratios, router_logits,
                                 time_inference, train)


KINDS = ("dense", "canet", "static", "supernet")
# this protocol's settings; everything else is CANetConfig's / TrainConfig's
MODEL_DEFAULTS = {"flop_target": 0.40}
TRAIN_DEFAULTS = {"epochs": 60, "patience": 10, "mask_seen": True, "warmup_epochs": 10}


def read_dataset(data_dir, name, limit_users=None):
    """`Beauty` -> Beauty.txt (users format); `ml-100k.inter` -> that RecBole
    file; the first `limit_users` users only (smoke runs)."""
    fname = name if name.endswith(".inter") else f"{name}.txt"
    ds = D.read_file(os.path.join(data_dir, fname))  # format from the extension
    if limit_users:
        ds.sequences, ds.users = ds.sequences[:limit_users], ds.users[:limit_users]
    return ds


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--datasets", nargs="+", default=["Beauty", "LastFM"])
    add_options(p, CANetConfig, MODEL_OPTIONS, MODEL_DEFAULTS, "model")
    add_options(p, TrainConfig, TRAIN_OPTIONS, TRAIN_DEFAULTS, "training")
    p.add_argument("--models", nargs="+", default=["dense", "canet", "static"],
                   choices=KINDS)
    p.add_argument("--static-candidates", type=int, default=1,
                   help="static: train this many of the largest routes under the cap "
                        "and keep the best on validation")
    p.add_argument("--static-max-ratio", type=float, default=None,
                   help="FLOP cap for static/supernet without a canet run")
    p.add_argument("--windows", action="store_true",
                   help="cut long training histories into several examples")
    p.add_argument("--limit-users", type=int, default=None, help="first N users (smoke runs)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--dense-from", default=None, metavar="RUN_DIR",
                   help="dense: read the finished dense run of each data set from this "
                        "--run-dir (its best weights, tested again) instead of training "
                        "it; the routing switches do not change the dense model")
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "accuracy_real"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "accuracy_real.json"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the markdown table of these finished runs (one row per "
                        "data set and seed, then the seed means) and exit")
    return p.parse_args()


def bootstrap_ratio(a, b, n=1000, seed=0):
    """Paired bootstrap over users: 95% interval of mean(a) / mean(b)."""
    a = torch.tensor(a, dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(a), (n, len(a)), generator=g)
    r = a[idx].mean(1) / b[idx].mean(1).clamp_min(1e-12)
    lo, hi = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(lo), float(hi)]


def single_route(mcfg, route):
    """A CANetConfig whose routing space is one route of mcfg's (no rungs)."""
    e, d, depth = mcfg.routes()[route]
    return CANetConfig.from_dict(dict(mcfg.to_dict(), emb_widths=[e], hidden_widths=[d],
                                      depths=[depth], rungs=0))


def routes_under(mcfg, cap, n):
    """The n routes with the largest FLOP ratio <= cap, largest first."""
    ratios = mcfg.route_flop_ratios()
    ok = [r for r in range(mcfg.num_routes) if ratios[r] <= cap + 1e-12]
    return sorted(ok, key=lambda r: -ratios[r])[:n]


@torch.no_grad()
def target_losses(model, es, route, batch_size=256):
    """Cross-entropy of each user's target under `route` [U] (eval mode,
    padding id excluded): how hard the user is for that model."""
    was = model.training
    model.eval()
    out, start = [], 0
    for items, lengths in eval_batches(es, batch_size):
        scores, _ = model(items, lengths, model.fixed_routes(len(lengths), route))
        scores[:, 0] = float("-inf")
        targets = es.targets[start:start + len(lengths)]
        out.append(F.cross_entropy(scores.float(), targets, reduction="none"))
        start += len(lengths)
    model.train(was)
    return torch.cat(out)


def run(a, kind, mcfg, tcfg, split, out, source, ref):
    """Trains one model and returns (model, results with test metrics
    per user, FLOP ratios against `ref`)."""
    resume = a.resume and os.path.exists(os.path.join(out, "last.safetensors"))
    t0 = time.perf_counter()
    model, res = train(mcfg, tcfg, split, out, source, resume=resume)
    res["wall_seconds"] = time.perf_counter() - t0
    route = tcfg.fixed_route if tcfg.fixed_route is not None else tcfg.eval_route
    res["test"] = evaluate(model, split.test, tcfg.ks, tcfg.mask_seen, route=route,
                           flop_ref=ref, per_user=True)
    res["inference_seconds_test"] = time_inference(model, split.test, route, repeats=1)
    return model, res


def validation_halves(models, split, base, mcfg) -> dict:
    """With --rung-probe-split the probe chooses CANet's rungs on one half of
    the validation users and CANet's epochs are selected on the other: every
    model's validation metric on each half ({"probe": {kind: value},
    "selection": ...}), so that CANet and its comparators are compared on
    the same users, on the half that chose CANet's routes and on the half
    that did not."""
    route = {"dense": mcfg.max_route, "canet": None, "static": 0}   # static: its one route
    return {name: {k: evaluate(m, split.valid.subset(users), base.ks, base.mask_seen,
                               route=route[k])[base.select_metric]
                   for k, m in models.items()}
            for name, users in zip(("probe", "selection"),
                                   probe_halves(len(split.valid), base.seed))}


def _quarters(q):
    return "/".join("-" if v is None else f"{v:.2f}" for v in q["mean"]) if q else "-"


def _vs(entry, other):
    r = entry.get(f"ndcg10_ratio_vs_{other}")
    return "-" if r is None else "{:.3f} [{:.2f}-{:.2f}]".format(r["ratio"], *r["ci95"])


def _mean_se(xs):
    """'mean (standard error)'; the mean alone for one seed."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.5f}"
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return f"{m:.5f} ({(var / len(xs)) ** 0.5:.5f})"


def markdown(reports):
    """The table of finished runs (the JSONs this script writes, with a canet
    run): one row per data set and seed, then per data set the seed means
    (standard error) of dense, CANet and static test NDCG@10 and their
    ratios."""
    rows = ["| data | seed | CANet valid / test NDCG@10 | FLOP ratio | routes (test users) | "
            "FLOP ratio by length quarter (short first) | by dense-loss quarter (easy first) "
            "| logit spread users / routes | static: route, test (FLOP ratio) | "
            "CANet / dense [95% CI] | CANet / static [95% CI] | train s CANet (static) |",
            "|" + "---|" * 12]
    means, halves = {}, []
    for rep in reports:
        seed = rep["settings"]["seed"]
        for name, e in rep["datasets"].items():
            c = e.get("canet")
            if c is None:
                raise SystemExit(f"--table: {name} (seed {seed}) has no canet run")
            t, st = c["test"], e.get("static")
            routes = ", ".join(f"{r}: {n}" for r, n in enumerate(t["route_counts"]) if n)
            spread = c.get("logit_spread")
            rows.append(
                f"| {name} | {seed} | {c['valid']['ndcg@10']:.4f} / {t['ndcg@10']:.4f} | "
                f"{t['flop_ratio']:.3f} | {routes} | "
                f"{_quarters(t.get('flop_ratio_by_length_quartile'))} | "
                f"{_quarters(e.get('canet_flop_ratio_by_dense_loss_quartile'))} | "
                + ("-" if spread is None else
                   f"{spread['across_users']:.2f} / {spread['between_routes']:.2f}") + " | "
                + ("-" if st is None else f"{st['route']}, {st['test']['ndcg@10']:.4f} "
                                          f"({st['test']['flop_ratio']:.3f})")
                + f" | {_vs(e, 'dense')} | {_vs(e, 'static')} | {c['train_seconds']:.0f}"
                + ("" if st is None else f" ({st['train_seconds']:.0f})") + " |")
            m = means.setdefault(name, {"canet": [], "dense": [], "static": [], "flop": []})
            m["canet"].append(t["ndcg@10"])
            m["flop"].append(t["flop_ratio"])
            for other in ("dense", "static"):
                if other in e:
                    m[other].append(e[other]["test"]["ndcg@10"])
            if "valid_halves" in e:
                halves.append((name, seed, e))
    rows += ["", "| data | seeds | dense | CANet | static | CANet / dense | CANet / static |",
             "|" + "---|" * 7]
    for name, m in means.items():
        cell = {k: _mean_se(v) if v else "-" for k, v in m.items()}
        flop = sum(m["flop"]) / len(m["flop"])
        canet = sum(m["canet"]) / len(m["canet"])

        def ratio(other):
            # the seed means' ratio, only over as many seeds as CANet's
            v = m[other]
            ok = len(v) == len(m["canet"]) and sum(v) > 0
            return f"{canet / (sum(v) / len(v)):.3f}" if ok else "-"
        rows.append(f"| {name} | {len(m['canet'])} | {cell['dense']} | {cell['canet']}, FLOP "
                    f"{flop:.3f} | {cell['static']} | {ratio('dense')} | {ratio('static')} |")
    return "\n".join(rows + _halves_table(halves))


def _halves_table(halves):
    """Runs with --rung-probe-split: CANet / dense and CANet / static on the
    validation half that chose CANet's routes, on the half that selected its
    epochs, and on test; then the same ratios of the seed means."""
    if not halves:
        return []
    rows = ["", "| data | seed | CANet / dense, / static: validation, the probe's half | "
                "validation, the selection half | test |", "|" + "---|" * 5]
    parts = ("probe", "selection", "test")
    sums: dict = {}

    def pair(v):
        return ", ".join(f"{v['canet'] / v[k]:.3f}" if v.get(k) else "-"
                         for k in ("dense", "static"))
    for name, seed, e in halves:
        vals = dict(e["valid_halves"], test={k: e[k]["test"]["ndcg@10"] for k in
                                             ("canet", "dense", "static") if k in e})
        rows.append(f"| {name} | {seed} | " + " | ".join(pair(vals[p]) for p in parts) + " |")
        for p in parts:
            for k, v in vals[p].items():
                sums.setdefault(name, {}).setdefault(p, {}).setdefault(k, []).append(v)
    for name, by in sums.items():
        mean = {p: {k: sum(v) / len(v) for k, v in by[p].items()} for p in parts}
        n = len(by["test"]["canet"])
        rows.append(f"| {name} | means of {n} | " + " | ".join(pair(mean[p]) for p in parts)
                    + " |")
    return rows


def read_reports(paths, flag):
    """The JSON files `paths`; one that cannot be read is named in an error
    that names the option `flag` too."""
    reports = []
    for path in paths:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{flag}: cannot read {path}: {e}")
    return reports


def main():
    a = parse()
    if a.table:
        print(markdown(read_reports(a.table, "--table")))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = [k for k in KINDS if k in a.models and not (a.skip_dense and k == "dense")]
    report = {"settings": vars(a), "datasets": {}}
    for name in a.datasets:
        ds = read_dataset(a.data_dir, name, a.limit_users)
        print(ds.summary())
        split = D.leave_one_out(ds, a.max_len, windows=a.windows)
        mcfg = from_options(CANetConfig, a, MODEL_OPTIONS, n_items=ds.n_items)
        base = from_options(TrainConfig, a, TRAIN_OPTIONS)
        runs, models, cap = {}, {}, a.static_max_ratio
        for kind in kinds:
            print(f"--- {name}: {kind}")
            out = os.path.join(a.run_dir, name, kind)
            if kind == "dense" and a.dense_from:
                src = os.path.join(a.dense_from, name, "dense")
                model, _ = load_model(src)
                with open(os.path.join(src, "results.json")) as f:
                    res = json.load(f)
                res["test"] = evaluate(model, split.test, base.ks, base.mask_seen,
                                       route=mcfg.max_route, flop_ref=mcfg, per_user=True)
                res["read_from"] = src
                models[kind] = model
            elif kind in ("dense", "canet"):
                tcfg = TrainConfig.from_dict(dict(
                    base.to_dict(), warmup_epochs=base.warmup_epochs if kind == "canet" else 0,
                    fixed_route=mcfg.max_route if kind == "dense" else None))
                model, res = run(a, kind, mcfg, tcfg, split, out, ds.source, mcfg)
                models[kind] = model
                if kind == "canet":
                    cap = res["valid"]["flop_ratio"]
                    res["logit_spread"] = logit_spread(router_logits(model, split.test))
                    print(route_table(mcfg, res["test"]["route_counts"]))
                    print("router logit spread across users {across_users:.3f}, between "
                          "routes {between_routes:.3f}".format(**res["logit_spread"]))
            elif kind == "supernet":
                tcfg = TrainConfig.from_dict(dict(base.to_dict(), warmup_epochs=base.epochs,
                                                  eval_route=mcfg.max_route))
                model, res = run(a, kind, mcfg, tcfg, split, out, ds.source, mcfg)
                if cap is None:
                    raise SystemExit("supernet needs a FLOP cap: run canet first or "
                                     "give --static-max-ratio")
                # its best fixed route under the cap, chosen on validation
                cands = routes_under(mcfg, cap, mcfg.num_routes)
                val = {r: evaluate(model, split.valid, tcfg.ks, tcfg.mask_seen, route=r)
                       [tcfg.select_metric] for r in cands}
                best = max(val, key=val.get)
                res["route"], res["valid_by_route"] = best, val
                res["test"] = evaluate(model, split.test, tcfg.ks, tcfg.mask_seen,
                                       route=best, flop_ref=mcfg, per_user=True)
            else:  # static
                if cap is None:
                    raise SystemExit("static needs a FLOP cap: run canet first or give "
                                     "--static-max-ratio")
                tried, trained = {}, {}
                for r in routes_under(mcfg, cap, a.static_candidates):
                    scfg = single_route(mcfg, r)
                    tcfg = TrainConfig.from_dict(dict(base.to_dict(), warmup_epochs=0,
                                                      fixed_route=0))
                    m, rr = run(a, kind, scfg, tcfg, split, f"{out}_route{r}", ds.source,
                                mcfg)
                    rr["route"] = r
                    tried[r], trained[r] = rr, m
                best = max(tried, key=lambda r: tried[r]["valid"][tcfg.select_metric])
                models[kind] = trained[best]
                res = dict(tried[best], candidates={
                    r: {"valid": v["valid"][tcfg.select_metric],
                        "flop_ratio": v["test"]["flop_ratio"]} for r, v in tried.items()})
            runs[kind] = res
            t = res["test"]
            print(f"{kind}: test {format_metrics(t)}  FLOP ratio {t['flop_ratio']:.3f}  "
                  f"routes used {t['routes_used']} (largest share "
                  f"{t['largest_share']:.0%})  training {res['train_seconds']:.0f}s "
                  f"(best epoch {res['best_epoch']})")
        entry = {"protocol": protocol(base) + f", max length {a.max_len}",
                 "users": len(ds.sequences), "items": ds.n_items, "flop_cap": cap,
                 **runs}
        if "canet" in runs:
            cn = runs["canet"]["test"]
            for other in ("dense", "static", "supernet"):
                if other not in runs:
                    continue
                on = runs[other]["test"]
                ratio = cn["ndcg@10"] / on["ndcg@10"] if on["ndcg@10"] > 0 else float("nan")
                ci = bootstrap_ratio(cn["per_user"]["ndcg@10"], on["per_user"]["ndcg@10"])
                entry[f"ndcg10_ratio_vs_{other}"] = {"ratio": ratio, "ci95": ci}
                print(f"{name}: CANet / {other} NDCG@10 x{ratio:.3f} (95% CI "
                      f"{ci[0]:.3f}-{ci[1]:.3f}); FLOP ratios {cn['flop_ratio']:.3f} vs "
                      f"{on['flop_ratio']:.3f}")
            if base.rung_probe_split and mcfg.rungs:
                entry["valid_halves"] = validation_halves(models, split, base, mcfg)
                for half, v in entry["valid_halves"].items():
                    print(f"{name}: validation {base.select_metric} on the {half} half: "
                          + ", ".join(f"{k} {x:.4f}" for k, x in v.items()))
            if "dense" in runs:
                # does the route follow how hard the user is for the dense model?
                loss = target_losses(models["dense"], split.test, mcfg.max_route)
                ratios = torch.tensor(route_flop_ratios(mcfg), dtype=torch.float64)
                by_loss = quartile_means(ratios[torch.tensor(cn["per_user"]["routes"])], loss)
                entry["canet_flop_ratio_by_dense_loss_quartile"] = by_loss
                print(f"{name}: CANet FLOP ratio by quartile of the dense model's test "
                      "loss (easiest first): " + " / ".join(
                          "-" if v is None else f"{v:.3f}" for v in by_loss["mean"]))
                r = entry["ndcg10_ratio_vs_dense"]["ratio"]
                entry["meets_dense_target"] = bool(r >= 0.99 and cn["flop_ratio"] <= 0.45)
        report["datasets"][name] = entry
        for res in runs.values():  # per-user lists are long; keep the JSON readable
            res["test"].pop("per_user", None)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
