"""Does the router personalise, and does it beat a static route of the same
cost? A controlled check on the `canet demo` synthetic data, whose users are
of two known kinds (simple: short, one global chain; complex: long,
user-specific patterns), so a router that personalises should send the
complex users to larger routes.

For every seed and router variant (one change against the default each):
  canet   router + supernet with the demo's settings, epochs selected on
          validation NDCG@10, test evaluated once
  static  the best single route whose FLOP ratio is at most that CANet's
          measured mean on the validation users, trained alone with the same
          epochs, patience and selection: the --static-candidates largest
          such routes are trained (cached per seed and route) and the best on
          validation is tested
Reported per run: test NDCG@10 / Recall@10, validation NDCG@10, FLOP ratio,
routes used, largest share, simple vs complex users' mean FLOP ratio, the
router's logit spread across users against the spread between routes, and
training time; CANet / static NDCG@10 with a paired bootstrap 95% interval
over test users. JSON (written after every run; --resume skips finished
CANet runs) in benchmarks/results/accuracy/.

    python benchmarks/router_ablation.py --threads 1                  # all variants
    python benchmarks/router_ablation.py --variants default switch --seeds 0
    python benchmarks/router_ablation.py --merge s0.json s1.json s2.json --out all.json

With --finetune-epochs N (its own JSON, router_ablation_finetune.json by
default): after each CANet run the router is frozen (its argmax routes with
the calibrated cost bias, as evaluated) and the supernet is fine-tuned for N
epochs with every training user on its own fixed route (the route the router
gives it on its validation history), same optimizer settings (a fresh Adam)
and batching; the epoch (0 = no fine-tuning) is selected on validation
NDCG@10 with the routes fixed and the test set is evaluated once, on the
test routes the router gave before fine-tuning. The static comparator is at
the fine-tuned run's FLOP ratio; --static-total-seeds also trains it for the
same total epochs (--epochs + N) on those seeds.

    python benchmarks/router_ablation.py --variants default --finetune-epochs 10

With --refit the frozen routes train a freshly initialised supernet for
--finetune-epochs (the router is kept), against static routes trained for
--finetune-epochs. --oracle SIMPLE COMPLEX trains a supernet with no router,
every simple user on route SIMPLE and every complex user on COMPLEX, against
the static route of its cost: what weight-shared sub-networks give when the
routes are right and stay fixed.

    python benchmarks/router_ablation.py --variants default --epochs 40 --finetune-epochs 40 --refit
    python benchmarks/router_ablation.py --oracle 0 29 --variants
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

from benchmarks.accuracy_real import (bootstrap_ratio, read_reports, routes_under,  # noqa: E402
                                      single_route)
from canet_kernels import data as D  # noqa: E402
from canet_kernels.model import CANet, CANetConfig  # noqa: E402
from canet_kernels.model.encoder import rung_groups, rung_votes  # noqa: E402
from canet_kernels.ops import shared_plans  # noqa: E402
from canet_kernels.train import (TrainConfig, evaluate, route_distribution,  # noqa: E402
                                 logit_spread, router_logits, set_seed,
                                 train)

# One change each against "default" (model = CANetConfig, train = TrainConfig).
VARIANTS = {
    "default": {},
    "holdout_guide": {"model": {"guide_signal": "holdout"}},
    "sandwich_labels": {"model": {"guide_labels": "sandwich"}},
    "switch_balance": {"model": {"balance": "switch"}},
    "mi_balance": {"model": {"balance": "mi"}},
    "tau_anneal": {"model": {"tau_end": 0.1}},
    "noise_anneal": {"model": {"noise_end": 0.0}},
    "budget_two_sided": {"model": {"budget_shape": "two_sided"}},
    "router_stats": {"model": {"router_stats": True}},
    "warmup": {"train": {"warmup_epochs": 5}},
    "value_router": {"train": {"router_mode": "value", "warmup_epochs": 5}},
    "inplace_distill": {"model": {"distill": 1.0}},
    # the setting chosen on LastFM's validation users (seed 0) for routes that
    # spread over users: Switch balancing weighted 3 instead of 0.01
    "switch_balance_3": {"model": {"balance": "switch", "uniform_weight": 3.0}},
    # the routes consolidated into 2 rungs after epoch 10 (the ladder below,
    # inside training: the supernet goes on training on the rungs)
    "rungs_2": {"model": {"rungs": 2}, "train": {"rung_epoch": 10, "rung_lift": 0.0}},
    "rungs_2_e5": {"model": {"rungs": 2}, "train": {"rung_epoch": 5, "rung_lift": 0.0}},
    # ... with a quarter of the cheap rung's rows training on the costly rung
    # (a user the router sends up by mistake is served well there)
    "rungs_2_lift": {"model": {"rungs": 2}, "train": {"rung_epoch": 10, "rung_lift": 0.25}},
    # ... with each rung's route chosen by the probe (as rungs_2_probe)
    "rungs_2_probe_lift": {"model": {"rungs": 2}, "train": {"rung_epoch": 10, "rung_lift": 0.25,
                                                            "rung_choice": "probe"}},
    # ... with the groups cut by history length instead of the router's score
    "rungs_2_length_lift": {"model": {"rungs": 2, "rung_signal": "length"},
                            "train": {"rung_epoch": 10, "rung_lift": 0.25}},
    # ... and the votes taken after calibration lifts routes up to the FLOP target
    "rungs_2_lift_spend": {"model": {"rungs": 2}, "train": {"rung_epoch": 10, "rung_lift": 0.25,
                                                            "spend_budget": True}},
    # ... with no budget penalty in training: the FLOP target is met by the price
    # alone (the calibrated cost bias, the votes under the target), which moves
    # every user's choice by the same cost and so keeps their order
    "rungs_2_lift_spend_price": {"model": {"rungs": 2, "budget_weight": 0.0},
                                 "train": {"rung_epoch": 10, "rung_lift": 0.25,
                                           "spend_budget": True}},
    # ... without spend_budget: where the router's own argmax is under the
    # target it is not lifted (a lift moves saturated simple users up too)
    "rungs_2_lift_price": {"model": {"rungs": 2, "budget_weight": 0.0},
                           "train": {"rung_epoch": 10, "rung_lift": 0.25}},
    # ... and each rung's route chosen by the probe instead of the votes
    "rungs_2_probe_lift_price": {"model": {"rungs": 2, "budget_weight": 0.0},
                                 "train": {"rung_epoch": 10, "rung_lift": 0.25,
                                           "rung_choice": "probe"}},
    # ... with the rungs after epoch 20: the probe reads a supernet whose
    # routes have trained longer
    "rungs_2_probe_lift_price_e20": {"model": {"rungs": 2, "budget_weight": 0.0},
                                     "train": {"rung_epoch": 20, "rung_lift": 0.25,
                                               "rung_choice": "probe"}},
    # ... each rung's route chosen on validation users by the supernet's
    # metric under the FLOP target instead of the router's vote
    "rungs_2_probe": {"model": {"rungs": 2}, "train": {"rung_epoch": 10, "rung_lift": 0.0,
                                                       "rung_choice": "probe"}},
}

# The `canet demo` settings (cli.py), so the data and model are the demo's.
DEMO_MODEL = dict(emb_widths=(32, 48, 64), hidden_widths=(32, 48, 64), depths=(1, 2, 3, 4),
                  dropout=0.1, guide_weight=0.1, max_len=50)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="router variants to run (none: only --dense / --oracle)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--static-candidates", type=int, default=3)
    p.add_argument("--dense", action="store_true", help="also train the max route per seed")
    p.add_argument("--probe-routes", nargs="*", type=int, default=[],
                   help="also test each CANet model with every user on each of these "
                        "routes (is the supernet's route as good as that route alone?)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune each CANet supernet this many epochs on the frozen "
                        "router's fixed per-user routes (see the module docstring)")
    p.add_argument("--oracle", nargs=2, type=int, default=None, metavar=("SIMPLE", "COMPLEX"),
                   help="also train, per seed, a fresh supernet with every simple user on "
                        "route SIMPLE and every complex user on route COMPLEX (no router), "
                        "against the static route of its cost")
    p.add_argument("--ladder", type=int, default=0, metavar="K",
                   help="with --finetune-epochs: first consolidate the router's routes "
                        "into K rungs by the FLOP ratio it expects per user (see ladder)")
    p.add_argument("--refit", action="store_true",
                   help="with --finetune-epochs: train a freshly initialised supernet on "
                        "the frozen routes (the router is kept) instead of fine-tuning; "
                        "its static comparator is trained for --finetune-epochs")
    p.add_argument("--static-total-seeds", nargs="*", type=int, default=[],
                   help="with --finetune-epochs: on these seeds also train the static "
                        "comparator for --epochs + --finetune-epochs epochs")
    p.add_argument("--flop-target", type=float, default=None,
                   help="the CANet models' FLOP target (default: the demo's, 0.45)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/accuracy/router_ablation.json "
                        "(router_ablation_finetune.json with --finetune-epochs)")
    p.add_argument("--resume", action="store_true", help="keep the finished runs in --out")
    p.add_argument("--table", action="store_true",
                   help="print the markdown table of the runs in --out and exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="write the runs of these files (e.g. one per seed, run side by "
                        "side) into --out as one report and exit")
    return p.parse_args()


def by_type(values, types):
    """Mean of per-user `values` [U] over the simple (0) and complex (1) users."""
    return {name: float(values[types == t].mean()) for t, name in ((0, "simple"), (1, "complex"))
            if bool((types == t).any())}


def by_type_and_route(routes, values, types):
    """{kind: {route: [users, mean of values]}}: which route served which
    kind of user, and how well."""
    out = {}
    for t, name in ((0, "simple"), (1, "complex")):
        m = types == t
        out[name] = {int(r): [int((m & (routes == r)).sum()),
                              float(values[m & (routes == r)].mean())]
                     for r in routes[m].unique().tolist()}
    return out


def train_row_users(ds):
    """Data-set user index of each leave_one_out training row (windows off:
    one row per user with >= 2 items, in order)."""
    return torch.tensor([u for u, s in enumerate(ds.sequences) if len(s) >= 2])


def ladder(model, split, v_routes, rungs):
    """Consolidates the router's routes into `rungs` routes: each user's
    complexity score is the FLOP ratio the router expects for it (softmax of
    its logits, no cost bias); validation users are cut into `rungs` equal
    groups by score, each group's rung is the route the router's argmax
    gives most often in it, and a test user takes the rung of its score's
    group (the validation cut points): the rule of CANetConfig.rungs, here
    applied after training. Returns (valid routes, test routes, the rung
    routes)."""
    lv, lt = router_logits(model, split.valid), router_logits(model, split.test)
    cuts, gv = rung_groups(model.expected_ratio(lv), rungs)
    rung = rung_votes(v_routes, gv, rungs)
    gt = torch.bucketize(model.expected_ratio(lt), cuts, right=True)
    return rung[gv], rung[gt], rung


def finetune(model, tcfg, split, ds, types, ref, epochs, refit=False, rungs=0):
    """Freezes the router's routes and fine-tunes the supernet on them
    (`refit`: a freshly initialised supernet is trained on them instead;
    `rungs` > 0: the routes are first consolidated by `ladder`).
    Training rows take their user's validation route (the router on the
    row's own input for a user without one); validation and test use the
    routes the router gave before fine-tuning. Selects the epoch (0 = as
    trained) on validation NDCG@10, tests once; returns a record."""
    model.eval()
    v_routes = route_distribution(model, split.valid)
    t_routes = route_distribution(model, split.test)
    rung = None
    if rungs:
        v_routes, t_routes, rung = ladder(model, split, v_routes, rungs)
    if refit:  # the routes were taken above; only the router's weights stay
        set_seed(tcfg.seed + 2000)
        model.net.load_state_dict(type(model)(model.cfg).net.state_dict())
    tr = split.train
    row_user = train_row_users(ds)
    by_user = torch.full((len(ds.sequences),), -1, dtype=torch.int64)
    by_user[split.valid.users] = v_routes
    tr_routes = by_user[row_user]
    missing = tr_routes < 0
    if bool(missing.any()):
        if rung is not None:
            raise ValueError("--ladder needs a validation route for every training user")
        with torch.no_grad():
            tr_routes[missing] = model.route(tr.items[missing], tr.lengths[missing]).routes
    rec = train_on_routes(model, tcfg, split, tr_routes, v_routes, t_routes, types, ref,
                          epochs)
    vt = {int(u): int(r) for u, r in zip(split.valid.users, v_routes)}
    same = sum(vt.get(int(u)) == int(r) for u, r in zip(split.test.users, t_routes))
    rec["test_route_equals_valid_route_share"] = same / max(len(t_routes), 1)
    rec["train_rows_routed_on_own_input"] = int(missing.sum())
    if rung is not None:
        rec["ladder"] = rung.tolist()
    return rec


def oracle(mcfg, tcfg, split, ds, types, ref, routes):
    """A fresh supernet trained with each user on the route of its kind
    (`routes` = (simple users' route, complex users' route)), no router:
    what the supernet gives when the routes are right and never change."""
    set_seed(tcfg.seed)
    model = CANet(mcfg)
    kind = torch.as_tensor(ds.user_types)
    by_user = torch.where(kind == 0, routes[0], routes[1])
    rec = train_on_routes(model, tcfg, split, by_user[train_row_users(ds)],
                          by_user[split.valid.users], by_user[split.test.users], types, ref,
                          tcfg.epochs)
    rec["routes"] = list(routes)
    return rec


def train_on_routes(model, tcfg, split, tr_routes, v_routes, t_routes, types, ref, epochs):
    """Trains the supernet with every training row, validation and test user
    on a given route (the router is not used), for `epochs` with a fresh
    Adam; selects the epoch (0 = as given) on validation NDCG@10 and tests
    once. Returns a record."""
    tr = split.train
    sel = tcfg.select_metric
    val = evaluate(model, split.valid, tcfg.ks, tcfg.mask_seen, route=v_routes,
                   flop_ref=ref)
    best = {"epoch": 0, "valid": val[sel],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}
    history = [{"epoch": 0, "valid_ndcg@10": val["ndcg@10"]}]
    set_seed(tcfg.seed + 1000)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad],
                           lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    gen = torch.Generator().manual_seed(tcfg.seed + 1000)
    secs = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        ce, nb = 0.0, 0
        for idx in D.batches(len(tr), tcfg.batch_size, gen):
            lengths = tr.lengths[idx]
            L = int(lengths.max())
            with shared_plans():
                loss, st = model.loss(tr.items[idx, :L], lengths, tr.targets[idx, :L],
                                      routes=tr_routes[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            ce += st["ce"]
            nb += 1
        secs += time.perf_counter() - t0
        val = evaluate(model, split.valid, tcfg.ks, tcfg.mask_seen, route=v_routes,
                       flop_ref=ref)
        history.append({"epoch": epoch, "train_ce": ce / max(nb, 1),
                        "valid_ndcg@10": val["ndcg@10"]})
        if val[sel] > best["valid"]:
            best = {"epoch": epoch, "valid": val[sel],
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}
        print(f"    finetune epoch {epoch}: ce {ce / max(nb, 1):.4f} valid "
              f"{val['ndcg@10']:.4f}{' *' if best['epoch'] == epoch else ''}", flush=True)
    model.load_state_dict(best["state"])
    model.eval()
    test = evaluate(model, split.test, tcfg.ks, tcfg.mask_seen, route=t_routes,
                    flop_ref=ref, per_user=True)
    ratios = torch.tensor([f / ref.route_flops()[-1] for f in model.cfg.route_flops()],
                          dtype=torch.float64)
    return {"epochs": epochs, "best_epoch": best["epoch"], "valid_ndcg@10": best["valid"],
            "valid_flop_ratio": float(ratios[v_routes].mean()),
            "test_ndcg@10": test["ndcg@10"], "test_recall@10": test["recall@10"],
            "flop_ratio": test["flop_ratio"], "routes_used": test["routes_used"],
            "route_counts": test["route_counts"],
            "flop_ratio_by_type": by_type(ratios[t_routes], types),
            "ndcg@10_by_type": by_type(torch.tensor(test["per_user"]["ndcg@10"]), types),
            "by_type_and_route": by_type_and_route(t_routes, torch.tensor(
                test["per_user"]["ndcg@10"]), types),
            "history": history, "train_seconds": secs,
            "per_user_ndcg@10": test["per_user"]["ndcg@10"]}


def run_one(mcfg, tcfg, split, types, ref, probe=(), keep_model=False):
    """Trains, then the test report with per-user values; returns a record
    (and the model with `keep_model`)."""
    t0 = time.perf_counter()
    model, res = train(mcfg, tcfg, split, None, None, log=lambda *_: None)
    wall = time.perf_counter() - t0
    route = tcfg.fixed_route
    test = evaluate(model, split.test, tcfg.ks, tcfg.mask_seen, route=route, flop_ref=ref,
                    per_user=True)
    routes = torch.tensor(test["per_user"]["routes"])
    ratios = torch.tensor([f / ref.route_flops()[-1] for f in mcfg.route_flops()],
                          dtype=torch.float64)
    rec = {"valid_ndcg@10": res["valid"]["ndcg@10"], "valid_flop_ratio": res["valid"]["flop_ratio"],
           "test_ndcg@10": test["ndcg@10"], "test_recall@10": test["recall@10"],
           "flop_ratio": test["flop_ratio"], "routes_used": test["routes_used"],
           "routes_over_5pct": test["routes_over_5pct"], "largest_share": test["largest_share"],
           "route_counts": test["route_counts"],
           "flop_ratio_by_type": by_type(ratios[routes], types),
           "ndcg@10_by_type": by_type(torch.tensor(test["per_user"]["ndcg@10"]), types),
           "by_type_and_route": by_type_and_route(routes, torch.tensor(
               test["per_user"]["ndcg@10"]), types),
           "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
           "train_seconds": res["train_seconds"], "wall_seconds": wall,
           "per_user_ndcg@10": test["per_user"]["ndcg@10"]}
    if route is None:
        rec["cost_bias"] = float(model.cost_bias)
        rec["logit_spread"] = logit_spread(router_logits(model, split.test))
        rec["fixed_route_ndcg@10_by_type"] = {
            r: by_type(torch.tensor(evaluate(model, split.test, tcfg.ks, tcfg.mask_seen,
                                             route=r, per_user=True)["per_user"]["ndcg@10"]),
                       types) for r in probe}
    return (rec, model) if keep_model else rec


GROUPS = ("runs", "static_runs", "dense", "oracle")


def merge(reports):
    """One report of several (the same data and model, e.g. one per seed):
    the union of their runs, the first one's settings with every seed. A run
    key in two files must hold the same run."""
    out = json.loads(json.dumps(reports[0]))
    for rep in reports[1:]:
        for k in ("data", "model"):
            if rep.get(k) != out.get(k):
                raise SystemExit(f"--merge: the files differ in {k!r}")
        for g in GROUPS:
            for key, rec in rep.get(g, {}).items():
                have = out.setdefault(g, {}).get(key)
                if have is not None and have != rec:
                    raise SystemExit(f"--merge: {g} {key!r} differs between the files")
                out[g][key] = rec
    out["settings"]["seeds"] = sorted({s for r in reports for s in r["settings"]["seeds"]})
    summary(out)
    return out


def main():
    a = parse()
    if a.merge:
        if a.out is None:
            raise SystemExit("--merge needs --out")
        merged = merge(read_reports(a.merge, "--merge"))
        with open(a.out, "w") as f:
            json.dump(merged, f, indent=2)
        print(f"wrote {a.out}")
        return
    if a.table and a.out is None:
        a.out = os.path.join(ROOT, "benchmarks", "results", "accuracy", "router_ablation.json")
    if a.table:
        with open(a.out) as f:
            print(markdown(json.load(f)))
        return
    if a.out is None:
        a.out = os.path.join(ROOT, "benchmarks", "results", "accuracy",
                             "router_ablation_finetune.json" if a.finetune_epochs
                             else "router_ablation.json")
    torch.set_num_threads(a.threads)
    ds = D.synthetic(a.users, a.items, a.data_seed)
    split = D.leave_one_out(ds, DEMO_MODEL["max_len"])
    types = torch.as_tensor(ds.user_types)[split.test.users]
    mcfg0 = CANetConfig(n_items=ds.n_items, **DEMO_MODEL)
    target = {} if a.flop_target is None else {"flop_target": a.flop_target}
    report = {"settings": vars(a), "data": ds.source, "model": mcfg0.to_dict(),
              "runs": {}, "static_runs": {}, "dense": {}, "oracle": {}}
    if a.resume and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        for k in GROUPS:
            report[k] = old.get(k, {})

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        slim = json.loads(json.dumps(report))       # per-user lists stay out of the file
        for group in GROUPS:
            for rec in slim[group].values():
                rec.pop("per_user_ndcg@10", None)
                for sub in ("static", "finetuned", "static_finetuned",
                            "static_same_total_epochs"):
                    rec.get(sub, {}).pop("per_user_ndcg@10", None)
        summary(slim)
        with open(a.out, "w") as f:
            json.dump(slim, f, indent=2)

    def base_train(seed, **kw):
        return TrainConfig(epochs=a.epochs, patience=a.patience, batch_size=a.batch_size,
                           seed=seed, progress=False, **kw)

    def static(seed, cap, epochs=None):
        """Best of the largest routes under `cap`, each trained alone."""
        tried = {}
        for r in routes_under(mcfg0, cap, a.static_candidates):
            key = f"{seed}/{r}" if epochs is None else f"{seed}/{r}/ep{epochs}"
            # the file keeps no per-user values, which the bootstrap needs:
            # a static run read back from it is trained again (same result)
            if key not in report["static_runs"] or \
                    "per_user_ndcg@10" not in report["static_runs"][key]:
                tc = base_train(seed, fixed_route=0)
                if epochs is not None:
                    tc.epochs = epochs
                rec = run_one(single_route(mcfg0, r), tc, split, types, mcfg0)
                report["static_runs"][key] = dict(rec, route=r)
                print(f"  static route {r} {mcfg0.routes()[r]}: valid "
                      f"{rec['valid_ndcg@10']:.4f} test {rec['test_ndcg@10']:.4f} "
                      f"ratio {rec['flop_ratio']:.3f} ({rec['train_seconds']:.0f}s)",
                      flush=True)
            tried[r] = report["static_runs"][key]
        best = max(tried, key=lambda r: tried[r]["valid_ndcg@10"])
        return tried[best], sorted(tried)

    for seed in a.seeds:
        if a.dense and str(seed) not in report["dense"]:
            report["dense"][str(seed)] = run_one(
                mcfg0, base_train(seed, fixed_route=mcfg0.max_route), split, types, mcfg0)
            print(f"seed {seed} dense: test {report['dense'][str(seed)]['test_ndcg@10']:.4f}")
            save()
        if a.oracle and f"{a.oracle[0]}-{a.oracle[1]}/{seed}" not in report["oracle"]:
            rec = oracle(mcfg0, base_train(seed), split, ds, types, mcfg0, a.oracle)
            srec, cands = static(seed, rec["valid_flop_ratio"])
            ratio = rec["test_ndcg@10"] / max(srec["test_ndcg@10"], 1e-12)
            rec["static"] = {k: srec[k] for k in ("route", "valid_ndcg@10", "test_ndcg@10",
                                                  "flop_ratio", "ndcg@10_by_type")}
            rec["static"]["candidates"] = cands
            rec["ndcg10_vs_static"] = {"ratio": ratio, "ci95": bootstrap_ratio(
                rec["per_user_ndcg@10"], srec["per_user_ndcg@10"])}
            report["oracle"][f"{a.oracle[0]}-{a.oracle[1]}/{seed}"] = rec
            ci = rec["ndcg10_vs_static"]["ci95"]
            print(f"seed {seed} oracle routes {a.oracle}: valid {rec['valid_ndcg@10']:.4f} test "
                  f"{rec['test_ndcg@10']:.4f} ratio {rec['flop_ratio']:.3f} by kind "
                  f"{rec['ndcg@10_by_type']} | static route {srec['route']} "
                  f"{srec['test_ndcg@10']:.4f} ({srec['flop_ratio']:.3f}) x{ratio:.3f} "
                  f"[{ci[0]:.3f}-{ci[1]:.3f}]", flush=True)
            save()
        for name in a.variants:
            key = f"{name}/{seed}"
            if key in report["runs"]:
                continue
            v = VARIANTS[name]
            mcfg = CANetConfig.from_dict(dict(mcfg0.to_dict(), **target, **v.get("model", {})))
            tcfg = base_train(seed, **v.get("train", {}))
            rec, model = run_one(mcfg, tcfg, split, types, mcfg0, a.probe_routes,
                                 keep_model=True)
            rec["variant"], rec["seed"] = name, seed
            srec, cands = static(seed, rec["valid_flop_ratio"])
            rec["static"] = {k: srec[k] for k in ("route", "valid_ndcg@10", "test_ndcg@10",
                                                  "flop_ratio", "train_seconds",
                                                  "ndcg@10_by_type",
                                                  "per_user_ndcg@10")}
            rec["static"]["candidates"] = cands
            ratio = rec["test_ndcg@10"] / max(srec["test_ndcg@10"], 1e-12)
            rec["ndcg10_vs_static"] = {"ratio": ratio, "ci95": bootstrap_ratio(
                rec["per_user_ndcg@10"], srec["per_user_ndcg@10"])}
            if a.finetune_epochs:
                ft = finetune(model, tcfg, split, ds, types, mcfg0, a.finetune_epochs,
                              a.refit, a.ladder)
                rec["finetuned"] = ft
                # a refit supernet trains for --finetune-epochs from scratch:
                # its static comparator too
                comps = {"static_finetuned": static(
                    seed, ft["valid_flop_ratio"], a.finetune_epochs if a.refit else None)[0]}
                if seed in a.static_total_seeds:
                    comps["static_same_total_epochs"] = static(
                        seed, ft["valid_flop_ratio"], a.epochs + a.finetune_epochs)[0]
                for cname, s2 in comps.items():
                    r2 = ft["test_ndcg@10"] / max(s2["test_ndcg@10"], 1e-12)
                    rec[cname] = {k: s2[k] for k in ("route", "valid_ndcg@10", "test_ndcg@10",
                                                     "flop_ratio", "train_seconds",
                                                     "best_epoch", "epochs_run",
                                                     "ndcg@10_by_type")}
                    rec[cname]["finetuned_vs_static"] = {
                        "ratio": r2, "ci95": bootstrap_ratio(ft["per_user_ndcg@10"],
                                                             s2["per_user_ndcg@10"])}
                    ci = rec[cname]["finetuned_vs_static"]["ci95"]
                    print(f"seed {seed} {name} finetuned (epoch {ft['best_epoch']}): valid "
                          f"{ft['valid_ndcg@10']:.4f} test {ft['test_ndcg@10']:.4f} ratio "
                          f"{ft['flop_ratio']:.3f} | {cname} route {s2['route']} "
                          f"{s2['test_ndcg@10']:.4f} x{r2:.3f} [{ci[0]:.3f}-{ci[1]:.3f}]",
                          flush=True)
            report["runs"][key] = rec
            t = rec["flop_ratio_by_type"]
            print(f"seed {seed} {name}: valid {rec['valid_ndcg@10']:.4f} test "
                  f"{rec['test_ndcg@10']:.4f} ratio {rec['flop_ratio']:.3f} routes "
                  f"{rec['routes_used']} largest {rec['largest_share']:.0%} simple/complex "
                  f"{t.get('simple', 0):.3f}/{t.get('complex', 0):.3f} spread "
                  f"{rec['logit_spread']['ratio']:.2f} | static route {srec['route']} "
                  f"{srec['test_ndcg@10']:.4f} ({srec['flop_ratio']:.3f}) x{ratio:.3f} "
                  f"[{rec['ndcg10_vs_static']['ci95'][0]:.3f}-"
                  f"{rec['ndcg10_vs_static']['ci95'][1]:.3f}] "
                  f"({rec['train_seconds']:.0f}s)", flush=True)
            save()
    save()
    print(f"wrote {a.out}")


def summary(report):
    """Per variant: means over the seeds run."""
    out = {}
    for rec in report["runs"].values():
        s = out.setdefault(rec["variant"], {"seeds": [], "valid": [], "test": [], "static": [],
                                            "ratio": [], "largest": [], "used": []})
        s["seeds"].append(rec["seed"])
        s["valid"].append(rec["valid_ndcg@10"])
        s["test"].append(rec["test_ndcg@10"])
        s["static"].append(rec["static"]["test_ndcg@10"])
        s["ratio"].append(rec["flop_ratio"])
        s["largest"].append(rec["largest_share"])
        s["used"].append(rec["routes_used"])
    for s in out.values():
        for k in ("valid", "test", "static", "ratio", "largest", "used"):
            s[k] = sum(s[k]) / len(s[k])
    report["summary"] = out


def markdown(report):
    """One row per variant: per-seed values and means over the seeds run."""
    rows = ["| variant | seeds | test NDCG@10 per seed (mean) | valid NDCG@10 mean | "
            "FLOP ratio mean | routes used (>= 5%) per seed | largest share mean | "
            "simple / complex FLOP ratio | logit spread users / routes | static, same "
            "cost: test NDCG@10 mean (FLOP ratio) | CANet / static per seed [95% CI] | "
            "train s |",
            "|" + "---|" * 12]
    by = {}
    for rec in report["runs"].values():
        by.setdefault(rec["variant"], []).append(rec)
    for v in [v for v in VARIANTS if v in by]:
        rs = sorted(by[v], key=lambda r: r["seed"])

        def mean(f):
            return sum(f(r) for r in rs) / len(rs)

        tests = " / ".join(f"{r['test_ndcg@10']:.4f}" for r in rs)
        used = " / ".join(f"{r['routes_used']} ({r['routes_over_5pct']})" for r in rs)
        vs = "; ".join("{:.3f} [{:.3f}-{:.3f}]".format(r["ndcg10_vs_static"]["ratio"],
                                                       *r["ndcg10_vs_static"]["ci95"])
                       for r in rs)
        rows.append(
            f"| {v} | {', '.join(str(r['seed']) for r in rs)} | {tests} "
            f"({mean(lambda r: r['test_ndcg@10']):.4f}) | "
            f"{mean(lambda r: r['valid_ndcg@10']):.4f} | {mean(lambda r: r['flop_ratio']):.3f} | "
            f"{used} | {mean(lambda r: r['largest_share']):.0%} | "
            f"{mean(lambda r: r['flop_ratio_by_type']['simple']):.3f} / "
            f"{mean(lambda r: r['flop_ratio_by_type']['complex']):.3f} | "
            f"{mean(lambda r: r['logit_spread']['across_users']):.2f} / "
            f"{mean(lambda r: r['logit_spread']['between_routes']):.2f} | "
            f"{mean(lambda r: r['static']['test_ndcg@10']):.4f} "
            f"({mean(lambda r: r['static']['flop_ratio']):.3f}) | {vs} | "
            f"{mean(lambda r: r['train_seconds']):.0f} |")
    dense = sorted(report.get("dense", {}).items())
    if dense:
        n = len(dense)
        tests = " / ".join(f"{d['test_ndcg@10']:.4f}" for _, d in dense)
        rows.append(
            f"| dense (max route, reference) | {', '.join(k for k, _ in dense)} | {tests} "
            f"({sum(d['test_ndcg@10'] for _, d in dense) / n:.4f}) | "
            f"{sum(d['valid_ndcg@10'] for _, d in dense) / n:.4f} | 1.000 | 1 | 100% | "
            f"1.000 / 1.000 | - | - | - | {sum(d['train_seconds'] for _, d in dense) / n:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
