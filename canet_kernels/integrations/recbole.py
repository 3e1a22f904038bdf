"""canet in RecBole 1.2.1: CANet (router + weight-sliced supernet) and its
dense max-route variant as RecBole `SequentialRecommender`s, trained and
evaluated by RecBole's own `Config`, `create_dataset`, `data_preparation`
and `Trainer`, with its CE loss and full-sort evaluation.

A RecBole custom-model script changes four lines:

    from canet_kernels.integrations.recbole import CANetRec, CANetTrainer
    config = Config(model=CANetRec, dataset="ml-100k", config_dict=cfg)
    model = CANetRec(config, train_data.dataset).to(config["device"])
    trainer = CANetTrainer(config, model)

(`CANetDenseRec` for the dense model). The config needs
`train_neg_sample_args: None` (CE over all items, as RecBole's SASRec with
`loss_type: CE`); RecBole's default `eval_args` split randomly, and
sequential models are normally run with
`eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`.

Config keys (every default is the CANetConfig / TrainConfig field default):

  canet_<field>        any CANetConfig field except n_items and max_len, e.g.
                       canet_emb_widths, canet_hidden_widths, canet_depths
                       (lists), canet_flop_target (<= 0 or None: no budget),
                       canet_tie_embeddings, canet_residual_scale_init,
                       canet_guide_weight, canet_uniform_weight, ...
  n_heads, hidden_dropout_prob, layer_norm_eps
                       RecBole SASRec's names for num_heads, dropout and
                       ln_eps, read when the canet_ key is absent
  hidden_size, n_layers, inner_size
                       SASRec's size: when given (and the canet_ keys are
                       not), the routing space is hidden and embedding widths
                       {H/2, 3H/4, H} (those divisible by the heads), depths
                       1..n_layers, ffn_ratio inner_size / H, so the max
                       route is that SASRec (as integrations.sasrec does)
  MAX_ITEM_LIST_LENGTH RecBole's sequence length is canet's max_len
  canet_path           "routed" (canet ops, default) or "masked"
  canet_calibrate_flops, canet_spend_budget, canet_warmup_epochs,
  canet_rung_epoch, canet_rung_lift
                       TrainConfig's fields of those names, used by
                       CANetTrainer (with canet_rungs K: after epoch
                       canet_rung_epoch the routes become K rungs by the
                       validation users' votes, the groups cut as
                       canet_rung_signal says, see CANetTrainer; the probe,
                       canet_rung_choice: probe, and its split,
                       canet_rung_probe_split, canet_rung_cut and
                       canet_rung_order, are canet train's only)

Item ids: RecBole's `n_items` counts the padding id 0, so canet's n_items is
one less, and canet's score rows [B, n_items + 1] are RecBole's [B, n_items].

Routes at evaluation are the router's argmax less a cost bias per unit of
FLOP ratio; `CANetTrainer` sets that bias on the validation users before each
validation (`CANetRec.calibrate`) so the routes meet canet_flop_target; the
bias is a buffer, so RecBole's best-model checkpoint carries it to the test
evaluation. With a plain RecBole `Trainer` the routes are the uncalibrated
argmax. After each evaluation the trainer's `last_eval` (and
`model.route_stats()`) holds the route counts and the mean FLOP ratio (vs
the max route); CANetTrainer also adds `flop_ratio` to RecBole's result dict.

Importing this module makes RecBole 1.2.1 run on NumPy >= 2, torch >= 2.6 and
pandas >= 3 (see the shims below); nothing in the core imports it.
"""
from __future__ import annotations

import time
import types
from dataclasses import fields

import numpy as np
import torch

from ..model import CANet, CANetConfig
from ..train import TrainConfig, check_rungs, flop_ratio, sandwich_routes

try:
    import recbole  # noqa: F401
except ImportError as e:  # the optional extra
    raise ImportError("canet_kernels.integrations.recbole needs RecBole 1.2.1 (the "
                      "`recbole` extra of canet)") from e

# --------------------------------------------------------------- shims --
# NumPy 2 removed aliases that RecBole's Config.compatibility_settings reads
# (it then sets np.float, np.int, ... itself). Added only where missing.
_NUMPY_ALIASES = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}
for _old, _new in _NUMPY_ALIASES.items():
    if not hasattr(np, _old):
        setattr(np, _old, getattr(np, _new))

import recbole.trainer.trainer as _rb_trainer  # noqa: E402
from recbole.data.dataset import dataset as _rb_dataset  # noqa: E402
from recbole.model.abstract_recommender import SequentialRecommender  # noqa: E402
from recbole.utils import FeatureType, InputType  # noqa: E402


class _TorchForRecBoleTrainer(types.ModuleType):
    """`torch` as RecBole's trainer module sees it: everything forwards to
    torch, except that `load` defaults to weights_only=False.

    torch >= 2.6 loads with weights_only=True by default, and RecBole's
    checkpoint (written by its own Trainer._save_checkpoint in this run)
    pickles the Config object, so the best-model reload in
    Trainer.evaluate(load_best_model=True) and resume_checkpoint fail. Only
    that module's name `torch` is replaced: torch.load everywhere else in the
    process keeps the safe default."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


if not isinstance(_rb_trainer.torch, _TorchForRecBoleTrainer):
    _rb_trainer.torch = _TorchForRecBoleTrainer()


def _fill_nan(self):
    """RecBole's Dataset._fill_nan without chained in-place fillna, which
    pandas >= 3 (copy-on-write) turns into a no-op plus a warning: missing
    token ids -> 0 ([PAD]), missing floats -> the field's mean, missing
    sequences -> empty arrays."""
    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x)


def _pandas_major():
    import pandas
    return int(pandas.__version__.split(".")[0])


if _pandas_major() >= 3:
    _rb_dataset.Dataset._fill_nan = _fill_nan


# -------------------------------------------------------------- config --
_FIELDS = {f.name: f for f in fields(CANetConfig)}
_FROM_DATA = ("n_items", "max_len")
# SASRec's RecBole names of CANetConfig fields, read when canet_<field> is absent
SASREC_KEYS = {"num_heads": "n_heads", "dropout": "hidden_dropout_prob",
               "ln_eps": "layer_norm_eps"}
_TUPLES = ("emb_widths", "hidden_widths", "depths")


def _get(config, key):
    return config[key] if key in config else None


def _ints(v):
    if isinstance(v, str):
        v = [s for s in v.replace("[", "").replace("]", "").replace(" ", "").split(",") if s]
    return tuple(int(x) for x in v)


def canet_config(config, n_items: int, max_len: int) -> CANetConfig:
    """CANetConfig from a RecBole config (see the module docstring for the
    keys); `n_items` excludes the padding id."""
    kw = {}
    for name, f in _FIELDS.items():
        if name in _FROM_DATA:
            continue
        key = "canet_" + name
        if key in config and config[key] is None and "None" in str(f.type):
            kw[name] = None                # e.g. canet_flop_target: ~ (no budget)
            continue
        v = _get(config, key)
        if v is None and name in SASREC_KEYS:
            v = _get(config, SASREC_KEYS[name])
        if v is not None:
            kw[name] = _ints(v) if name in _TUPLES else v
    H = _get(config, "hidden_size")
    if H is not None:
        H = int(H)
        heads = int(kw.get("num_heads", _FIELDS["num_heads"].default))
        widths = tuple(sorted({w for w in (H // 2, 3 * H // 4, H)
                               if w > 0 and w % heads == 0}))
        kw.setdefault("hidden_widths", widths)
        kw.setdefault("emb_widths", kw["hidden_widths"])
        inner = _get(config, "inner_size")
        if inner is not None and int(inner) % H == 0:
            kw.setdefault("ffn_ratio", int(inner) // H)
    n_layers = _get(config, "n_layers")
    if n_layers is not None:
        kw.setdefault("depths", tuple(range(1, int(n_layers) + 1)))
    if "flop_target" in kw and kw["flop_target"] is not None and kw["flop_target"] <= 0:
        kw["flop_target"] = None
    return CANetConfig(n_items=n_items, max_len=max_len, **kw)


def train_option(config, name):
    """TrainConfig field `name` from the RecBole key canet_<name>, else its
    default."""
    v = _get(config, "canet_" + name)
    return getattr(TrainConfig, name) if v is None else v


# --------------------------------------------------------------- models --
class CANetRec(SequentialRecommender):
    """CANet: each user's history picks its route (embedding width, hidden
    width, depth) of one weight-sliced SASRec-style supernet. Loss: CE over
    all items at the last position (RecBole's POS_ITEM_ID), plus the router's
    guide, uniform and budget losses."""

    input_type = InputType.POINTWISE
    dense = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        neg = config["train_neg_sample_args"]
        if neg is not None and neg.get("distribution", "none") != "none":
            raise ValueError(f"{type(self).__name__} trains with CE over all items: set "
                             "train_neg_sample_args: None in the RecBole config")
        self.canet_cfg = canet_config(config, n_items=self.n_items - 1,
                                      max_len=self.max_seq_length)
        self.canet = CANet(self.canet_cfg)
        self.path = _get(config, "canet_path") or "routed"
        self.spend_budget = bool(train_option(config, "spend_budget"))
        self.calibrate_flops = bool(train_option(config, "calibrate_flops"))
        self.warmup_epochs = int(train_option(config, "warmup_epochs"))
        self.warmup = False               # set per epoch by CANetTrainer
        self.rung_epoch = int(train_option(config, "rung_epoch"))
        self.rung_lift = float(train_option(config, "rung_lift"))
        if self.canet_cfg.rungs:
            if train_option(config, "rung_choice") != "vote":
                raise ValueError("canet_rung_choice: CANetTrainer consolidates by the "
                                 "validation users' votes only ('vote'), got "
                                 f"{train_option(config, 'rung_choice')!r}")
            if train_option(config, "rung_probe_split"):
                raise ValueError("canet_rung_probe_split splits the probe's validation "
                                 "users; CANetTrainer runs no probe (it consolidates by "
                                 "votes)")
            for name, plain in (("rung_cut", "valid"), ("rung_order", "free")):
                if train_option(config, name) != plain:
                    raise ValueError(f"canet_{name} is canet train's only; CANetTrainer "
                                     f"takes {plain!r}, got {train_option(config, name)!r}")
            check_rungs(self.canet_cfg.rungs, self.warmup_epochs, self.rung_epoch,
                        self.rung_lift, prefix="canet_")
        seed = _get(config, "seed")
        self._gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
        self.register_buffer("route_counts", torch.zeros(
            self.canet_cfg.num_routes, dtype=torch.int64), persistent=False)
        self.last_stats: dict = {}        # the last training batch's loss parts

    # ---------------------------------------------------------- batches --
    def _batch(self, interaction):
        items, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        L = max(int(lengths.max()), 1) if lengths.numel() else 1
        return items[:, :L], lengths

    def _fixed_routes(self, B, device):
        if self.dense:
            return self.canet.fixed_routes(B, device=device)
        if self.training and self.warmup:
            return sandwich_routes(self.canet_cfg, B, self._gen).to(device)
        return None

    # --------------------------------------------------- RecBole methods --
    def forward(self, item_seq, item_seq_len):
        """Last position's hidden state [B, D] (zero beyond each route's
        hidden width), routes from the router unless dense."""
        items = item_seq[:, :max(int(item_seq_len.max()), 1)]
        out = self.canet.encode(items, item_seq_len,
                                self._fixed_routes(items.shape[0], items.device),
                                path=self.path)
        return out.last

    def calculate_loss(self, interaction):
        items, lengths = self._batch(interaction)
        target = interaction[self.POS_ITEM_ID]
        routes = self._fixed_routes(items.shape[0], items.device)
        if routes is None and self.canet.has_rungs and self.rung_lift > 0:
            u = torch.rand(items.shape[0], 2, generator=self._gen)
            routes = self.canet.lifted_rungs(items, lengths, u, self.rung_lift)
        loss, stats = self.canet.loss(items, lengths, target, routes=routes, path=self.path)
        self.last_stats = stats
        return loss

    def full_sort_predict(self, interaction):
        """Scores [B, n_items] (RecBole's n_items, padding id 0 included)."""
        items, lengths = self._batch(interaction)
        scores, routes = self.canet(items, lengths,
                                    self._fixed_routes(items.shape[0], items.device),
                                    path=self.path)
        if not self.training:
            self.route_counts += torch.bincount(routes, minlength=self.canet_cfg.num_routes)
        return scores

    def predict(self, interaction):
        """Scores [B] of interaction[ITEM_ID] (sampled-candidate evaluation;
        each row counts once in route_stats)."""
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID][:, None]).squeeze(1)

    # ------------------------------------------------------ routes, FLOPs --
    def train(self, mode: bool = True):
        if not mode and self.training:
            self.reset_route_counts()     # a new evaluation starts
        return super().train(mode)

    def reset_route_counts(self):
        self.route_counts.zero_()

    def route_stats(self) -> dict:
        """Routes taken by the predictions since the last reset (the start
        of the last evaluation): counts per route id (into
        canet_cfg.routes()) and their mean FLOP ratio vs the max route."""
        counts = self.route_counts.cpu()
        return {"flop_ratio": flop_ratio(self.canet_cfg, counts),
                "route_counts": counts.tolist(),
                "cost_bias": float(self.canet.cost_bias)}

    @torch.no_grad()
    def calibrate(self, eval_data, spend: bool | None = None) -> float:
        """Sets the inference cost bias from a RecBole evaluation dataloader
        of held-out (validation) users so the routes' mean FLOP ratio meets
        canet_flop_target; returns the bias (0 for the dense model)."""
        if self.dense:
            return 0.0
        spend = self.spend_budget if spend is None else spend
        return self.canet.calibrate(self._eval_batches(eval_data), spend=spend)

    @torch.no_grad()
    def consolidate(self, eval_data) -> list:
        """Consolidates the routes into canet_rungs rungs from a RecBole
        evaluation dataloader of held-out (validation) users: each group's
        most common route (CANetEncoder.set_rungs). Returns the rung routes."""
        return self.canet.consolidate(self._eval_batches(eval_data))

    def _eval_batches(self, eval_data):
        dev = self.canet.cost_bias.device
        for batch in eval_data:
            inter = batch[0] if isinstance(batch, tuple) else batch
            items, lengths = self._batch(inter)
            yield items.to(dev), lengths.to(dev)


class CANetDenseRec(CANetRec):
    """The dense model of the same supernet: every user on the max route
    (a SASRec-style model of the routing space's largest size), CE only.
    The router's weights exist (so checkpoints match CANetRec's) but are
    never used or trained."""

    dense = True


# -------------------------------------------------------------- trainer --
class CANetTrainer(_rb_trainer.Trainer):
    """RecBole's Trainer plus, for CANetRec: the inference cost bias set on
    the validation users before each validation, the supernet warm-up epochs
    (canet_warmup_epochs, sandwich routes), the rungs (canet_rungs: after
    epoch canet_rung_epoch the routes are consolidated on the validation
    users, RecBole's best-model selection restarts there, and no early stop
    comes before it), and the routes and mean FLOP ratio of each evaluation
    (`last_eval`, and `flop_ratio` in the result). Validation selection,
    early stopping and checkpoints are otherwise RecBole's. `epoch_seconds`
    holds each training epoch's wall time."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.last_eval: dict | None = None
        self.epoch_seconds: list = []
        self.epochs_trained = 0

    def _canet(self):
        return self.model if isinstance(self.model, CANetRec) else None

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        m = self._canet()
        if m is not None:
            m.warmup = epoch_idx < m.warmup_epochs
        t = time.perf_counter()
        out = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.epoch_seconds.append(time.perf_counter() - t)
        self.epochs_trained = epoch_idx + 1
        if m is not None:
            m.warmup = False
        return out

    def _valid_epoch(self, valid_data, show_progress=False):
        m = self._canet()
        if m is not None and not m.dense:
            if m.calibrate_flops and not m.canet.has_rungs:
                bias = m.calibrate(valid_data)
                self.logger.info(f"canet: inference cost bias {bias:.4g} "
                                 "(calibrated on the validation users)")
            if m.canet_cfg.rungs and not m.canet.has_rungs:
                if self.epochs_trained >= m.rung_epoch:
                    rungs = m.consolidate(valid_data)
                    self.logger.info(f"canet: routes consolidated into rungs {rungs}")
                    # select among the epochs on the rungs only (the routes served)
                    self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
                self.cur_step = 0                   # no early stop before the rungs
        return super()._valid_epoch(valid_data, show_progress)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None,
                 show_progress=False):
        m = self._canet()
        if m is not None:
            m.reset_route_counts()
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        if m is not None and result is not None:
            self.last_eval = m.route_stats()
            result["flop_ratio"] = round(self.last_eval["flop_ratio"],
                                         self.config["metric_decimal_place"] or 4)
        return result
