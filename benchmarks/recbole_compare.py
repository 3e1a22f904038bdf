"""RecBole's own SASRec against canet's dense model and CANet, all three
trained and evaluated by RecBole 1.2.1 on one config.

One RecBole config dict (SASRec's size keys: hidden_size, n_layers, n_heads,
inner_size, hidden_dropout_prob) drives all three; the adapter turns it into
CANet's routing space with the max route at that size (hidden and embedding
widths {H/2, 3H/4, H}, depths 1..n_layers; tied item table as SASRec).
Models:
  sasrec   recbole.model.sequential_recommender.SASRec, loss_type CE
  dense    CANetDenseRec: the supernet with every user on the max route
  canet    CANetRec: router + supernet, inference cost bias calibrated on
           the validation users before each validation (CANetTrainer)
Same data split (leave-one-out by time: LS valid_and_test, TO), full-sort
evaluation over all items, epochs, early stopping (RecBole's stopping_step
on valid NDCG@10), learning rate and seed; the test set is evaluated once
with the best validation checkpoint. Reported: test NDCG@10 and Recall@10,
FLOP ratio (canet's analytic count against the max route; for SASRec its own
layers counted the same way), training seconds per epoch, parameters.

    python benchmarks/recbole_compare.py                       # full ml-100k, length 50, 50 epochs
    python benchmarks/recbole_compare.py --epochs 1 --min-rating 5 --max-len 10   # smoke

Needs the `recbole` extra. Writes benchmarks/results/recbole/<name>.json and
prints a markdown table. Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from canet_kernels.integrations.recbole import (CANetDenseRec, CANetRec,  # noqa: E402
                                                CANetTrainer)
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

MODELS = {"sasrec": SASRec, "dense": CANetDenseRec, "canet": CANetRec}
LABELS = {"sasrec": "RecBole SASRec", "dense": "canet dense (max route)",
          "canet": "CANet (routed)"}


class TimedTrainer(Trainer):
    """RecBole's Trainer, recording each training epoch's wall time."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.epoch_seconds = []

    def _train_epoch(self, *args, **kwargs):
        t = time.perf_counter()
        out = super()._train_epoch(*args, **kwargs)
        self.epoch_seconds.append(time.perf_counter() - t)
        return out


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[2020])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--stopping-step", type=int, default=10,
                   help="RecBole's early stopping: validations without improvement")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--inner-size", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.5,
                   help="hidden_dropout_prob (and SASRec's attn_dropout_prob)")
    p.add_argument("--min-rating", type=int, default=None,
                   help="keep only ratings >= this (a smaller ml-100k for slow machines)")
    p.add_argument("--flop-target", type=float, default=None,
                   help="canet_flop_target (default: CANetConfig's)")
    p.add_argument("--spend-budget", action="store_true",
                   help="canet_spend_budget: calibration also lifts routes below the "
                        "FLOP target up to it")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="canet_warmup_epochs: sandwich supernet epochs before the "
                        "router trains (default: TrainConfig's)")
    p.add_argument("--untied", action="store_true",
                   help="canet: separate output layer (SASRec ties its item table)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None, help="JSON file name (default from the settings)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "recbole"))
    p.add_argument("--work-dir", default="/tmp/recbole_compare",
                   help="RecBole's checkpoints and tensorboard logs go here")
    return p.parse_args()


def recbole_config(args, seed) -> dict:
    cfg = {
        "seed": seed, "reproducibility": True, "use_gpu": torch.cuda.is_available(),
        "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        "metrics": ["NDCG", "Recall"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": args.stopping_step,
        "learning_rate": args.lr, "train_batch_size": args.batch_size,
        "eval_batch_size": 4096, "MAX_ITEM_LIST_LENGTH": args.max_len,
        "hidden_size": args.hidden_size, "n_layers": args.n_layers,
        "n_heads": args.n_heads, "inner_size": args.inner_size,
        "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout,
        "show_progress": False,
        "checkpoint_dir": os.path.join(args.work_dir, "saved"),
        "canet_tie_embeddings": not args.untied,
    }
    if args.min_rating is not None:
        cfg["val_interval"] = {"rating": f"[{args.min_rating},inf)"}
        cfg["normalize_all"] = False   # ratings are unused (and may all be equal)
    if args.flop_target is not None:
        cfg["canet_flop_target"] = args.flop_target
    if args.spend_budget:
        cfg["canet_spend_budget"] = True
    if args.warmup_epochs is not None:
        cfg["canet_warmup_epochs"] = args.warmup_epochs
    return cfg


def sasrec_flop_ratio(cfg) -> float:
    """SASRec's analytic FLOPs against canet's max route, counted as
    CANetConfig.route_flops counts (SASRec has no input projection)."""
    full = cfg.route_flops()[-1]
    return (full - cfg.max_len * 2 * cfg.E * cfg.D) / full


def run(kind, args, seed, log):
    cls = MODELS[kind]
    sys.argv = sys.argv[:1]   # RecBole's Config reads --key=value from the command line
    config = Config(model=cls, dataset="ml-100k", config_dict=recbole_config(args, seed))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = cls(config, train_data.dataset).to(config["device"])
    trainer = (TimedTrainer if kind == "sasrec" else CANetTrainer)(config, model)
    t0 = time.perf_counter()
    best_valid, valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = trainer.evaluate(test_data, load_best_model=True)
    test_s = time.perf_counter() - t0
    epochs = trainer.epoch_seconds
    rec = {
        "model": kind, "seed": seed,
        "test": {k: float(v) for k, v in test.items()},
        "valid": {k: float(v) for k, v in (valid or {}).items()},
        "epochs_run": len(epochs),
        "best_epoch": len(epochs) - trainer.cur_step * config["eval_step"],  # 1-based
        "seconds_per_epoch": statistics.mean(epochs) if epochs else None,
        "epoch_seconds": epochs, "fit_seconds": fit_s, "test_eval_seconds": test_s,
        # trainable parameters the model uses (the dense model's router is not)
        "params": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                      and not (kind == "dense" and n.startswith("canet.router."))),
        "n_items": dataset.item_num - 1, "n_users": dataset.user_num - 1,
        "train_sequences": len(train_data.dataset),
    }
    if kind == "sasrec":
        # the same routing space as the canet models get from this config
        from canet_kernels.integrations.recbole import canet_config
        ccfg = canet_config(config, n_items=dataset.item_num - 1, max_len=args.max_len)
        rec["flop_ratio"] = sasrec_flop_ratio(ccfg)
    else:
        rec["flop_ratio"] = trainer.last_eval["flop_ratio"]
        rec["route_counts"] = trainer.last_eval["route_counts"]
        rec["cost_bias"] = trainer.last_eval["cost_bias"]
        rec["routes"] = [list(r) for r in model.canet_cfg.routes()]
        rec["canet_config"] = model.canet_cfg.to_dict()
    log(f"{kind} seed {seed}: test NDCG@10 {rec['test'].get('ndcg@10', float('nan')):.4f} "
        f"Recall@10 {rec['test'].get('recall@10', float('nan')):.4f} FLOP ratio "
        f"{rec['flop_ratio']:.3f}, {rec['seconds_per_epoch']:.1f} s/epoch, "
        f"{rec['epochs_run']} epochs (best {rec['best_epoch']})")
    return rec


def table(records) -> str:
    lines = ["| model | seed | test NDCG@10 | test Recall@10 | FLOP ratio | s / epoch | "
             "epochs (best) | params | routes used (largest share) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        counts = r.get("route_counts")
        if counts:
            used = sum(1 for c in counts if c)
            routes = f"{used} ({100 * max(counts) / max(sum(counts), 1):.1f}%)"
        else:
            routes = "-"
        lines.append(
            f"| {LABELS[r['model']]} | {r['seed']} | {r['test']['ndcg@10']:.4f} | "
            f"{r['test']['recall@10']:.4f} | {r['flop_ratio']:.3f} | "
            f"{r['seconds_per_epoch']:.1f} | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['params']:,} | {routes} |")
    return "\n".join(lines)


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(args.work_dir)   # RecBole writes log_tensorboard/ into the working directory
    logging.getLogger().setLevel(logging.WARNING)
    name = args.name or (f"ml-100k_len{args.max_len}_ep{args.epochs}"
                         + (f"_rating{args.min_rating}" if args.min_rating else ""))
    out = os.path.join(args.out_dir, name + ".json")
    records = []
    t0 = time.perf_counter()
    try:
        for seed in args.seeds:
            for kind in args.models:
                records.append(run(kind, args, seed, lambda m: print(m, flush=True)))
                result = {"settings": vars(args), "config": recbole_config(args, seed),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "total_seconds": time.perf_counter() - t0, "runs": records}
                with open(out, "w") as f:
                    json.dump(result, f, indent=2)
    finally:
        os.chdir(cwd)
    print()
    print(table(records))
    print(f"\n{out}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
