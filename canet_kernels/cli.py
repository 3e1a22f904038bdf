"""The `canet` command: train, eval, route-stats, recommend, demo.

    python -m canet_kernels.cli demo
    python -m canet_kernels.cli train --data ../shared/data/Beauty.txt --out runs/beauty
    python -m canet_kernels.cli train --data ml-100k.inter --out runs/ml100k   # RecBole
    python -m canet_kernels.cli eval --ckpt runs/beauty
    python -m canet_kernels.cli route-stats --ckpt runs/beauty
    python -m canet_kernels.cli recommend --ckpt runs/beauty --seq "1 2 3" -k 10
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from . import data as D
from .distributed import env_main
from .metrics import format_metrics
from .model import CANetConfig
from .options import MODEL_OPTIONS, TRAIN_OPTIONS, add_options, from_options
from .train import (TrainConfig, evaluate, flop_ratio, load_model, protocol,
                    route_distribution, time_inference, train)


def _ints(s):
    return tuple(int(v) for v in s.replace(" ", "").split(",") if v)


def _add_format_args(g):
    g.add_argument("--format", choices=D.FORMATS, default=None,
                   help="users: `user item item ...` per line; pairs: `user item` per "
                        "line (file order = time order); inter: RecBole atomic .inter "
                        "file (default: inter for *.inter files, else users)")
    for what, name in (("user", "user_id"), ("item", "item_id"),
                       ("time", "timestamp")):
        g.add_argument(f"--{what}-field", default=None, metavar="NAME",
                       help=f"inter: the {what} column (default: {name})")


def _read_data(read, *args, **kwargs):
    """read(*args, **kwargs), printing its TimeOrderWarnings as CLI warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", D.TimeOrderWarning)
        ds = read(*args, **kwargs)
    for w in caught:
        if issubclass(w.category, D.TimeOrderWarning):
            print(f"canet: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   source=w.source)
    return ds


def _read_file(args):
    return _read_data(D.read_file, args.data, args.format, user_field=args.user_field,
                      item_field=args.item_field, time_field=args.time_field)


def _add_data_args(p, required=False):
    g = p.add_argument_group("data")
    g.add_argument("--data", help="data file (default: the embedded synthetic data)")
    _add_format_args(g)
    g.add_argument("--synthetic-users", type=int, default=2000)
    g.add_argument("--synthetic-items", type=int, default=400)
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--windows", action="store_true",
                   help="cut long training histories into several examples")


def _load_data(args):
    if args.data:
        return _read_file(args)
    return D.synthetic(args.synthetic_users, args.synthetic_items, args.data_seed)


def _add_model_args(p, overrides=None):
    add_options(p, CANetConfig, MODEL_OPTIONS, overrides, "model")


def _model_cfg(args, n_items):
    return from_options(CANetConfig, args, MODEL_OPTIONS, n_items=n_items)


def _add_train_args(p, overrides=None):
    g = add_options(p, TrainConfig, TRAIN_OPTIONS, overrides, "training")
    g.add_argument("--dense", action="store_true",
                   help="train the max route only (the dense baseline)")


def _train_cfg(args, model_cfg):
    return from_options(TrainConfig, args, TRAIN_OPTIONS,
                        fixed_route=model_cfg.max_route if args.dense else None)


def _print_results(res):
    print(f"protocol: {res['protocol']}")
    print(f"best epoch {res['best_epoch']} of {res['epochs_run']}, "
          f"training {res['train_seconds']:.1f}s")
    print(f"valid: {format_metrics(res['valid'])}")
    print(f"test:  {format_metrics(res['test'])}")


def route_table(cfg: CANetConfig, counts) -> str:
    counts = torch.as_tensor(counts)
    total = max(int(counts.sum()), 1)
    ratios = cfg.route_flop_ratios()
    lines = ["route  emb  hidden  depth  flop-ratio   users   share"]
    for r, (e, d, L) in enumerate(cfg.routes()):
        c = int(counts[r])
        if c:
            lines.append(f"{r:5d}  {e:3d}  {d:6d}  {L:5d}  {ratios[r]:10.3f}  "
                         f"{c:6d}  {c / total:6.1%}")
    mean = flop_ratio(cfg, counts)
    router = cfg.router_flops() / cfg.route_flops()[-1]
    lines.append(f"mean FLOP ratio {mean:.3f} ({1 - mean:.1%} fewer than the max "
                 f"route; router adds {router:.3f})")
    return "\n".join(lines)


# ------------------------------------------------------------- commands --

def cmd_train(args):
    main = env_main()        # under torchrun, rank 0 prints
    ds = _load_data(args)
    if main:
        print(ds.summary())
    split = D.leave_one_out(ds, args.max_len, windows=args.windows)
    mcfg = _model_cfg(args, ds.n_items)
    tcfg = _train_cfg(args, mcfg)
    source = dict(ds.source, max_len=args.max_len, windows=args.windows)
    model, res = train(mcfg, tcfg, split, args.out, source, resume=args.resume,
                       shard_items=args.shard_items)
    if not main:
        return 0
    _print_results(res)
    print(route_table(mcfg, res["test"]["route_counts"]))
    print(f"checkpoint: {args.out}")
    return 0


def _data_for_ckpt(args, cfg):
    src = dict(cfg["data"])
    max_len = src.pop("max_len", cfg["model"]["max_len"])
    windows = src.pop("windows", False)
    if getattr(args, "data", None):
        ds = _read_file(args)
        if ds.item_tokens is not None and ds.source["path"] != src.get("path"):
            print(f"canet: warning: {args.data}: the item tokens of an .inter file are "
                  "numbered by the file itself; they match the model's only if the "
                  "training file numbered them the same way", file=sys.stderr)
    else:
        ds = _read_data(D.load, src)
    if ds.n_items > cfg["model"]["n_items"]:
        raise SystemExit(f"data has item ids up to {ds.n_items} but the model knows "
                         f"{cfg['model']['n_items']}")
    return D.leave_one_out(ds, max_len, windows=windows)


def cmd_eval(args):
    model, cfg = load_model(args.ckpt)
    split = _data_for_ckpt(args, cfg)
    tcfg = TrainConfig.from_dict(cfg["train"])
    # default: as the model was trained and selected
    mask_seen = tcfg.mask_seen if args.mask_seen is None else args.mask_seen
    route = tcfg.fixed_route
    out = {}
    for name in ("valid", "test"):
        res = evaluate(model, getattr(split, name), tcfg.ks, mask_seen,
                       args.batch_size, route=route, path=args.path)
        out[name] = res
        print(f"{name}: {format_metrics(res)}  flop ratio {res['flop_ratio']:.3f}")
    print(f"protocol: {protocol(TrainConfig(mask_seen=mask_seen))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def cmd_route_stats(args):
    model, cfg = load_model(args.ckpt)
    split = _data_for_ckpt(args, cfg)
    es = getattr(split, args.split)
    res = evaluate(model, es, (10,), False, args.batch_size)
    print(f"{args.split} users: {len(es)}")
    print(route_table(model.cfg, res["route_counts"]))
    rungs = None
    if model.has_rungs:
        rungs = {"routes": model.rung_routes.tolist(), "cuts": model.rung_cuts.tolist()}
        by = "history length" if model.cfg.rung_signal == "length" else "expected FLOP ratio"
        print(f"consolidated into {model.cfg.rungs} rungs: routes {rungs['routes']}, by the "
              f"{by} cut at {[round(c, 4) for c in rungs['cuts']]}")
    if args.json:
        # the form benchmarks read (providers.load_route_mix)
        mc = model.cfg
        with open(args.json, "w") as f:
            json.dump({"route_counts": res["route_counts"], "flop_ratio": res["flop_ratio"],
                       "config": {"emb_widths": list(mc.emb_widths),
                                  "hidden_widths": list(mc.hidden_widths),
                                  "depths": list(mc.depths)},
                       "rungs": rungs}, f, indent=2)
    return 0


def _read_sequences(args):
    seqs = [[int(v) for v in s.replace(",", " ").split()] for s in args.seq or []]
    if args.input:
        with open(args.input) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        seqs.append([int(v) for v in line.split()])
                    except ValueError:
                        raise SystemExit(f"{args.input}:{lineno}: expected item ids") \
                            from None
    if not seqs:
        raise SystemExit("give sequences with --seq \"1 2 3\" or --input FILE")
    return seqs


def cmd_recommend(args):
    from .serving import Recommender
    rec = Recommender.load(args.ckpt)
    seqs = _read_sequences(args)
    try:
        recs = rec.recommend(seqs, args.k, exclude_seen=args.mask_seen)
    except ValueError as exc:
        raise SystemExit(f"canet recommend: {exc}") from None
    out = [{"sequence": s, "top": r.items, "scores": r.scores, "route": r.route,
            "emb": r.emb, "hidden": r.hidden, "depth": r.depth,
            "flop_ratio": r.flop_ratio} for s, r in zip(seqs, recs)]
    if args.json:
        print(json.dumps(out))
    else:
        for o in out:
            print(f"{' '.join(map(str, o['sequence'][-10:]))} -> "
                  f"{' '.join(map(str, o['top']))}   [route {o['route']}: "
                  f"emb {o['emb']} hidden {o['hidden']} depth {o['depth']}]")
    return 0


def cmd_demo(args):
    """CANet on the synthetic data in a few minutes on a CPU."""
    ds = D.synthetic(args.users, args.items, args.data_seed)
    print(ds.summary())
    split = D.leave_one_out(ds, args.max_len)
    mcfg = _model_cfg(args, ds.n_items)
    tcfg = _train_cfg(args, mcfg)
    source = dict(ds.source, max_len=args.max_len, windows=False)
    print(f"routes: emb {mcfg.emb_widths} x hidden {mcfg.hidden_widths} x depth "
          f"{mcfg.depths} = {mcfg.num_routes}; FLOP target {mcfg.flop_target}; loss "
          f"weights guide {mcfg.guide_weight}, uniform {mcfg.uniform_weight}, "
          f"budget {mcfg.budget_weight}")
    model, res = train(mcfg, tcfg, split, args.out, source)
    print()
    _print_results(res)
    print()
    print("test route distribution:")
    print(route_table(mcfg, res["test"]["route_counts"]))
    types = torch.as_tensor(ds.user_types)[split.test.users]
    r = route_distribution(model, split.test)
    ratios = torch.tensor(mcfg.route_flop_ratios(), dtype=torch.float64)[r]
    depth = model.route_depth[r].double()
    hidden = model.route_hid[r].double()
    for t, name in ((0, "simple"), (1, "complex")):
        sel = types == t
        if sel.any():
            print(f"  {name:7s} users ({int(sel.sum())}): mean FLOP ratio "
                  f"{ratios[sel].mean():.3f}, mean depth {depth[sel].mean():.2f}, "
                  f"mean hidden width {hidden[sel].mean():.1f}")
    if args.compare_dense:
        print("\ndense baseline (every user on the max route, same code):")
        dense_cfg = TrainConfig.from_dict(dict(tcfg.to_dict(), fixed_route=mcfg.max_route))
        _, dres = train(mcfg, dense_cfg, split, None, source)
        print(f"dense test: {format_metrics(dres['test'])}  (best epoch "
              f"{dres['best_epoch']}, training {dres['train_seconds']:.1f}s)")
        ratio = res["test"]["ndcg@10"] / max(dres["test"]["ndcg@10"], 1e-12)
        print(f"CANet / dense NDCG@10 = {ratio:.3f} at FLOP ratio "
              f"{res['test']['flop_ratio']:.3f}")
    print()
    es = split.test
    nthreads = torch.get_num_threads()
    t_routed = time_inference(model, es, None, "routed", args.eval_batch_size)
    t_dense = time_inference(model, es, "max", "routed", args.eval_batch_size)
    t_masked = time_inference(model, es, None, "masked", args.eval_batch_size)
    n = len(es)
    print(f"inference over {n} test users (batch {args.eval_batch_size}, "
          f"{nthreads} threads, best of 3):")
    print(f"  routed (router + canet ops)       {t_routed * 1e3:8.1f} ms")
    print(f"  dense  (max route, same code)     {t_dense * 1e3:8.1f} ms   "
          f"routed speed-up x{t_dense / t_routed:.2f}")
    print(f"  masked (paper's full-width masks) {t_masked * 1e3:8.1f} ms")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="canet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train CANet (or the dense baseline)")
    _add_data_args(t)
    _add_model_args(t)
    _add_train_args(t)
    t.add_argument("--out", required=True, help="run directory (checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--shard-items", action="store_true",
                   help="under torchrun: split the output layer's item rows over the "
                        "processes (scoring per shard, combined across them)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation and test metrics of a checkpoint")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", help="evaluate on another file (default: the training data)")
    _add_format_args(e)
    e.add_argument("--path", choices=("routed", "masked"), default="routed")
    e.add_argument("--mask-seen", action=argparse.BooleanOptionalAction, default=None,
                   help="mask (or, with --no-mask-seen, rank) each user's seen items "
                        "(default: as in training)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", help="also write the metrics to this file")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("route-stats", help="route distribution and mean FLOP ratio")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--data")
    _add_format_args(r)
    r.add_argument("--split", choices=("valid", "test"), default="test")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--json", help="also write the route counts to this file")
    r.set_defaults(func=cmd_route_stats)

    c = sub.add_parser("recommend", help="top-k items for given sequences")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--seq", action="append", help='item ids, e.g. "1 2 3" (repeatable)')
    c.add_argument("--input", help="file with one sequence of item ids per line")
    c.add_argument("-k", type=int, default=10)
    c.add_argument("--mask-seen", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_recommend)

    d = sub.add_parser("demo", help="train CANet on synthetic data (a few CPU minutes)")
    d.add_argument("--users", type=int, default=1500)
    d.add_argument("--items", type=int, default=400)
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--out", default=None, help="also keep the run's checkpoints here")
    d.add_argument("--eval-batch-size", type=int, default=256)
    _add_model_args(d, {"emb_widths": (32, 48, 64), "hidden_widths": (32, 48, 64),
                        "depths": (1, 2, 3, 4), "dropout": 0.1, "guide_weight": 0.1,
                        "rungs": 2})
    d.add_argument("--compare-dense", action="store_true",
                   help="also train the dense max-route model and print its accuracy")
    # spend_budget: the rungs are voted after the routes are lifted to the
    # FLOP target (chosen on the validation users of 3 seeds)
    _add_train_args(d, {"batch_size": 64, "spend_budget": True})
    d.set_defaults(func=cmd_demo)
    for sp in (t, e, r, c, d):
        sp.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for this command (default: torch's)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (D.DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"canet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
