"""Training and evaluation: the seen-item mask really reaches the metrics,
and model selection keeps the best validation epoch's weights."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from canet_kernels import train as T
from canet_kernels.data import EvalSet
from canet_kernels.model import CANetConfig

from helpers import one_thread, report_on_valid  # noqa: E402,F401  (autouse fixture)


class SeenFirst(nn.Module):
    """Scores every item a user has seen above everything else, then the
    item ids in descending order: the held-out target ranks first among
    the unseen items only when seen items are masked."""

    def __init__(self, n_items):
        super().__init__()
        self.cfg = CANetConfig(n_items=n_items, max_len=4, emb_widths=(8,),
                               hidden_widths=(8,), depths=(1,), num_heads=2)

    def forward(self, items, lengths, routes=None, path="routed"):
        B = items.shape[0]
        n = self.cfg.n_items + 1
        s = torch.arange(n, dtype=torch.float64).expand(B, n).clone() / n
        s.scatter_(1, items, 10.0)
        return s, torch.zeros(B, dtype=torch.int64)


def test_evaluation_masks_seen_items():
    n = 20
    # two users; each target is the largest unseen id, seen ids are larger
    items = torch.tensor([[20, 19, 0, 0], [18, 20, 19, 0]])
    es = EvalSet(items=items, lengths=torch.tensor([2, 3]), targets=torch.tensor([18, 17]),
                 seen=items.clone(), users=torch.arange(2))
    m = SeenFirst(n)
    masked = T.evaluate(m, es, ks=(1, 5), mask_seen=True)
    plain = T.evaluate(m, es, ks=(1, 5), mask_seen=False)
    assert masked["hr@1"] == 1.0 and masked["ndcg@5"] == 1.0
    # unmasked: user 0's target is behind 2 seen items, user 1's behind 3
    assert plain["hr@1"] == 0.0
    expect = (1 / math.log2(2 + 2) + 1 / math.log2(3 + 2)) / 2
    assert abs(plain["ndcg@5"] - expect) < 1e-12


def test_evaluate_with_a_route_per_user():
    from canet_kernels import data as D
    from canet_kernels.model import CANet
    ds = D.synthetic(40, 40, seed=1)
    es = D.leave_one_out(ds, 8).test
    cfg = CANetConfig(n_items=ds.n_items, max_len=8, emb_widths=(8, 16), hidden_widths=(8, 16),
                      depths=(1, 2), num_heads=2)
    model = CANet(cfg)
    routes = torch.arange(len(es)) % cfg.num_routes
    res = T.evaluate(model, es, batch_size=7, route=routes, per_user=True)
    assert res["per_user"]["routes"] == routes.tolist()
    assert res["route_counts"] == torch.bincount(routes, minlength=cfg.num_routes).tolist()
    # the same users on one route each: the per-user values of that route
    for r in (0, cfg.max_route):
        one = T.evaluate(model, es, route=r, per_user=True)["per_user"]["ndcg@10"]
        sel = (routes == r).nonzero().flatten().tolist()
        assert [res["per_user"]["ndcg@10"][i] for i in sel] == [one[i] for i in sel]


def test_selection_keeps_the_best_validation_epoch(monkeypatch, tmp_path):
    """Validation scores 0.1, 0.5, 0.2: the selected weights and the test
    evaluation are those of epoch 2, with or without a run directory."""
    from canet_kernels import data as D
    split = D.leave_one_out(D.synthetic(60, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, max_len=8, emb_widths=(8,),
                      hidden_widths=(8,), depths=(1,), num_heads=2, router_width=8,
                      router_heads=2, router_ffn=16, flop_target=None)
    real = T.evaluate
    marks = iter([0.1, 0.5, 0.2])
    weights = {}

    def fake(model, es, *a, **kw):
        res = real(model, es, *a, **kw)
        if es is split.valid:
            res["ndcg@10"] = next(marks)
            weights[res["ndcg@10"]] = model.net.w_p.detach().clone()
        else:
            weights["test"] = model.net.w_p.detach().clone()
        return res

    monkeypatch.setattr(T, "evaluate", fake)
    for out in (None, str(tmp_path / "run")):
        marks = iter([0.1, 0.5, 0.2])
        weights.clear()
        tcfg = T.TrainConfig(epochs=3, batch_size=32, progress=False, seed=1)
        model, res = T.train(cfg, tcfg, split, out_dir=out, log=lambda *_: None)
        assert res["best_epoch"] == 2 and res["valid"]["ndcg@10"] == 0.5
        assert torch.equal(weights["test"], weights[0.5])
        assert not torch.equal(weights[0.5], weights[0.2])


def test_route_report_quartiles_and_reference():
    cfg = CANetConfig(n_items=50, max_len=8, emb_widths=(8, 16), hidden_widths=(8, 16),
                      depths=(1, 2), num_heads=2)
    ratios = cfg.route_flop_ratios()
    # 8 users, history lengths 1..8; the short half on route 0, the long on 7
    routes = torch.tensor([0, 0, 0, 0, 7, 7, 7, 5])
    rep = T.route_report(cfg, routes, torch.arange(1, 9))
    assert rep["routes_used"] == 3 and rep["largest_share"] == 0.5
    assert rep["route_counts"][0] == 4 and rep["route_counts"][7] == 3
    by_q = rep["flop_ratio_by_length_quartile"]["mean"]
    assert by_q[0] == by_q[1] == ratios[0]
    assert by_q[2] == ratios[7] and by_q[3] == (ratios[7] + ratios[5]) / 2
    # most users with one length (Beauty-like): still four groups of two
    tied = T.route_report(cfg, routes, torch.tensor([5, 5, 5, 5, 5, 5, 9, 9]))
    by_q = tied["flop_ratio_by_length_quartile"]["mean"]
    assert None not in by_q and by_q[0] == ratios[0] and by_q[3] == (ratios[7] + ratios[5]) / 2
    # a one-route model measured against the bigger space's max route
    small = CANetConfig(n_items=50, max_len=8, emb_widths=(8,), hidden_widths=(8,),
                        depths=(1,), num_heads=2)
    assert T.route_report(small, torch.zeros(3, dtype=torch.long),
                          torch.ones(3))["flop_ratio"] == 1.0
    own = T.route_report(small, torch.zeros(3, dtype=torch.long), torch.ones(3), cfg)
    assert own["flop_ratio"] == ratios[0] < 1


def test_train_device_names_the_argument(monkeypatch):
    import pytest
    with pytest.raises(ValueError, match="device must be"):
        T.train_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device"):
        T.train_device("cuda")
    assert T.train_device("cpu") == torch.device("cpu")


def test_epoch_log_shows_routes_and_warns_on_collapse(monkeypatch):
    """Every evaluated epoch logs the route distribution, keeps it in the
    history, and warns naming the route when one takes > 90% of users."""
    import pytest

    from canet_kernels import data as D
    split = D.leave_one_out(D.synthetic(60, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, max_len=8, emb_widths=(8,),
                      hidden_widths=(8, 16), depths=(1,), num_heads=2, router_width=8,
                      router_heads=2, router_ffn=16)
    report_on_valid(monkeypatch, split, "route_counts", [[30, 30], [1, 59]])
    logs = []
    tcfg = T.TrainConfig(epochs=2, batch_size=32, progress=False)
    with pytest.warns(T.RouteCollapseWarning, match=r"route 1 \(emb 8, hidden 16, depth 1\) "
                      r"takes 98% of the validation users at epoch 2"):
        _, res = T.train(cfg, tcfg, split, log=logs.append)
    assert "routes used 2, largest 50%" in logs[0]
    assert "largest 98% (route 1: emb 8, hidden 16, depth 1)" in logs[1]
