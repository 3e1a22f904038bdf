"""Rungs: the router's routes consolidated into a few fixed routes
(CANetConfig.rungs, TrainConfig.rung_epoch). The groups, cut points and
votes are checked against values computed here by hand (numpy), not by
the code under test."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from canet_kernels import data as D
from canet_kernels import train as T
from canet_kernels.model import CANet, CANetConfig
from canet_kernels.serving import Recommender, ServingGraph

from helpers import one_thread, report_on_valid  # noqa: E402,F401  (autouse fixture)

TINY = dict(max_len=8, emb_widths=(8,), hidden_widths=(8, 16), depths=(1, 2), num_heads=2,
            router_width=8, router_heads=2, router_ffn=16)


def tiny(rungs=2, n_items=40, **kw):
    return CANet(CANetConfig(n_items=n_items, rungs=rungs, **dict(TINY, **kw))).eval()


def expected_ratio(logits, ratios):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p @ np.asarray(ratios)


def test_set_rungs_cuts_at_the_quantiles_and_takes_each_groups_vote():
    m = tiny(rungs=2, flop_target=None)       # plain votes (the target: below)
    ratios = m.cfg.route_flop_ratios()       # 4 routes, cheapest first
    assert sorted(ratios) == ratios
    # users 0-5 lean cheap (argmax routes 1, 1, 1, 0, 0, 1), users 6-9 costly
    # (argmax 3, 3, 2, 3); rows are distinct so the cut splits them 5 / 5 by score
    lg = np.full((10, 4), -4.0)
    best = [1, 1, 1, 0, 0, 1, 3, 3, 2, 3]
    for u, r in enumerate(best):
        lg[u, r] = 4.0 + 0.01 * u
    lg[:6, 0] += 1.0                          # the cheap users' scores stay low
    score = expected_ratio(lg, ratios)
    cut = np.quantile(score, 0.5)             # numpy's linear interpolation = torch's
    group = score > cut
    want = [np.bincount(np.array(best)[group == g], minlength=4).argmax() for g in (0, 1)]
    got = m.set_rungs(torch.tensor(lg))
    assert got == want == [1, 3]
    assert m.has_rungs
    assert torch.allclose(m.rung_cuts, torch.tensor([cut], dtype=torch.float64))
    picked = m.pick(torch.tensor(lg)).tolist()
    assert picked == [want[int(g)] for g in group]
    # the cost bias no longer moves the routes
    assert m.pick(torch.tensor(lg), cost_bias=100.0).tolist() == picked


@pytest.mark.parametrize("target,want,nested", [(0.7, [0, 3], [0, 3]),
                                                (0.45, [0, 2], [1, 2]),
                                                (0.3, [0, 1], [1, 1]),
                                                (0.15, [0, 0], [0, 0])])
def test_votes_keep_the_flop_target(target, want, nested):
    """A group's most common route can cost more than its users' mean, so
    votes alone overshoot the target. Values by hand: route FLOP ratios
    0.142, 0.269, 0.516, 1.0; group 0 votes 6 / 4 for routes 0 / 1, group 1
    5 / 3 / 2 for routes 3 / 2 / 1; the modes [0, 3] cost 0.571.
    Without the routes' shapes the rungs take the most votes within the
    target: at 0.45, [0, 2] (9 votes, mean 0.329): route 2 is the best for
    group 1 at no price (0.3 - 0.516 p < max(0.5 - p, 0.2 - 0.269 p)), so
    the Lagrangian alone stops at [0, 1] (8 votes) and the greedy fill must
    find it. With them (set_rungs), the routes that hold the most users'
    routes: routes (emb, hidden, depth) (8, 8, 1), (8, 8, 2), (8, 16, 1),
    (8, 16, 2); route 0 nests in all, 1 and 2 in 3, so group 0's routes
    hold 0.6 / 1.0 / 0.6 / 1.0 of its users and group 1's 0 / 0.2 / 0.3 /
    1.0: at 0.45, [1, 2] (1.3, mean 0.392); at 0.3, [1, 1] (1.2)."""
    from canet_kernels.model.encoder import rung_votes, route_nesting
    m = tiny(flop_target=target)
    ratios = np.array(m.cfg.route_flop_ratios())
    assert np.allclose(ratios, [0.1423, 0.2687, 0.5158, 1.0], atol=1e-4)
    assert m.cfg.routes() == [(8, 8, 1), (8, 8, 2), (8, 16, 1), (8, 16, 2)]
    picked = torch.tensor([0] * 6 + [1] * 4 + [3] * 5 + [2] * 3 + [1] * 2)
    group = torch.tensor([0] * 10 + [1] * 10)
    got = rung_votes(picked, group, 2, m.route_ratio, target).tolist()
    assert got == want
    assert (ratios[got[0]] + ratios[got[1]]) / 2 <= target
    assert rung_votes(picked, group, 2).tolist() == [0, 3]     # no target: the modes
    nests = route_nesting(m.cfg.routes())
    assert nests.int().tolist() == [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert rung_votes(picked, group, 2, m.route_ratio, target, nests).tolist() == nested
    held = [[0.6, 1.0, 0.6, 1.0], [0.0, 0.2, 0.3, 1.0]]
    if (ratios[0] + ratios[3]) / 2 <= target:
        assert nested == [0, 3]                               # the modes fit: kept
    else:
        best = max((c for c in itertools.product(range(4), repeat=2)
                    if (ratios[c[0]] + ratios[c[1]]) / 2 <= target),
                   key=lambda c: held[0][c[0]] + held[1][c[1]])
        assert list(best) == nested
    # through set_rungs (logits whose argmax is `picked`): the shapes are used
    lg = torch.full((20, 4), -5.0)
    lg[torch.arange(20), picked] = 5.0
    lg[:10, 0] += 1.0                                         # group 0 scores low
    assert m.set_rungs(lg) == nested


def test_choose_under_target_against_brute_force():
    """Random small cases: the routes meet the target, beat or equal the
    Lagrangian alone, and come within a few percent of the best feasible
    choice found by brute force (greedy is not exact)."""
    from canet_kernels.model.encoder import choose_under_target, fill_budget
    g = torch.Generator().manual_seed(0)
    ratio = torch.tensor([0.1, 0.2, 0.35, 0.5, 0.8, 1.0], dtype=torch.float64)
    short = []
    for _ in range(200):
        K = int(torch.randint(2, 4, (1,), generator=g))
        metric = torch.rand(K, 6, generator=g, dtype=torch.float64)
        n = torch.randint(1, 20, (K,), generator=g).double()
        target = float(torch.empty(1, dtype=torch.float64).uniform_(0.1, 1.0, generator=g))
        got = choose_under_target(metric, n, ratio, target)
        assert float((n * ratio[got]).sum() / n.sum()) <= target + 1e-12
        total = float((n * metric.gather(1, got[:, None]).squeeze(1)).sum())
        best = max(float(sum(n[k] * metric[k, c[k]] for k in range(K)))
                   for c in itertools.product(range(6), repeat=K)
                   if float(sum(n[k] * ratio[c[k]] for k in range(K)) / n.sum()) <= target)
        short.append(1 - total / best)
    assert max(short) < 0.15 and sum(short) / len(short) < 0.01, (max(short), sum(short))
    # the fill never leaves the target and never lowers the metric
    pick = torch.tensor([0, 0])
    out = fill_budget(torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64),
                      torch.tensor([1.0, 1.0], dtype=torch.float64),
                      torch.tensor([0.1, 0.5], dtype=torch.float64), 0.3, pick)
    assert out.tolist() == [0, 1] and pick.tolist() == [0, 0]


def test_set_rungs_with_tied_scores_fills_empty_groups():
    m = tiny(rungs=3, flop_target=None)
    lg = torch.zeros(6, 4)
    lg[:, 2] = 1.0                            # every user alike: one score
    assert m.set_rungs(lg) == [2, 2, 2]
    assert m.pick(lg).tolist() == [2] * 6


def test_rungs_errors_name_the_argument():
    with pytest.raises(ValueError, match="rungs must be an int >= 0"):
        CANetConfig(n_items=5, rungs=-1, **TINY)
    with pytest.raises(ValueError, match="built with rungs=0"):
        tiny(rungs=0).set_rungs(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"logits must be \[N > 0, 4\]"):
        tiny().set_rungs(torch.zeros(3, 5))
    split = D.leave_one_out(D.synthetic(40, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    with pytest.raises(ValueError, match="rung_epoch must be after the warm-up"):
        T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=4, progress=False), split,
                log=lambda *_: None)
    with pytest.raises(ValueError, match="rung_epoch"):
        T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=2, warmup_epochs=2, progress=False),
                split, log=lambda *_: None)


def test_consolidated_routes_train_the_supernet_only():
    """After set_rungs the loss is the CE alone and the router gets no gradient."""
    torch.manual_seed(0)
    m = tiny().train()
    items = torch.randint(1, 41, (6, 8))
    lengths = torch.tensor([8, 3, 5, 1, 8, 2])
    targets = torch.randint(1, 41, (6, 8))
    _, st = m.loss(items, lengths, targets)
    assert "guide" in st                      # a free router has its losses
    m.set_rungs(torch.randn(6, 4))
    m.zero_grad()
    loss, st = m.loss(items, lengths, targets)
    loss.backward()
    assert "guide" not in st and st["loss"] == st["ce"]
    assert all(p.grad is None for p in m.router.parameters())
    assert any(p.grad is not None for p in m.net.parameters())


def test_training_consolidates_at_rung_epoch_and_serves_the_rungs(monkeypatch, tmp_path):
    split = D.leave_one_out(D.synthetic(80, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    real = T.consolidate
    seen = {}

    def spy(model, *a, **kw):
        out = real(model, *a, **kw)
        seen["router"] = {k: v.clone() for k, v in model.router.state_dict().items()}
        return out

    monkeypatch.setattr(T, "consolidate", spy)
    # validation scores that peak before the rungs: the selection must still
    # take an epoch on the rungs (those are the routes served)
    report_on_valid(monkeypatch, split, "ndcg@10", [0.9, 0.1, 0.2, 0.15])
    logs = []
    tcfg = T.TrainConfig(epochs=4, rung_epoch=2, batch_size=32, progress=False)
    model, res = T.train(cfg, tcfg, split, str(tmp_path), log=logs.append)
    assert "rungs" not in logs[0] and "| rungs " in logs[1] and "rungs" not in logs[2]
    assert res["best_epoch"] == 3                   # selected on the rungs only
    rungs = model.rung_routes.tolist()
    counts = res["test"]["route_counts"]
    assert sum(counts[r] for r in set(rungs)) == sum(counts) == len(split.test)
    for k, v in model.router.state_dict().items():  # frozen since consolidation
        assert torch.equal(v, seen["router"][k]), k
    # the checkpoint keeps the rungs; serving routes by them
    loaded, _ = T.load_model(str(tmp_path))
    assert loaded.has_rungs and loaded.rung_routes.tolist() == rungs
    assert torch.equal(loaded.rung_cuts, model.rung_cuts)
    rec = Recommender.load(str(tmp_path))
    hist = [int(i) for i in split.test.items[0, :int(split.test.lengths[0])]]
    with torch.no_grad():
        want = int(loaded.rung_pick(loaded.router(torch.tensor([hist]),
                                                  torch.tensor([len(hist)])))[0])
    assert rec.route(hist) == want and want in rungs
    assert rec.recommend(hist, k=5).route == want
    # the exported graph takes the same branch
    g = ServingGraph(loaded, k=5)
    with torch.no_grad():
        out = g(torch.tensor(hist), torch.tensor(hist), torch.tensor([-1]))
    assert int(out[2][0]) == want


def test_serving_paths_route_by_the_rungs():
    """Recommender and the exported graph use the rung, not the router's
    own argmax (a rung route set apart from it on purpose)."""
    torch.manual_seed(1)
    m = tiny()
    hist = [3, 7, 1, 9, 4]
    items, n = torch.tensor([hist]), torch.tensor([len(hist)])
    with torch.no_grad():
        free = int(m.router(items, n).argmax(-1)[0])
    m.set_rungs(torch.randn(5, 4))
    m.rung_routes.fill_((free + 1) % 4)
    want = (free + 1) % 4
    rec = Recommender(m)
    assert rec.route(hist) == want
    assert rec.recommend(hist, k=3).route == want
    assert [r.route for r in rec.recommend([hist, hist[:2]], k=3)] == [want, want]
    with torch.no_grad():
        out = ServingGraph(m, k=3)(torch.tensor(hist), torch.tensor(hist), torch.tensor([-1]))
    assert int(out[2][0]) == want


@pytest.mark.parametrize("target", [None, 0.45, 0.7])
def test_probe_rungs_takes_the_best_routes_under_the_target(monkeypatch, target):
    """Group 0 (cheap users) scores the same on every route, except noise on
    the costliest; group 1 gains with compute, concavely. The probe must
    keep group 0 on the cheapest route and give group 1 the best route that
    the target leaves room for, checked by brute force over all pairs."""
    m = tiny(flop_target=target)
    ratios = np.array(m.cfg.route_flop_ratios())
    lg = torch.zeros(10, 4)
    lg[:5, 0], lg[5:, 3] = 3.0, 3.0          # users 0-4 cheap, 5-9 costly
    per_route = {r: [0.9] * 5 + [float(np.sqrt(ratios[r]))] * 5 for r in range(4)}
    per_route[3][:5] = [0.9 + 1e-4] * 5       # noise on the costliest route

    def fake(model, es, *a, route=None, per_user=False, **kw):
        return {"per_user": {"ndcg@10": per_route[route]}}

    monkeypatch.setattr(T, "evaluate", fake)
    got = T.probe_rungs(m, None, lg, T.TrainConfig()).tolist()
    best, want = None, None
    for a in range(4):
        for b in range(4):
            cost = (ratios[a] + ratios[b]) / 2
            if target is not None and cost > target:
                continue
            total = np.mean(per_route[a][:5]) + np.mean(per_route[b][5:])
            key = (round(total, 6), -cost)
            if best is None or key > best:
                best, want = key, [a, b]
    if target is None:   # no budget: the max route for group 1; the noise is not bought
        want = [0, 3]
    assert got == want and got[0] == 0
    m.set_rungs(lg, got)
    assert m.pick(lg).tolist() == [got[0]] * 5 + [got[1]] * 5


def test_probe_split_chooses_on_one_half_and_selects_on_the_other(monkeypatch):
    """rung_probe_split: the probe reads only one half of the validation
    users, the epochs on the rungs are selected on the other half, the
    halves partition the users; so the rungs do not move when the other
    half's targets change, and the reported validation metric is that of
    the selected weights on the other half."""
    split = D.leave_one_out(D.synthetic(120, 40, seed=3), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    tcfg = T.TrainConfig(epochs=3, rung_epoch=2, batch_size=16, rung_choice="probe",
                         rung_probe_split=True, progress=False)
    real = T.evaluate
    calls = []

    def spy(model, es, *a, route=None, **kw):
        calls.append((route, es.users.tolist()))
        return real(model, es, *a, route=route, **kw)

    monkeypatch.setattr(T, "evaluate", spy)
    model, res = T.train(cfg, tcfg, split, log=lambda *_: None)
    everyone = split.valid.users.tolist()
    probe = {tuple(u) for r, u in calls if isinstance(r, int)}
    assert len(probe) == 1 and len(calls) == 3 + cfg.num_routes + 1  # 3 epochs, probe, test
    probe = list(probe.pop())
    chosen = [u for r, u in calls[:-1] if r is None]                # the last: test
    assert chosen[0] == everyone                                     # before the rungs
    assert chosen[1] == chosen[2] and len(chosen[1]) == len(everyone) - len(everyone) // 2
    assert len(probe) == len(everyone) // 2
    assert sorted(probe + chosen[1]) == sorted(everyone)            # a partition
    assert probe != everyone[:len(probe)]                            # drawn, not the first half
    other = split.valid.subset([everyone.index(u) for u in chosen[1]])
    assert res["valid"]["users"] == len(other)
    assert res["valid"]["ndcg@10"] == pytest.approx(real(model, other)["ndcg@10"], abs=1e-12)
    # the other half's targets do not reach the probe; its own half's do
    # (here: without the split, moving the other half's moves the rungs too)
    monkeypatch.setattr(T, "evaluate", real)
    for half, same in ((chosen[1], True), (probe, False)):
        moved = D.leave_one_out(D.synthetic(120, 40, seed=3), max_len=8)
        idx = torch.tensor([everyone.index(u) for u in half])
        moved.valid.targets[idx] = moved.valid.targets[idx].roll(1)
        again, _ = T.train(cfg, tcfg, moved, log=lambda *_: None)
        assert torch.equal(again.rung_routes, model.rung_routes) == same
    with pytest.raises(ValueError, match="rung_probe_split needs rung_choice 'probe'"):
        T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=2, rung_probe_split=True,
                                   progress=False), split, log=lambda *_: None)


def test_no_stop_before_the_rungs(monkeypatch):
    """Patience waits for the rungs, and a spent time budget consolidates
    at once: a run never ends on the free router it was told to replace."""
    split = D.leave_one_out(D.synthetic(60, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    report_on_valid(monkeypatch, split, "ndcg@10", (1.0 / i for i in itertools.count(1)))
    model, res = T.train(cfg, T.TrainConfig(epochs=6, rung_epoch=3, patience=1,
                                            batch_size=32, progress=False),
                         split, log=lambda *_: None)
    assert model.has_rungs and res["best_epoch"] == 3 and res["epochs_run"] == 4
    model, res = T.train(cfg, T.TrainConfig(epochs=6, rung_epoch=5, max_train_seconds=0.0,
                                            batch_size=32, progress=False),
                         split, log=lambda *_: None)
    assert model.has_rungs and res["epochs_run"] == 1 and res["best_epoch"] == 1


def exported(g, hist):
    """torch.export of a ServingGraph `g`, the history and seen lengths
    dynamic, traced on `hist`."""
    args = (torch.tensor(hist), torch.tensor(hist), torch.tensor([-1]))
    dims = ({0: torch.export.Dim("T", min=1, max=g.model.cfg.max_len)},
            {0: torch.export.Dim("S", min=1, max=64)}, None)
    return torch.export.export(g, args, dynamic_shapes=dims, strict=False).module()


def test_exported_graph_routes_by_the_rungs():
    """torch.export of the serving graph (what export_package compiles)
    keeps the rung branch: routes and top-k of the exported program are
    the eager graph's, on a rung set apart from the router's argmax."""
    torch.manual_seed(1)
    m = tiny()
    m.set_rungs(torch.randn(5, 4))
    hists = [[3, 7, 1, 9, 4], [2], [5, 5, 6, 1, 2, 3, 4, 8]]
    with torch.no_grad():
        free = {int(m.router(torch.tensor([h]), torch.tensor([len(h)])).argmax(-1)[0])
                for h in hists}
    m.rung_routes.fill_(next(r for r in range(4) if r not in free))
    g = ServingGraph(m, k=3, variant="ops")
    ep = exported(g, hists[0])
    with torch.no_grad():
        for h in hists:
            a = (torch.tensor(h), torch.tensor(h), torch.tensor([-1]))
            got, want = ep(*a), g(*a)
            assert int(got[2][0]) == int(want[2][0]) == int(m.rung_routes[0])
            assert torch.equal(got[0], want[0])


def test_lift_rungs_moves_a_share_up_uniformly():
    from canet_kernels.model.encoder import lift_rungs
    # by hand, k = 3, share 0.25: (group, u0, u1) -> rung
    cases = [(0, 0.1, 0.3, 1), (0, 0.1, 0.7, 2), (0, 0.3, 0.1, 0), (1, 0.1, 0.99, 2),
             (1, 0.5, 0.0, 1), (2, 0.0, 0.5, 2), (2, 0.24, 0.99, 2)]
    g = torch.tensor([c[0] for c in cases])
    u = torch.tensor([[c[1], c[2]] for c in cases])
    assert lift_rungs(g, u, 0.25, 3).tolist() == [c[3] for c in cases]
    # in law: a share of each lower rung moves, uniformly over the rungs above
    n, k, share = 40000, 4, 0.3
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(0, k, (n,), generator=gen)
    out = lift_rungs(g, torch.rand(n, 2, generator=gen), share, k)
    assert bool((out >= g).all()) and bool((out[g == k - 1] == k - 1).all())
    for r in range(k - 1):
        moved = out[g == r]
        assert abs(float((moved != r).float().mean()) - share) < 0.02
        counts = torch.bincount(moved[moved != r] - r - 1, minlength=k - 1 - r).double()
        assert float(counts.min() / counts.max()) > 0.9, (r, counts)
    assert torch.equal(lift_rungs(g, torch.rand(n, 2, generator=gen), 0.0, k), g)


@pytest.mark.parametrize("lift", [0.0, 0.5])
def test_training_on_the_rungs_lifts_a_share_of_the_users(monkeypatch, lift):
    """With rung_lift, a share of the cheap rung's rows trains on the costly
    rung; without it every row trains on its own rung; the top rung's rows
    never move."""
    split = D.leave_one_out(D.synthetic(120, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    monkeypatch.setattr(T, "probe_rungs", lambda *a, **kw: torch.tensor([0, 3]))
    seen = []
    real = CANet.loss

    def spy(self, items, lengths, targets, routes=None, **kw):
        if self.has_rungs:
            r = routes if routes is not None else self.route(items, lengths).routes
            assert self.training
            seen.append((items.clone(), lengths.clone(), r.clone()))
        return real(self, items, lengths, targets, routes=routes, **kw)

    monkeypatch.setattr(CANet, "loss", spy)
    model, _ = T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=1, batch_size=16,
                                          rung_choice="probe", rung_lift=lift,
                                          progress=False), split, log=lambda *_: None)
    own, got = [], []
    with torch.no_grad():
        for items, lengths, routes in seen:
            own.append(model.rung_pick(model.router(items, lengths)))
            got.append(routes)
    own, got = torch.cat(own), torch.cat(got)
    assert len(got) == 2 * len(split.train) and bool((own == 0).any())
    assert bool((got[own == 3] == 3).all())
    up = float((got[own == 0] == 3).float().mean())
    assert bool(((got == 0) | (got == 3)).all())
    if lift == 0:
        assert up == 0.0
    else:
        assert 0.3 < up < 0.7, up


# ------------------------------------------------ rung_signal = "length" --

def test_length_rungs_cut_at_the_length_quantiles():
    """The groups are quantiles of the history length, not of the router:
    cut points, votes and picks checked by hand (numpy), and the logits no
    longer move a user's rung."""
    m = tiny(rungs=3, rung_signal="length")
    L = np.array([1, 2, 2, 3, 5, 6, 7, 8, 8])
    rng = np.random.default_rng(0)
    lg = rng.normal(size=(9, 4))
    cuts = np.quantile(L.astype(float), [1 / 3, 2 / 3])
    group = np.searchsorted(cuts, L, side="right")      # a length on a cut goes up
    picked = lg.argmax(1)
    want = [np.bincount(picked[group == g], minlength=4).argmax() for g in range(3)]
    assert m.set_rungs(torch.tensor(lg), lengths=torch.tensor(L)) == want
    assert np.allclose(m.rung_cuts.numpy(), cuts)
    assert m.set_rungs(torch.tensor(lg), [0, 1, 3], lengths=torch.tensor(L)) == [0, 1, 3]
    by_len = [[0, 1, 3][g] for g in group]
    assert m.pick(torch.tensor(lg), lengths=torch.tensor(L)).tolist() == by_len
    other = torch.tensor(rng.normal(size=(9, 4)) * 10)
    assert m.pick(other, lengths=torch.tensor(L)).tolist() == by_len
    with pytest.raises(ValueError, match="lengths"):
        m.pick(torch.tensor(lg))
    with pytest.raises(ValueError, match=r"lengths must be \[9\]"):
        m.set_rungs(torch.tensor(lg), lengths=torch.tensor(L[:4]))
    with pytest.raises(ValueError, match="lengths are needed"):
        m.set_rungs(torch.tensor(lg))
    # a refused consolidation leaves the rungs as they were
    assert m.has_rungs and m.pick(other, lengths=torch.tensor(L)).tolist() == by_len
    with pytest.raises(ValueError, match="rung_signal"):
        CANetConfig(n_items=5, rungs=2, rung_signal="loss", **TINY)


def test_length_rungs_route_training_and_every_serving_path():
    """Once cut by length, training rows, Recommender (one user and a
    batch), the serving graph and its torch.export all route by the
    length's rung, whatever the router says."""
    torch.manual_seed(2)
    m = tiny(rungs=2, rung_signal="length")
    m.set_rungs(torch.randn(4, 4), [3, 0], lengths=torch.tensor([1, 2, 6, 8]))
    cut = float(m.rung_cuts[0])                          # 4.0: lengths >= 4 go to route 0
    hists = [[3, 7, 1, 9, 4], [2], [5, 5, 6, 1, 2, 3, 4, 8], [6, 2, 9]]
    want = [0 if len(h) >= cut else 3 for h in hists]
    assert want == [0, 3, 0, 3]
    items, n = D.pad_right(hists, 8)
    m.train()
    for p in m.router.parameters():                      # the router is not read
        p.data.normal_()
    assert m.route(items, n).routes.tolist() == want
    assert m.lifted_rungs(items, n, torch.ones(4, 2) * 0.9, 0.25).tolist() == want
    m.eval()
    rec = Recommender(m)
    assert [rec.route(h) for h in hists] == want == rec.route(hists)
    assert [r.route for r in rec.recommend(hists, k=3)] == want
    assert [rec.recommend(h, k=3).route for h in hists] == want
    g = ServingGraph(m, k=3, variant="ops")
    ep = exported(g, hists[0])
    with torch.no_grad():
        for h, w in zip(hists, want):
            a = (torch.tensor(h), torch.tensor(h), torch.tensor([-1]))
            assert int(g(*a)[2][0]) == int(ep(*a)[2][0]) == w


def test_training_cuts_the_rungs_on_the_validation_lengths(monkeypatch):
    """canet train with rung_signal "length": the cut points are the
    validation users' length quantiles, the probe groups users by them, and
    every test user is served on its length's rung."""
    split = D.leave_one_out(D.synthetic(120, 40, seed=3), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, rung_signal="length", **TINY)
    groups = []
    real = T.rung_groups

    def spy(score, k, cuts=None):
        groups.append(score.clone())
        return real(score, k, cuts)

    monkeypatch.setattr(T, "rung_groups", spy)
    model, res = T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=1, batch_size=16,
                                            rung_choice="probe", progress=False),
                         split, log=lambda *_: None)
    vl = split.valid.lengths.double()
    assert torch.equal(groups[0], vl)                     # the probe's groups
    assert torch.allclose(model.rung_cuts, torch.quantile(vl, torch.tensor([0.5]).double()))
    g = (split.test.lengths.double() >= model.rung_cuts[0]).long()
    want = torch.bincount(model.rung_routes[g], minlength=cfg.num_routes).tolist()
    assert res["test"]["route_counts"] == want


# -------------------------------- rung_cut = "served", rung_order = "rising" --

def test_length_cuts_give_tied_lengths_their_own_group():
    """Beauty-like lengths, a third of the users on the shortest: the
    quantile cut (rung_groups) leaves group 0 empty, length_cuts starts a
    group at each length whose share below is nearest 1/4, 2/4, 3/4
    (worked out by hand below)."""
    from canet_kernels.model.encoder import length_cuts, rung_groups
    L = torch.tensor([4] * 32 + [5] * 19 + [6] * 12 + [7] * 8 + [8] * 6 + [9] * 23)
    # shares below 5, 6, 7, 8, 9: 0.32, 0.51, 0.63, 0.71, 0.77
    assert length_cuts(L, 4).tolist() == [5.0, 6.0, 9.0]
    g = torch.bucketize(L.double(), length_cuts(L, 4), right=True)
    assert torch.bincount(g, minlength=4).tolist() == [32, 19, 26, 23]
    assert torch.bincount(rung_groups(L.double(), 4)[1], minlength=4)[0] == 0
    # each cut leaves a length for the cuts after it
    assert length_cuts(torch.tensor([1] * 90 + [2, 3, 4] * 3 + [5]), 4).tolist() == \
        [2.0, 3.0, 4.0]
    # fewer lengths than groups: the cuts repeat, the groups between are empty
    assert length_cuts(torch.tensor([3, 3, 7, 7]), 4).tolist() == [7.0, 7.0, 7.0]
    # two lengths equally near 1/2 (shares below 0.4 and 0.6): the lower cut
    assert length_cuts(torch.tensor([1, 1, 2, 3, 3]), 2).tolist() == [2.0]


def test_rising_routes_against_brute_force():
    """Random cases, routes listed out of cost order and with a tie: the
    routes' ratios rise strictly by group and no rising choice (all listed
    by itertools) has a higher total; under a target, the choice meets it
    and stays rising."""
    from canet_kernels.model.encoder import choose_under_target, rising_routes
    g = torch.Generator().manual_seed(1)
    ratio = torch.tensor([0.35, 0.1, 0.5, 0.2, 0.5, 1.0], dtype=torch.float64)

    def rising(c):
        return all(ratio[c[i]] < ratio[c[i + 1]] for i in range(len(c) - 1))

    short = []
    for _ in range(200):
        K = int(torch.randint(1, 5, (1,), generator=g))
        metric = torch.rand(K, 6, generator=g, dtype=torch.float64)
        n = torch.randint(0, 20, (K,), generator=g).double()

        def total(c):
            return float(sum(n[k] * metric[k, c[k]] for k in range(K)))

        got = rising_routes(metric, n, ratio).tolist()
        assert rising(got)
        best = max(total(c) for c in itertools.product(range(6), repeat=K) if rising(c))
        assert total(got) == pytest.approx(best, abs=1e-9)
        target = float(torch.empty(1, dtype=torch.float64).uniform_(0.3, 1.0, generator=g))
        if n.sum() == 0:
            continue
        got = choose_under_target(metric, n, ratio, target, rising=True).tolist()
        cost = lambda c: float(sum(n[k] * ratio[c[k]] for k in range(K)) / n.sum())  # noqa: E731
        feasible = [total(c) for c in itertools.product(range(6), repeat=K)
                    if rising(c) and cost(c) <= target]
        assert rising(got)
        if feasible:
            assert cost(got) <= target + 1e-12
            short.append(1 - total(got) / max(max(feasible), 1e-12))
    assert max(short) < 0.2 and sum(short) / len(short) < 0.02, (max(short), sum(short))
    with pytest.raises(ValueError, match="4 groups need 4 routes of distinct FLOP ratios"):
        rising_routes(torch.zeros(4, 3), torch.ones(4), torch.tensor([0.1, 0.5, 0.5]))


def test_probe_with_rising_order_gives_costlier_groups_costlier_routes(monkeypatch):
    """Group 0 gains from compute, group 1 does not: free, the probe gives
    group 0 the costlier route; rising, the best pair of rising ratios,
    found here by listing all pairs."""
    m = tiny(flop_target=None)
    ratios = np.array(m.cfg.route_flop_ratios())
    lg = torch.zeros(10, 4)
    lg[:5, 0], lg[5:, 3] = 3.0, 3.0          # users 0-4 group 0, 5-9 group 1
    per_route = {r: [float(np.sqrt(ratios[r]))] * 5 + [0.9 - 0.01 * r] * 5 for r in range(4)}

    def fake(model, es, *a, route=None, per_user=False, **kw):
        return {"per_user": {"ndcg@10": per_route[route]}}

    monkeypatch.setattr(T, "evaluate", fake)
    free = T.probe_rungs(m, None, lg, T.TrainConfig()).tolist()
    assert free == [3, 0]
    got = T.probe_rungs(m, None, lg, T.TrainConfig(rung_order="rising")).tolist()
    want = max(((a, b) for a in range(4) for b in range(4) if ratios[a] < ratios[b]),
               key=lambda c: (np.mean(per_route[c[0]][:5]) + np.mean(per_route[c[1]][5:]),
                              -ratios[c[0]] - ratios[c[1]]))
    assert got == list(want) and ratios[got[0]] < ratios[got[1]]
    # two distinct routes cannot meet a target at the cheapest route's ratio: said
    tight = tiny(flop_target=float(ratios.min()) + 1e-6)
    with pytest.warns(UserWarning, match="cheapest rising routes cost"):
        got = T.probe_rungs(tight, None, lg, T.TrainConfig(rung_order="rising")).tolist()
    assert got == list(np.argsort(ratios, kind="stable")[:2])


def test_training_cuts_on_the_served_lengths_with_rising_routes(monkeypatch):
    """canet train with rung_cut "served" and rung_order "rising": the cut
    points are set on the validation lengths plus one (capped at max_len),
    the probe groups the validation users by them, the rungs' FLOP ratios
    rise, and every test user is served on its length's rung."""
    from canet_kernels.model.encoder import length_cuts
    split = D.leave_one_out(D.synthetic(120, 40, seed=3), max_len=20)
    cfg = CANetConfig(n_items=split.n_items, rungs=3, rung_signal="length",
                      **dict(TINY, max_len=20))
    served = (split.valid.lengths + 1).clamp_max(20)
    cuts = length_cuts(served, 3)
    assert not torch.equal(cuts, length_cuts(split.valid.lengths, 3))   # the case tells them apart
    probed = []
    real = T.choose_under_target

    def spy(metric, n, *a, **kw):
        probed.append((n.clone(), kw.get("rising")))
        return real(metric, n, *a, **kw)

    monkeypatch.setattr(T, "choose_under_target", spy)
    model, res = T.train(cfg, T.TrainConfig(epochs=3, rung_epoch=1, batch_size=16,
                                            rung_choice="probe", rung_cut="served",
                                            rung_order="rising", progress=False),
                         split, log=lambda *_: None)
    assert torch.equal(model.rung_cuts, cuts)
    vg = torch.bucketize(split.valid.lengths.double(), cuts, right=True)
    assert probed[0][1] is True
    assert probed[0][0].tolist() == torch.bincount(vg, minlength=3).double().tolist()
    r = model.route_ratio[model.rung_routes]
    assert bool((r.diff() > 0).all()), model.rung_routes
    tg = torch.bucketize(split.test.lengths.double(), cuts, right=True)
    want = torch.bincount(model.rung_routes[tg], minlength=cfg.num_routes).tolist()
    assert res["test"]["route_counts"] == want


@pytest.mark.parametrize("signal", ["length", "router"])
def test_rungs_that_do_not_read_the_router_leave_it_untrained(monkeypatch, tmp_path, signal):
    """Length rungs chosen by the probe never read the router: every epoch up
    to the rung epoch trains the supernet on sandwich routes, is validated on
    the max route without calibrating the router, and the router keeps its
    initial weights. Rungs cut on the router's score train it after the
    warm-up and validate its routes."""
    split = D.leave_one_out(D.synthetic(120, 40, seed=3), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, rung_signal=signal, **TINY)
    given = []
    real = CANet.loss

    def spy(self, items, lengths, targets, routes=None, **kw):
        if not self.has_rungs:
            given.append(routes is not None)
        return real(self, items, lengths, targets, routes=routes, **kw)

    monkeypatch.setattr(CANet, "loss", spy)
    model, _ = T.train(cfg, T.TrainConfig(epochs=3, warmup_epochs=1, rung_epoch=2,
                                          batch_size=16, rung_choice="probe",
                                          progress=False), split, out_dir=str(tmp_path),
                             log=lambda *_: None)
    with open(tmp_path / "state.json") as f:
        first = json.load(f)["history"][0]             # epoch 1, before the rungs
    T.set_seed(0)                       # train() builds its model right after this
    init = CANet(cfg).router.state_dict()
    same = all(torch.equal(v, init[k]) for k, v in model.router.state_dict().items())
    assert len(given) == 2 * -(-len(split.train) // 16)    # the batches of epochs 1 and 2
    on_max = first["route_counts"][cfg.max_route] == len(split.valid)
    if signal == "length":
        assert all(given) and same
        assert on_max and first["valid"]["flop_ratio"] == 1.0 and "cost_bias" not in first
    else:
        half = len(given) // 2           # epoch 1 warms up, epoch 2 trains the router
        assert all(given[:half]) and not any(given[half:]) and not same
        assert not on_max and "cost_bias" in first


def test_rung_cut_and_order_errors_name_the_argument():
    split = D.leave_one_out(D.synthetic(40, 40, seed=0), max_len=8)
    cfg = CANetConfig(n_items=split.n_items, rungs=2, **TINY)
    length = CANetConfig(n_items=split.n_items, rungs=2, rung_signal="length", **TINY)
    cases = [(cfg, dict(rung_cut="served", rung_choice="probe"), "needs rung_signal 'length'"),
             (length, dict(rung_order="rising"), "needs rung_choice 'probe'"),
             (length, dict(rung_cut="test"), "rung_cut must be"),
             (length, dict(rung_order="up"), "rung_order must be"),
             (CANetConfig(n_items=split.n_items, rungs=5, **TINY),
              dict(rung_order="rising", rung_choice="probe"), "rungs=5 need as many routes")]
    for mcfg, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            T.train(mcfg, T.TrainConfig(epochs=3, rung_epoch=1, progress=False, **kw), split,
                    log=lambda *_: None)
    with pytest.raises(ValueError, match=r"cuts must be 1 ascending"):
        tiny(rungs=2).set_rungs(torch.zeros(3, 4), cuts=[0.5, 0.7])
