"""Training, evaluation and checkpoints.

A run directory holds
  config.json          model, training and data configuration
  best.safetensors     weights of the best validation epoch
  last.safetensors     weights, optimizer state and RNG states of the last
                       finished epoch (for --resume)
  state.json           epoch, best validation result, history
  results.json         validation-selected result: best validation metrics
                       and the test metrics, computed once at the end
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import distributed
from .data import EvalSet, Split, batches
from .metrics import MetricAccumulator, full_ranking
from .model import CANet, CANetConfig
from .model.encoder import choose_under_target, length_cuts, rung_groups
from .ops import shared_plans

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    seed: int = 0
    path: str = "routed"             # "routed" (canet ops) or "masked" (paper)
    fixed_route: int | None = None   # train one route only (max route = dense)
    # evaluate (select epochs, test) on this route instead of the router's;
    # e.g. the max route of a supernet trained by sandwich warm-up alone
    eval_route: int | None = None
    eval_every: int = 1
    patience: int | None = None      # evaluations without improvement to stop
    select_metric: str = "ndcg@10"
    ks: tuple = (10, 20)
    mask_seen: bool = False
    eval_batch_size: int = 256
    progress: bool = True
    # Before each evaluation, set the model's inference cost bias on the
    # validation users so its argmax routes meet model.flop_target (see
    # CANet.calibrate_cost_bias); off = plain argmax.
    calibrate_flops: bool = True
    # ... and when the router's own argmax is already below the target, move
    # its routes up to the target (a negative bias) instead of leaving them.
    spend_budget: bool = False
    # Epochs of supernet warm-up before the router trains: routes sampled per
    # sample (a quarter max, a quarter min, the rest uniform: "sandwich"), CE only.
    # Rungs that do not use the router (router_idle) warm up to the rung epoch.
    warmup_epochs: int = 0
    # How the router learns after the warm-up: "canet" = the paper's
    # straight-through Gumbel routes with the guide, uniform and budget
    # losses; "value" = the supernet keeps training on sandwich routes while
    # the router regresses each sample's measured loss on `router_candidates`
    # random routes (plus the min and max) and the FLOP price is set at
    # inference by the calibrated cost bias (CANet.route_value_loss).
    router_mode: str = "canet"
    router_candidates: int = 4
    # with CANetConfig.rungs > 0: the epoch after whose training the routes
    # are consolidated into rungs on the validation users; the epoch is then
    # selected among this one and the later ones (all on the rungs)
    rung_epoch: int = 10
    # how each rung's route is chosen: "vote" = the route most of its users
    # get from the router (over the FLOP target: the routes that hold the
    # routes of most of them, rung_votes); "probe" = the current supernet is
    # evaluated on every route for each group's validation users, and the
    # routes with the best total metric under the model's FLOP target are
    # taken (probe_rungs)
    rung_choice: str = "vote"
    # with rung_choice "probe": the probe measures the routes on one half of
    # the validation users (a fixed half drawn by the seed, probe_halves) and
    # the epochs on the rungs are selected, and validation reported, on the
    # other half. Off: both use all of them, and the validation metric
    # reported is the one the routes were chosen on (optimistic).
    rung_probe_split: bool = False
    # where the groups are cut with rung_signal "length": "valid" = at the
    # quantiles of the validation users' lengths (rung_groups); "served" =
    # on the lengths the same users are served at, one item longer (capped
    # at max_len), as equal as ties allow (length_cuts). Validation lengths
    # are one item short of every served user's, so with many tied short
    # histories a quantile cut can leave a group with no served user.
    rung_cut: str = "valid"
    # with rung_choice "probe": "free" = each group any route; "rising" =
    # the routes' FLOP ratios rise strictly from the cheapest group (lowest
    # rung_score: the shortest histories) to the costliest, K distinct routes
    rung_order: str = "free"
    # on the rungs, the share of each batch's users below the top rung that
    # train on a costlier rung instead of their own (CANetEncoder.lifted_rungs)
    rung_lift: float = 0.25
    # stop after the first epoch that brings training time past this (a
    # wall-time budget for slow machines); None = no limit
    max_train_seconds: float | None = None
    # where the model trains: "cpu" or "cuda" (under torchrun: the process's
    # LOCAL_RANK GPU; the CUDA ops run on canet's Triton / CUDA kernels)
    device: str = "cpu"

    def to_dict(self):
        d = asdict(self)
        d["ks"] = list(d["ks"])
        return d

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "ks" in d:
            d["ks"] = tuple(d["ks"])
        return cls(**d)


# Settings that may change on --resume without changing the run.
_RESUMABLE = {"epochs", "progress", "patience", "eval_batch_size", "max_train_seconds",
              "device"}
# What a setting was before it existed, where that is not its default: a
# checkpoint written then ran with this value.
_BEFORE = {"rung_lift": 0.0}


def set_seed(seed: int):
    """Seeds Python, NumPy and torch; CPU runs with the same seed and thread
    count give the same result."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------ evaluation --

def _device(model) -> torch.device:
    """The device of the model's weights (the CPU for a model without any)."""
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def train_device(spec: str) -> torch.device:
    """torch.device of TrainConfig.device; "cuda" under torchrun is the
    process's LOCAL_RANK GPU."""
    try:
        dev = torch.device(spec)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {spec!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: no CUDA device (torch.cuda.is_available() "
                             "is False)")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _batch(es, idx, device=None):
    lengths = es.lengths[idx]
    L = max(int(lengths.max()), 1) if len(idx) else 1
    return es.items[idx, :L].to(device), lengths.to(device)


def _fixed(model, n, route):
    if route is None:
        return None
    r = model.cfg.max_route if route == "max" else int(route)
    return model.fixed_routes(n, r)


@torch.no_grad()
def evaluate(model: CANet, es: EvalSet, ks=(10, 20), mask_seen=False,
             batch_size=256, route=None, path="routed", progress=False,
             desc="eval", flop_ref: CANetConfig | None = None, per_user=False,
             dist: distributed.Context | None = None):
    """Full-ranking metrics over all items for every user of `es`, plus the
    route distribution ("route_counts", "routes_used", "largest_share") and
    the mean FLOP ratio of the routes taken, overall and per quartile of
    history length. FLOP ratios are against the max route of `flop_ref`
    (default: the model's own routing space). `route`: None = the router's
    argmax, "max" = the dense model, a route id, or a route id per user
    (int64 [U], in `es` order). `per_user`: also the
    per-user routes and metric values, in `es` order. `dist`: on several
    processes each rank scores its block of users and every rank gets the
    results of all users."""
    dist = dist or distributed.Context()
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    users: dict = {}
    taken = []
    dev = _device(model)
    for idx in tqdm(dist.user_batches(len(es), batch_size), desc=desc, leave=False,
                    disable=not progress or not dist.main):
        items, lengths = _batch(es, idx, dev)
        seen = es.seen[idx].to(dev) if mask_seen else None
        targets = es.targets[idx].to(dev)
        fixed = route[idx] if torch.is_tensor(route) else _fixed(model, len(idx), route)
        fixed = fixed.to(dev) if fixed is not None else None
        if dist.table is None:
            scores, routes = model(items, lengths, fixed, path)
            vals = full_ranking(scores, targets, ks, seen)
        else:
            vals, routes = dist.table.ranking(model, items, lengths, fixed, targets, ks,
                                              seen, path)
        acc.update(vals)
        taken.append(routes.cpu())
        if per_user:
            for k, v in vals.items():
                users.setdefault(k, []).append(v.cpu())
    model.train(was_training)
    dist.reduce_metrics(acc, ks)
    res = acc.result()
    routes = dist.gather(torch.cat(taken) if taken else torch.zeros(0, dtype=torch.int64))
    res.update(route_report(model.cfg, routes, (es.seen > 0).sum(1), flop_ref))
    if per_user:
        if dist.world > 1:  # every rank lists the same keys, even without users
            users = {k: users.get(k, [torch.zeros(0, dtype=torch.float64)]) for k in acc.sums}
        res["per_user"] = {"routes": routes.tolist(),
                           **{k: dist.gather(torch.cat(v)).tolist() for k, v in users.items()}}
    return res


def route_report(cfg: CANetConfig, routes, history_lengths, flop_ref=None) -> dict:
    """Route distribution and FLOP ratios of per-user routes [U]: overall and
    per quartile of history length (ratios against flop_ref's max route)."""
    counts = torch.bincount(routes, minlength=cfg.num_routes)
    n = max(int(counts.sum()), 1)
    ratios = torch.tensor(route_flop_ratios(cfg, flop_ref), dtype=torch.float64)
    per_user = ratios[routes]
    return {"flop_ratio": float(per_user.mean()) if len(per_user) else 0.0,
            "route_counts": counts.tolist(),
            "routes_used": int((counts > 0).sum()),
            "routes_over_5pct": int((counts >= 0.05 * n).sum()),
            "largest_share": float(counts.max()) / n if len(routes) else 0.0,
            "flop_ratio_by_length_quartile": quartile_means(per_user, history_lengths)}


def quartile_means(values, keys) -> dict:
    """Mean of per-user `values` [U] within each quarter of the users
    ranked by `keys` [U] (lowest keys first): four groups of (nearly) equal
    size, users with equal keys kept in their order, so that data sets where
    most users share a few history lengths still get four groups. Also
    each group's largest key ("upper_bounds", the first three)."""
    keys = torch.as_tensor(keys).to(torch.float64)
    values = torch.as_tensor(values).to(torch.float64)
    order = torch.sort(keys, stable=True).indices
    groups = [g for g in order.tensor_split(4)]
    return {"upper_bounds": [float(keys[g].max()) if len(g) else None for g in groups[:3]],
            "mean": [float(values[g].mean()) if len(g) else None for g in groups]}


# A router that sends more than this share of users down one route has
# collapsed: per-user routing is not happening.
COLLAPSE_SHARE = 0.9


def _top_route(cfg: CANetConfig, counts) -> tuple:
    """(route id, its share of the users, its name) of the largest route."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    top = int(counts.argmax())
    emb, hid, depth = cfg.routes()[top]
    share = float(counts[top]) / max(float(counts.sum()), 1.0)
    return top, share, f"emb {emb}, hidden {hid}, depth {depth}"


def route_summary(cfg: CANetConfig, counts) -> str:
    """One line of an epoch's log: routes used and the largest share."""
    top, share, name = _top_route(cfg, counts)
    used = sum(1 for c in counts if c > 0)
    return f"routes used {used}, largest {share:.0%} (route {top}: {name})"


def collapse_warning(cfg: CANetConfig, counts, epoch=None):
    """Warns, naming the route, when one route takes > COLLAPSE_SHARE of
    the users."""
    top, share, name = _top_route(cfg, counts)
    if len(counts) > 1 and share > COLLAPSE_SHARE:
        when = f" at epoch {epoch}" if epoch is not None else ""
        warnings.warn(f"route {top} ({name}) takes {share:.0%} of the validation users"
                      f"{when}: the router sends (nearly) everyone down one route",
                      RouteCollapseWarning, stacklevel=2)


class RouteCollapseWarning(UserWarning):
    """One route takes (nearly) all users."""


def route_flop_ratios(cfg: CANetConfig, ref: CANetConfig | None = None) -> list:
    """Each route's FLOPs over the max route of `ref` (default: cfg's)."""
    if ref is None:
        return cfg.route_flop_ratios()
    top = ref.route_flops()[-1]
    return [f / top for f in cfg.route_flops()]


def eval_batches(es: EvalSet, batch_size=256, device=None):
    """(items, lengths) batches of every user of `es`, in order."""
    return (_batch(es, idx, device) for idx in batches(len(es), batch_size))


def router_logits(model: CANet, es: EvalSet, batch_size=256):
    """Router logits [U, R] of every user of `es` (eval mode)."""
    return model.router_logits(eval_batches(es, batch_size, _device(model)))


def logit_spread(logits) -> dict:
    """How much the router is a function of the user. Logits [U, R] are
    centred per user (softmax ignores a per-user shift); `across_users` is
    the mean over routes of each route's std over users, `between_routes`
    the std over routes of their mean logit. A prior over routes has the
    first near 0."""
    z = logits.double() - logits.double().mean(1, keepdim=True)
    across = float(z.std(0).mean()) if len(z) > 1 else 0.0
    between = float(z.mean(0).std())
    return {"across_users": across, "between_routes": between,
            "ratio": across / between if between > 0 else float("inf")}


def _all_logits(model: CANet, es: EvalSet, batch_size, dist):
    """Router logits [U, R] of every user of `es`; under several processes
    each rank runs the router on its block of users and all get all."""
    if dist is None or dist.world == 1:
        return router_logits(model, es, batch_size)
    mine = [_batch(es, idx, _device(model))
            for idx in dist.user_batches(len(es), batch_size) if len(idx)]
    logits = model.router_logits(mine) if mine else \
        torch.zeros(0, model.cfg.num_routes, dtype=model.router.head.weight.dtype)
    return dist.gather(logits)


def calibrate(model: CANet, es: EvalSet, batch_size=256, spend: bool = False,
              dist: distributed.Context | None = None):
    """Sets the inference cost bias on `es` (validation users) so the mean
    FLOP ratio of the routes meets model.cfg.flop_target (with `spend`: comes
    up to it from below too). Returns the bias."""
    target = model.cfg.flop_target
    if target is None:
        return float(model.cost_bias)
    return model.calibrate_cost_bias(_all_logits(model, es, batch_size, dist), target,
                                     spend=spend)


def consolidate(model: CANet, es: EvalSet, tcfg: TrainConfig,
                dist: distributed.Context | None = None) -> list:
    """Sets the model's rungs (CANetEncoder.set_rungs) from the router's
    logits on `es` (validation users), the routes chosen as
    tcfg.rung_choice says (the probe on probe_halves' first half with
    tcfg.rung_probe_split). Returns the rung routes."""
    logits = _all_logits(model, es, tcfg.eval_batch_size, dist)
    users = probe_halves(len(es), tcfg.seed)[0] if tcfg.rung_probe_split else None
    cuts = served_cuts(model, es) if tcfg.rung_cut == "served" else None
    routes = probe_rungs(model, es, logits, tcfg, dist, users, cuts) \
        if tcfg.rung_choice == "probe" else None
    return model.set_rungs(logits, routes, lengths=_rung_lengths(model, es), cuts=cuts)


def _rung_lengths(model: CANet, es: EvalSet):
    """The users' lengths when the rungs cut on them, else None."""
    return es.lengths if model.cfg.rung_signal == "length" else None


def served_cuts(model: CANet, es: EvalSet):
    """[K - 1] length cut points set on the lengths the validation users
    are served at (one item longer, capped at max_len; length_cuts)."""
    return length_cuts((es.lengths + 1).clamp_max(model.cfg.max_len), model.cfg.rungs)


# The least a route must buy, per unit of FLOP ratio, in validation metric
# (as a share of the best route's) to be chosen over a cheaper one: the
# routes of users that every route serves equally well (saturated) are then
# not chosen by noise.
RUNG_MIN_PRICE = 0.01


def probe_halves(n: int, seed: int):
    """(probe users, selection users) of n validation users: two fixed
    random halves (indices, ascending), the same for every epoch and on
    --resume."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n // 2].sort().values, perm[n // 2:].sort().values


def probe_rungs(model: CANet, es: EvalSet, logits, tcfg: TrainConfig,
                dist: distributed.Context | None = None, users=None,
                cuts=None) -> torch.Tensor:
    """Rung routes [K] chosen on held-out users: the users of each rung's
    group (rung_groups of their rung_score, cut over all of `es`, or at the
    given `cuts`; with `users`, only these of them are measured) are
    evaluated on every
    route of the current supernet, and each group takes
    argmax_r metric_g(r) - price * ratio_r, cheaper routes first on ties, at
    the lowest price >= RUNG_MIN_PRICE * (the best route's metric) whose mean
    FLOP ratio meets cfg.flop_target, the budget left then filled greedily
    (choose_under_target: the best total metric under the target; with
    tcfg.rung_order "rising", routes of rising FLOP ratio by group)."""
    cfg = model.cfg
    K = cfg.rungs
    group = probe_groups(model, es, logits, cuts)
    if users is not None:
        es, group = es.subset(users), group[users]
    n, metric = group_means(route_values(model, es, tcfg, dist), group, K)
    ratio = model.route_ratio.cpu()
    routes = choose_rungs(metric, n, ratio, cfg.flop_target, tcfg.rung_order == "rising")
    cost = float((n * ratio[routes]).sum() / n.sum().clamp_min(1))
    if cfg.flop_target is not None and cost > cfg.flop_target + 1e-9:
        # only rising routes can: K distinct routes may cost more than the target
        warnings.warn(f"rung_order 'rising': the cheapest rising routes cost FLOP ratio "
                      f"{cost:.3f}, above flop_target {cfg.flop_target}")
    return routes


def group_means(values, group, k: int):
    """([K] users, [K, R] mean of `values` [U, R]) of the users in each of
    the k groups (`group` [U])."""
    n = torch.bincount(group, minlength=k).double()
    total = torch.zeros(k, values.shape[1], dtype=torch.float64).index_add_(0, group, values)
    return n, total / n.clamp_min(1)[:, None]


def choose_rungs(metric, n, ratio, target, rising: bool):
    """The probe's rule: choose_under_target of the groups' mean `metric`
    [K, R] (n [K] users), each route having to buy RUNG_MIN_PRICE x the
    best single route's metric per unit of FLOP ratio."""
    best = float((n @ metric).max() / n.sum())     # the best single route's metric
    return choose_under_target(metric, n, ratio, target, floor=RUNG_MIN_PRICE * best,
                               rising=rising)


def probe_groups(model: CANet, es: EvalSet, logits, cuts=None) -> torch.Tensor:
    """[U] each user's rung group: rung_groups of their rung_score (router
    `logits` or history length), cut at `cuts` or at the score's quantiles."""
    score = model.rung_score(logits, _rung_lengths(model, es)).cpu()
    return rung_groups(score, model.cfg.rungs, cuts)[1]


def route_values(model: CANet, es: EvalSet, tcfg: TrainConfig,
                 dist: distributed.Context | None = None) -> torch.Tensor:
    """[U, R] float64 each user's tcfg.select_metric on every route of the
    current supernet (the probe's input)."""
    cols = [evaluate(model, es, tcfg.ks, tcfg.mask_seen, tcfg.eval_batch_size, route=r,
                     path=tcfg.path, per_user=True, dist=dist)["per_user"][tcfg.select_metric]
            for r in range(model.cfg.num_routes)]
    return torch.tensor(cols, dtype=torch.float64).T


def sandwich_routes(cfg: CANetConfig, n: int, gen: torch.Generator):
    """Warm-up routes [n]: a quarter on the max route, a quarter on the min,
    the rest uniform, so the largest and smallest sub-networks and the ones
    in between are all trained."""
    r = torch.randint(cfg.num_routes, (n,), generator=gen)
    u = torch.rand(n, generator=gen)
    r[u < 0.25] = cfg.max_route
    r[(u >= 0.25) & (u < 0.5)] = 0
    return r


def value_candidates(cfg: CANetConfig, k: int, gen: torch.Generator):
    """Route ids [<= k + 2]: the min, the max and k other routes at random."""
    others = torch.randperm(cfg.num_routes - 2, generator=gen)[:k] + 1
    return torch.cat([torch.tensor([0, cfg.max_route]), others]).unique()


def flop_ratio(cfg: CANetConfig, counts, ref: CANetConfig | None = None) -> float:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    ratios = torch.tensor(route_flop_ratios(cfg, ref), dtype=torch.float64)
    return float((counts * ratios).sum() / counts.sum().clamp_min(1))


@torch.no_grad()
def route_distribution(model: CANet, es: EvalSet, batch_size=256):
    """Router's argmax route per user [U]."""
    model.eval()
    out = []
    for idx in batches(len(es), batch_size):
        items, lengths = _batch(es, idx, _device(model))
        out.append(model.route(items, lengths).routes.cpu())
    return torch.cat(out)


@torch.no_grad()
def time_inference(model: CANet, es: EvalSet, route=None, path="routed",
                   batch_size=256, repeats=3, warmup=1):
    """Best-of-`repeats` wall time (s) of scoring every user of `es`
    (router included when route is None)."""
    model.eval()
    bs = [_batch(es, idx, _device(model)) for idx in batches(len(es), batch_size)]

    def once():
        for items, lengths in bs:
            fixed = _fixed(model, items.shape[0], route)
            model(items, lengths, None if fixed is None else fixed.to(items.device), path)

    for _ in range(warmup):
        once()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------- checkpoints --

def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _save(path, tensors):
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def save_weights(path: str, model: CANet):
    _save(path, model.state_dict())


def write_config(out_dir, model_cfg: CANetConfig, tcfg: TrainConfig, data_source):
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"),
                {"format": CHECKPOINT_FORMAT, "model": model_cfg.to_dict(),
                 "train": tcfg.to_dict(), "data": data_source or {}})


def read_config(out_dir) -> dict:
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint config at {path}")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {cfg.get('format')}")
    return cfg


def load_model(out_dir, which="best") -> tuple[CANet, dict]:
    """(model in eval mode, config dict) from a run directory."""
    cfg = read_config(out_dir)
    model = CANet(CANetConfig.from_dict(cfg["model"]))
    path = os.path.join(out_dir, f"{which}.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {which} weights at {path}")
    state = load_file(path)
    if which == "last":
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    state.setdefault("cost_bias", model.cost_bias)  # checkpoints from before the bias
    model.load_state_dict(state)
    return model.eval(), cfg


def save_last(out_dir, model, opt, gen, state):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = gen.get_state()
    _save(os.path.join(out_dir, "last.safetensors"), tensors)
    _write_json(os.path.join(out_dir, "state.json"),
                dict(state, param_groups=osd["param_groups"]))


def load_last(out_dir, model, opt, gen) -> dict:
    tensors = load_file(os.path.join(out_dir, "last.safetensors"))
    with open(os.path.join(out_dir, "state.json")) as f:
        state = json.load(f)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ost: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            ost.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": ost, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.shuffle"])
    return state


# -------------------------------------------------------------- training --

def train(model_cfg: CANetConfig, tcfg: TrainConfig, split: Split, out_dir=None,
          data_source=None, resume=False, log=print, shard_items=False):
    """Trains from a seed (or resumes `out_dir`), selects the epoch on
    validation, evaluates the test set once with the selected weights.
    Returns (model with the selected weights, results dict). Under torchrun
    every process runs this (see canet_kernels.distributed); rank 0 logs and
    writes. `shard_items`: split the output layer's item rows over the
    processes (one process: all rows, through the same code)."""
    if shard_items:
        distributed.check_shard_items(model_cfg, tcfg)
    if not distributed.env_main():
        log = _quiet
    if model_cfg.max_len < split.max_len:
        raise ValueError(f"model max_len {model_cfg.max_len} < data max_len {split.max_len}")
    if tcfg.router_mode not in ("canet", "value"):
        raise ValueError(f"router_mode must be 'canet' or 'value', got {tcfg.router_mode!r}")
    check_rungs(model_cfg.rungs, tcfg.warmup_epochs, tcfg.rung_epoch, tcfg.rung_lift,
                tcfg.epochs)
    check_rung_choice(model_cfg, tcfg)
    if model_cfg.n_items < split.n_items:
        raise ValueError(f"model n_items {model_cfg.n_items} < data n_items {split.n_items}")
    set_seed(tcfg.seed)
    device = train_device(tcfg.device)
    model = CANet(model_cfg).to(device)   # before the optimizer and a resumed state
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    gen = torch.Generator().manual_seed(tcfg.seed)
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_evals": 0,
             "history": [], "train_seconds": 0.0, "stopped": False}
    if resume:
        if out_dir is None or not os.path.exists(os.path.join(out_dir, "last.safetensors")):
            raise FileNotFoundError(f"nothing to resume in {out_dir}")
        old = read_config(out_dir)
        if old["model"] != model_cfg.to_dict():
            raise ValueError(f"{out_dir}: model config differs from the checkpoint's")
        # settings added after a checkpoint was written count as what ran then
        defaults = {**TrainConfig().to_dict(), **_BEFORE}
        diff = {k for k, v in tcfg.to_dict().items()
                if old["train"].get(k, defaults[k]) != v and k not in _RESUMABLE}
        if diff:
            raise ValueError(f"{out_dir}: training settings {sorted(diff)} differ "
                             "from the checkpoint's")
        state = load_last(out_dir, model, opt, gen)
        log(f"resumed {out_dir} after epoch {state['epoch']}")
    dist = distributed.setup(model, opt, shard_items, device)
    step = dist.wrap(_Step(model, dist.table))
    if out_dir is not None and dist.main:
        write_config(out_dir, model_cfg, tcfg, data_source)

    tr = split.train
    sel = tcfg.select_metric
    eval_route = tcfg.fixed_route if tcfg.fixed_route is not None else tcfg.eval_route
    # the users the epochs on the rungs are selected on (with the probe
    # split: the half the probe did not see)
    rung_valid = split.valid.subset(probe_halves(len(split.valid), tcfg.seed)[1]) \
        if tcfg.rung_probe_split else split.valid
    idle = router_idle(model_cfg, tcfg)
    if idle and eval_route is None:
        log(f"the rungs are cut by history length and chosen by the probe, so the router is "
            f"not used: it is not trained, and epochs 1-{tcfg.rung_epoch} warm up the "
            "supernet (sandwich routes, validated on the max route)")
    start_epoch = state["epoch"] + 1
    for epoch in range(start_epoch, tcfg.epochs + 1):
        if state["stopped"]:
            break
        model.train()
        model.anneal((epoch - 1) / max(tcfg.epochs - 1, 1))  # cfg.tau_end, cfg.noise_end
        dist.seed_epoch(tcfg.seed, epoch)
        t0 = time.perf_counter()
        sums: dict = {}
        nb = 0
        bar = tqdm(dist.train_batches(len(tr), tcfg.batch_size, gen), desc=f"epoch {epoch}",
                   leave=False, disable=not tcfg.progress or not dist.main)
        for batch in bar:
            part = dist.part(len(batch))         # this rank's rows of the batch
            idx = batch[part]
            lengths = tr.lengths[idx]
            L = int(lengths.max())
            routes = _fixed(model, len(idx), tcfg.fixed_route)
            free = routes is None and not model.has_rungs   # no fixed route, no rungs yet
            warm = free and (epoch <= tcfg.warmup_epochs or idle)
            value = free and not warm and tcfg.router_mode == "value"
            if warm or value:
                # drawn for the whole batch: the generator advances as in one process
                routes = sandwich_routes(model.cfg, len(batch), gen)[part]
            items, targets = tr.items[idx, :L].to(device), tr.targets[idx, :L].to(device)
            lengths = lengths.to(device)
            if routes is None and model.has_rungs and tcfg.rung_lift > 0:
                u = torch.rand(len(batch), 2, generator=gen)[part]   # as in one process
                routes = model.lifted_rungs(items, lengths, u, tcfg.rung_lift)
            cand = value_candidates(model.cfg, tcfg.router_candidates, gen) if value else None
            with shared_plans():   # the backward kernels reuse the forward's tile plans
                loss, st = step(items, lengths, targets,
                                None if routes is None else routes.to(device), tcfg.path,
                                None if cand is None else cand.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if tcfg.grad_clip:
                dist.clip_grad_norm(model.parameters(), tcfg.grad_clip)
            opt.step()
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v
            nb += 1
            bar.set_postfix(loss=f"{st['loss']:.3f}", flops=f"{st['flop_ratio']:.2f}")
        state["train_seconds"] += dist.max(time.perf_counter() - t0)  # same on every rank
        rec = {"epoch": epoch, **dist.mean_stats(sums, nb)}
        msg = f"epoch {epoch}: loss {rec.get('loss', float('nan')):.4f}"
        if "ce" in rec:
            msg += f" ce {rec['ce']:.4f} train flop ratio {rec['flop_ratio']:.3f}"
        out_of_time = (tcfg.max_train_seconds is not None
                       and state["train_seconds"] >= tcfg.max_train_seconds)
        if _rungs_pending(model, eval_route) and (epoch >= tcfg.rung_epoch or out_of_time):
            if tcfg.calibrate_flops and not idle:   # the votes are the deployed routes'
                calibrate(model, split.valid, tcfg.eval_batch_size, spend=tcfg.spend_budget,
                          dist=dist)
            rec["rungs"] = consolidate(model, split.valid, tcfg, dist)
            msg += " | rungs " + ", ".join(f"{r} {model.cfg.routes()[r]}" for r in rec["rungs"])
            # select among the epochs on the rungs only: the routes served
            state["best"], state["bad_evals"] = None, 0
        if epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs or "rungs" in rec:
            # an idle router's routes serve nobody: until the rungs, validation
            # logs the max route, what the sandwich warm-up has trained
            unread = idle and _rungs_pending(model, eval_route)
            if eval_route is None and tcfg.calibrate_flops and not model.has_rungs \
                    and not unread:
                rec["cost_bias"] = calibrate(model, split.valid, tcfg.eval_batch_size,
                                             spend=tcfg.spend_budget, dist=dist)
            valid = rung_valid if model.has_rungs else split.valid
            val = evaluate(model, valid, tcfg.ks, tcfg.mask_seen, tcfg.eval_batch_size,
                           route="max" if unread else eval_route, path=tcfg.path,
                           dist=dist)
            rec["valid"] = {k: v for k, v in val.items() if k != "route_counts"}
            rec["valid"]["users"] = len(valid)
            rec["route_counts"] = val["route_counts"]
            msg += f" | valid {sel} {val[sel]:.4f} flop ratio {val['flop_ratio']:.3f}"
            if len(valid) < len(split.valid):
                msg += f" ({len(valid)} users, the probe's other half)"
            msg += " | " + ("max route (the router is idle until the rungs)" if unread
                            else route_summary(model.cfg, val["route_counts"]))
            if eval_route is None and not unread:
                collapse_warning(model.cfg, val["route_counts"], epoch)
            if state["best"] is None or val[sel] > state["best"][sel]:
                state["best"], state["best_epoch"], state["bad_evals"] = \
                    rec["valid"], epoch, 0
                msg += " *"
                with dist.full_table():
                    if out_dir is not None:
                        if dist.main:
                            save_weights(os.path.join(out_dir, "best.safetensors"), model)
                    else:
                        best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                state["bad_evals"] += 1
                # (not before the rungs: the routes served are chosen there)
                if tcfg.patience is not None and state["bad_evals"] >= tcfg.patience \
                        and not _rungs_pending(model, eval_route):
                    state["stopped"] = True
                    msg += " (early stop)"
        if out_of_time and not state["stopped"]:
            state["stopped"] = True
            msg += " (time budget spent)"
        state["history"].append(rec)
        state["epoch"] = epoch
        log(msg)
        if out_dir is not None:
            with dist.full_table(opt):
                if dist.main:
                    save_last(out_dir, model, opt, gen, state)

    # the selected weights, then the test set once
    with dist.full_table():
        if out_dir is not None and dist.main and \
                os.path.exists(os.path.join(out_dir, "best.safetensors")):
            model.load_state_dict(load_file(os.path.join(out_dir, "best.safetensors")))
        elif out_dir is None and state["best"] is not None:
            model.load_state_dict(best_state)
        dist.broadcast_model(model)     # rank 0 read the file (it may be on its machine only)
        model.read_rungs()
    test = evaluate(model, split.test, tcfg.ks, tcfg.mask_seen, tcfg.eval_batch_size,
                    route=eval_route, path=tcfg.path, dist=dist)
    results = {"protocol": protocol(tcfg), "best_epoch": state["best_epoch"],
               "epochs_run": state["epoch"], "train_seconds": state["train_seconds"],
               "valid": state["best"], "test": test}
    if out_dir is not None and dist.main:
        _write_json(os.path.join(out_dir, "results.json"), results)
    if dist.table is not None:
        dist.table.unshard()            # the returned model scores the whole table
    dist.barrier()  # no rank exits while another still waits on it (that aborts gloo)
    return model.eval(), results


def router_idle(mcfg: CANetConfig, tcfg: TrainConfig) -> bool:
    """The rungs never read the router: the users are cut into groups by
    history length and each group's route is chosen by the probe, so
    training the router would only train the supernet on routes that are
    never served, under losses that shape nothing served."""
    return bool(mcfg.rungs) and mcfg.rung_signal == "length" and tcfg.rung_choice == "probe"


def check_rung_choice(mcfg: CANetConfig, tcfg: TrainConfig):
    """Refuses rung_choice, rung_probe_split, rung_cut and rung_order
    values that do not apply, naming them."""
    if tcfg.rung_choice not in ("vote", "probe"):
        raise ValueError(f"rung_choice must be 'vote' or 'probe', got {tcfg.rung_choice!r}")
    if tcfg.rung_probe_split and mcfg.rungs and tcfg.rung_choice != "probe":
        raise ValueError("rung_probe_split needs rung_choice 'probe' (the votes read "
                         f"no validation targets), got {tcfg.rung_choice!r}")
    if tcfg.rung_cut not in ("valid", "served"):
        raise ValueError(f"rung_cut must be 'valid' or 'served', got {tcfg.rung_cut!r}")
    if tcfg.rung_order not in ("free", "rising"):
        raise ValueError(f"rung_order must be 'free' or 'rising', got {tcfg.rung_order!r}")
    if not mcfg.rungs:
        return
    if tcfg.rung_cut == "served" and mcfg.rung_signal != "length":
        raise ValueError("rung_cut 'served' cuts on history lengths: it needs rung_signal "
                         f"'length', got {mcfg.rung_signal!r}")
    if tcfg.rung_order == "rising":
        if tcfg.rung_choice != "probe":
            raise ValueError("rung_order 'rising' orders the probe's routes: it needs "
                             f"rung_choice 'probe', got {tcfg.rung_choice!r}")
        distinct = len(set(mcfg.route_flop_ratios()))
        if distinct < mcfg.rungs:
            raise ValueError(f"rung_order 'rising': rungs={mcfg.rungs} need as many routes "
                             f"of distinct FLOP ratios, the routes have {distinct}")


def check_rungs(rungs: int, warmup_epochs: int, rung_epoch: int, rung_lift: float,
                epochs: int | None = None, prefix: str = ""):
    """Errors naming the setting (`prefix` + its name, e.g. RecBole's
    "canet_") for rung settings that cannot run: with rungs, a rung epoch in
    the warm-up or past `epochs` (when given); a lift share outside [0, 1)."""
    if rungs and not (warmup_epochs < rung_epoch and (epochs is None or rung_epoch <= epochs)):
        most = "" if epochs is None else f" and at most epochs ({epochs})"
        raise ValueError(f"{prefix}rung_epoch must be after the warm-up ({warmup_epochs})"
                         f"{most}, got {rung_epoch}")
    if not 0.0 <= rung_lift < 1.0:
        raise ValueError(f"{prefix}rung_lift must be in [0, 1), got {rung_lift}")


def _rungs_pending(model: CANet, eval_route) -> bool:
    """The model is to be consolidated into rungs and is not yet."""
    return eval_route is None and bool(model.cfg.rungs) and not model.has_rungs


def _quiet(*_args, **_kwargs):
    """The log of ranks other than 0."""


class _Step(torch.nn.Module):
    """A training step's loss as one forward, so that DistributedDataParallel
    sees the whole step (CE, router losses, value regression) in one pass."""

    def __init__(self, model: CANet, table=None):
        super().__init__()
        self.model, self.table = model, table

    def forward(self, items, lengths, targets, routes, path, cand=None):
        if self.table is None:
            loss, st = self.model.loss(items, lengths, targets, routes=routes, path=path)
        else:
            loss, st = self.model.loss(items, lengths, targets, routes=routes, path=path,
                                       table=self.table)
        if cand is not None:
            last = targets[torch.arange(len(items)), lengths - 1]
            rv = self.model.route_value_loss(items, lengths, last, cand)
            loss = loss + rv
            st["router"] = rv.item()
        return loss, st


def protocol(tcfg: TrainConfig) -> str:
    seen = "seen items masked" if tcfg.mask_seen else "seen items not masked"
    return (f"leave-one-out, full ranking over all items ({seen}), "
            f"model selected on validation {tcfg.select_metric}, test evaluated once")
