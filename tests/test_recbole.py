"""The RecBole adapter through RecBole's own pipeline (Config, create_dataset,
data_preparation, Trainer) on its bundled ml-100k: one short epoch of CE
training, validation with the FLOP calibration, the best-model reload
(torch.load of RecBole's pickled checkpoint) and full-sort test metrics that
must beat a random ranking by a wide margin. Skipped without recbole (the
optional `recbole` extra)."""
from __future__ import annotations

import math
import sys

import pytest

pytest.importorskip("recbole")
pytest.importorskip("pandas")

import torch  # noqa: E402

from canet_kernels.integrations.recbole import (CANetDenseRec, CANetRec,  # noqa: E402
                                                CANetTrainer, canet_config)

# Small and short (about 10 s an epoch on 2 cores): sequences of 10, the
# 5-star ratings only (a fifth of ml-100k), a routing space of widths 16/32
# and depths 1/2.
CONFIG = {
    "train_neg_sample_args": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "val_interval": {"rating": "[5,inf)"},
    "normalize_all": False,
    "MAX_ITEM_LIST_LENGTH": 10,
    "epochs": 1,
    "train_batch_size": 1024,
    "learning_rate": 0.01,
    "metrics": ["NDCG", "Recall"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "show_progress": False,
    "use_gpu": False,
    "seed": 0,
    "canet_emb_widths": [16, 32],
    "canet_hidden_widths": [16, 32],
    "canet_depths": [1, 2],
    "n_heads": 2,
    "canet_flop_target": 0.5,
}


def random_ndcg(n_candidates: int, k: int = 10) -> float:
    """Expected NDCG@k of a uniformly random ranking of one relevant item
    among n_candidates (sequential full-sort: nothing masked but padding)."""
    return sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / n_candidates


def run_recbole(model_cls, tmp_path, monkeypatch, **overrides):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    monkeypatch.chdir(tmp_path)                    # RecBole's log_tensorboard/
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # RecBole reads --key=value args
    config = Config(model=model_cls, dataset="ml-100k",
                    config_dict={**CONFIG, "checkpoint_dir": str(tmp_path / "saved"),
                                 **overrides})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = model_cls(config, train_data.dataset).to(config["device"])
    trainer = CANetTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True)  # reloads the checkpoint
    return model, trainer, result, test_data


def test_canet_trains_and_beats_random(tmp_path, monkeypatch):
    model, trainer, result, test_data = run_recbole(CANetRec, tmp_path, monkeypatch)
    n_items = test_data.dataset.item_num               # padding id 0 included
    assert model.canet_cfg.n_items == n_items - 1
    assert model.canet_cfg.max_len == CONFIG["MAX_ITEM_LIST_LENGTH"]
    # one epoch learns at least the popularity: NDCG@10 ~0.03 against 0.004
    # for a random ranking
    floor = 4 * random_ndcg(n_items - 1)
    ndcg = float(result["ndcg@10"])
    assert ndcg > floor, (ndcg, floor)
    assert 0 < float(result["recall@10"]) <= 1
    # routes at test time: every test user routed, FLOP ratio at the target
    stats = trainer.last_eval
    assert sum(stats["route_counts"]) == len(test_data.dataset)
    assert 0 < stats["flop_ratio"] <= CONFIG["canet_flop_target"] + 1e-9
    assert result["flop_ratio"] == pytest.approx(stats["flop_ratio"], abs=1e-4)
    assert set(model.last_stats) >= {"ce", "guide", "uniform", "budget"}

    # the floor tells a working adapter from a broken one: the same scores
    # shifted by one item column (an off-by-one in the id mapping) stay
    # under it (~0.006; RecBole numbers items by first appearance, so
    # neighbouring ids keep some popularity)
    full = model.full_sort_predict
    monkeypatch.setattr(model, "full_sort_predict",
                        lambda inter: torch.roll(full(inter), 1, dims=1))
    broken = float(trainer.evaluate(test_data, load_best_model=False)["ndcg@10"])
    assert broken < floor, (broken, floor, ndcg)


def test_rungs_in_recbole(tmp_path, monkeypatch):
    """canet_rungs: after epoch canet_rung_epoch the routes become rungs on
    the validation users; the next epoch trains on them with the lift; the
    selection restarts there, so RecBole's best checkpoint, reloaded for the
    test, carries the rungs and serves every test user on one of them."""
    from canet_kernels.model import CANet

    lifted = []
    real = CANet.lifted_rungs

    def spy(self, items, lengths, u, share):
        lifted.append(share)
        return real(self, items, lengths, u, share)

    monkeypatch.setattr(CANet, "lifted_rungs", spy)
    # validation scores that peak before the rungs (epoch 1): the selection
    # must still take an epoch on the rungs
    from recbole.trainer import trainer as rbt
    scores = iter([0.9, 0.1, 0.2])

    def fake_valid(self, valid_data, show_progress=False):
        v = next(scores)
        return v, {"ndcg@10": v}

    monkeypatch.setattr(rbt.Trainer, "_valid_epoch", fake_valid)
    model, trainer, result, test_data = run_recbole(
        CANetRec, tmp_path, monkeypatch, epochs=3, canet_rungs=2, canet_rung_epoch=2,
        stopping_step=1)
    assert trainer.best_valid_score == 0.2
    assert model.canet.has_rungs                        # the reloaded best checkpoint
    rungs = set(model.canet.rung_routes.tolist())
    counts = trainer.last_eval["route_counts"]
    assert sum(counts[r] for r in rungs) == sum(counts) == len(test_data.dataset)
    assert lifted and set(lifted) == {0.25}             # epoch 3 trained on the rungs, lifted
    assert set(model.last_stats) == {"ce", "flop_ratio", "loss"}    # router frozen
    with pytest.raises(ValueError, match="canet_rung_choice"):
        run_recbole(CANetRec, tmp_path, monkeypatch, canet_rungs=2, canet_rung_choice="probe")
    with pytest.raises(ValueError, match="canet_rung_probe_split"):
        run_recbole(CANetRec, tmp_path, monkeypatch, canet_rungs=2, canet_rung_probe_split=True)
    with pytest.raises(ValueError, match="canet_rung_cut"):
        run_recbole(CANetRec, tmp_path, monkeypatch, canet_rungs=2, canet_rung_cut="served")
    with pytest.raises(ValueError, match="canet_rung_order"):
        run_recbole(CANetRec, tmp_path, monkeypatch, canet_rungs=2, canet_rung_order="rising")
    with pytest.raises(ValueError, match="canet_rung_epoch must be after the warm-up"):
        run_recbole(CANetRec, tmp_path, monkeypatch, canet_rungs=2, canet_rung_epoch=1,
                    canet_warmup_epochs=1)


def test_dense_variant(tmp_path, monkeypatch):
    model, trainer, result, test_data = run_recbole(CANetDenseRec, tmp_path, monkeypatch)
    floor = 4 * random_ndcg(test_data.dataset.item_num - 1)
    assert float(result["ndcg@10"]) > floor, (result, floor)
    assert trainer.last_eval["flop_ratio"] == pytest.approx(1.0)
    assert set(model.last_stats) == {"ce", "flop_ratio", "loss"}   # CE only


def test_config_keys():
    """canet_<field> keys, SASRec's names, SASRec's size as the routing
    space, and CANetConfig's own defaults for the rest."""
    from canet_kernels.model import CANetConfig

    cfg = canet_config({"hidden_size": 64, "n_layers": 3, "inner_size": 128,
                        "n_heads": 2, "hidden_dropout_prob": 0.5,
                        "canet_flop_target": 0}, n_items=10, max_len=7)
    assert cfg.hidden_widths == cfg.emb_widths == (32, 48, 64)
    assert cfg.depths == (1, 2, 3) and cfg.ffn_ratio == 2
    assert cfg.num_heads == 2 and cfg.dropout == 0.5 and cfg.flop_target is None
    assert (cfg.n_items, cfg.max_len) == (10, 7)
    default = CANetConfig(n_items=10)
    assert cfg.router_width == default.router_width
    cfg = canet_config({"canet_depths": [2, 4], "canet_hidden_widths": "32,64"},
                       n_items=10, max_len=7)
    assert cfg.depths == (2, 4) and cfg.hidden_widths == (32, 64)
    assert cfg.emb_widths == default.emb_widths and cfg.dropout == default.dropout
    assert cfg.flop_target == default.flop_target
    assert canet_config({"canet_flop_target": None}, n_items=10, max_len=7).flop_target is None
