"""Command-line options made from the config dataclasses, so the `canet`
command, the benchmark scripts and the integrations share one set of
defaults: the field defaults of CANetConfig and TrainConfig.

    add_options(parser, CANetConfig, MODEL_OPTIONS)      # --max-len, --depths, ...
    cfg = from_options(CANetConfig, args, MODEL_OPTIONS, n_items=n)

A caller that deliberately runs other settings (an experiment protocol)
passes them as `overrides`, visible in its --help.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

MODEL_OPTIONS = ("max_len", "emb_widths", "hidden_widths", "depths", "num_heads",
                 "dropout", "flop_target", "budget_weight", "guide_weight",
                 "uniform_weight", "residual_scale_init", "tie_embeddings",
                 "guide_signal", "guide_labels", "balance", "tau_end", "noise_end",
                 "budget_shape", "router_stats", "distill", "rungs", "rung_signal")
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "seed", "path",
                 "eval_every", "patience", "mask_seen", "calibrate_flops",
                 "spend_budget", "warmup_epochs", "router_mode", "router_candidates",
                 "rung_epoch", "rung_choice", "rung_probe_split", "rung_cut",
                 "rung_order", "rung_lift",
                 "max_train_seconds", "progress", "device")

HELP = {
    "emb_widths": "embedding widths of the routing space (comma-separated)",
    "hidden_widths": "hidden widths of the routing space (comma-separated)",
    "depths": "depths of the routing space (comma-separated)",
    "flop_target": "target mean FLOP ratio (routed / max route); <= 0 disables",
    "residual_scale_init": "learnable scale on each sublayer output, initialised to "
                           "this (lets deep routes train); <= 0: plain post-LN",
    "tie_embeddings": "score items against the input item table",
    "guide_signal": "train: the guide reads the last training target; holdout: that "
                    "target is left out of the CE and the guide reads it",
    "guide_labels": "small: a smallest-route miss labels the user large; sandwich: "
                    "a user the max route also misses is labelled small",
    "balance": "kl: KL(batch-mean router distribution || uniform); switch: Switch "
               "Transformer load balancing on the hard routes; mi: kl + mean "
               "per-user entropy (spread routes, confident per user)",
    "tau_end": "Gumbel temperature annealed from tau to this over the epochs",
    "noise_end": "Gumbel noise scale annealed from 1 to this over the epochs",
    "budget_shape": "relu: only a batch above --flop-target pays; two_sided: "
                    "|E[ratio] - target|",
    "router_stats": "the router also reads log history length and the share of "
                    "distinct items",
    "distill": "weight of in-place distillation from the max route (0 = off)",
    "rungs": "0: the router picks any route per user; K: at --rung-epoch its routes are "
             "consolidated into K fixed rungs (users cut into K groups by the FLOP ratio "
             "the router expects; each group's most common route within --flop-target), "
             "the router freezes "
             "and the supernet trains on them",
    "rung_signal": "with --rungs K: what cuts the users into the K groups: router = the "
                   "FLOP ratio the router expects; length = the history length",
    "rung_epoch": "with --rungs K: the epoch after which the routes become rungs",
    "rung_choice": "with --rungs K: vote = each group's most common route (if these "
                   "overshoot --flop-target: the routes within it that hold the most "
                   "users' routes); probe = the routes with the best validation metric "
                   "per group under --flop-target",
    "rung_probe_split": "with --rung-choice probe: the probe measures the routes on one "
                        "half of the validation users and the epochs on the rungs are "
                        "selected (and validation reported) on the other half",
    "rung_cut": "with --rung-signal length: valid = cut at the quantiles of the "
                "validation users' lengths; served = on the lengths they are served at "
                "(one item longer), as equal as ties allow",
    "rung_order": "with --rung-choice probe: free = any route per group; rising = "
                  "routes of strictly rising FLOP ratio from the lowest group (shortest "
                  "histories with --rung-signal length) to the highest",
    "rung_lift": "with --rungs K: the share of users below the top rung that train on a "
                 "costlier rung instead of their own (so a user sent up by mistake is "
                 "served well there)",
    "path": "routed: canet ops on a route-sorted packed batch; masked: full width "
            "with masks (the paper's formulation)",
    "patience": "evaluations without improvement before stopping (default: none)",
    "mask_seen": "mask each user's seen items when ranking",
    "calibrate_flops": "before each evaluation, set the inference cost bias on "
                       "validation users so the routes meet --flop-target",
    "spend_budget": "calibration also lifts routes below --flop-target up to it",
    "warmup_epochs": "epochs of sandwich supernet training before the router trains "
                     "(with --rung-signal length --rung-choice probe the router is not "
                     "used and not trained: the warm-up lasts to --rung-epoch)",
    "router_mode": "canet: the paper's Gumbel router with guide/uniform/budget losses; "
                   "value: the router regresses measured per-route losses, the FLOP "
                   "price is set at inference",
    "router_candidates": "value mode: random routes measured per batch (plus min, max)",
    "max_train_seconds": "stop after the epoch that brings training time past this",
    "progress": "progress bars",
    "device": "cpu, or cuda to train on the GPU (under torchrun: each process's "
              "LOCAL_RANK GPU)",
}
ALIASES = {"num_heads": ("--heads",)}
CHOICES = {"path": ("routed", "masked"), "router_mode": ("canet", "value"),
           "rung_choice": ("vote", "probe"), "rung_signal": ("router", "length"),
           "rung_cut": ("valid", "served"), "rung_order": ("free", "rising"),
           "guide_signal": ("train", "holdout"), "guide_labels": ("small", "sandwich"),
           "balance": ("kl", "switch", "mi"), "budget_shape": ("relu", "two_sided")}


def _ints(s):
    return tuple(int(v) for v in s.replace(" ", "").split(",") if v)


def _optional(kind):
    def parse(s):
        return None if s.lower() == "none" else kind(s)
    parse.__name__ = kind.__name__
    return parse


def _kind(f):
    """Python type of a dataclass field from its (string) annotation."""
    t = str(f.type).replace(" ", "")
    base = t.replace("|None", "").replace("None|", "")
    kind = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}[base]
    return kind, "None" in t


def add_options(parser, cls, names, overrides=None, title=None):
    """One `--field-name` option per field in `names`, default = the field's
    default (or `overrides[name]`)."""
    overrides = overrides or {}
    g = parser.add_argument_group(title) if title else parser
    by_name = {f.name: f for f in fields(cls)}
    for name in names:
        f = by_name[name]
        default = overrides.get(name, f.default)
        if default is MISSING:
            raise ValueError(f"{cls.__name__}.{name} has no default")
        kind, optional = _kind(f)
        flags = ("--" + name.replace("_", "-"),) + ALIASES.get(name, ())
        kw = dict(dest=name, default=default, help=HELP.get(name))
        if kind is bool:
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind is tuple:
            kw.update(type=_ints, metavar="A,B,...")
        else:
            kw.update(type=_optional(kind) if optional else kind)
        if name in CHOICES:
            kw["choices"] = CHOICES[name]
        if kw["help"] is not None:
            kw["help"] += " (default: %(default)s)"
        else:
            kw["help"] = "default: %(default)s"
        g.add_argument(*flags, **kw)
    return g


def from_options(cls, args, names, **extra):
    """cls(**{name: args.name for name in names}, **extra)."""
    return cls(**{n: getattr(args, n) for n in names}, **extra)
