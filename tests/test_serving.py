"""The serving API (canet_kernels.serving.Recommender): same top-k as the
model's own batched path for every route, batch = singles, seen-item
exclusion, input errors, thread safety, checkpoint loading and the
`canet recommend` command on top of it."""
from __future__ import annotations

import json

import pytest
import torch

from canet_kernels import cli
from canet_kernels.model import CANet, CANetConfig
from canet_kernels.serving import Recommendation, Recommender
from canet_kernels.train import TrainConfig, save_weights, write_config

from helpers import one_thread, run_threads  # noqa: F401  (autouse fixture)

N_ITEMS = 60


def tiny_model(seed=0, n_items=N_ITEMS, max_len=12, **kw):
    torch.manual_seed(seed)
    cfg = CANetConfig(n_items=n_items, max_len=max_len, emb_widths=(8, 16),
                      hidden_widths=(8, 16), depths=(1, 2), num_heads=2, **kw)
    m = CANet(cfg).eval()
    with torch.no_grad():  # make every layer and the router matter
        for layer in m.net.layers:
            layer.res_scale.fill_(1.0)
        m.router.head.weight.mul_(50)
    return m


def histories(n=12, seed=1, n_items=N_ITEMS):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 20, (n,), generator=g).tolist()
    return [torch.randint(1, n_items + 1, (k,), generator=g).tolist() for k in lens]


def close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def rec(model):
    return Recommender(model)


def test_one_user_matches_the_model_on_every_route(model, rec):
    cfg = model.cfg
    for h in histories(6):
        x = h[-cfg.max_len:]
        items = torch.tensor([x])
        for r in range(cfg.num_routes):
            got = rec.recommend(h, k=7, exclude_seen=False, route=r)
            top, scores, _ = model.recommend(items, torch.tensor([len(x)]), 7,
                                             routes=torch.tensor([r]))
            assert got.items == top[0].tolist()
            assert close(got.scores, scores[0].tolist())
            e, d, depth = cfg.routes()[r]
            assert (got.route, got.emb, got.hidden, got.depth) == (r, e, d, depth)
            assert got.flop_ratio == pytest.approx(cfg.route_flop_ratios()[r])


def test_router_choice_matches_the_model(model, rec):
    hs = histories(12)
    routes = [rec.recommend(h, k=3).route for h in hs]
    for h, r in zip(hs, routes):
        x = torch.tensor([h[-model.cfg.max_len:]])
        assert r == int(model.route(x, torch.tensor([x.shape[1]])).routes[0])
        assert rec.route(h) == r
    assert len(set(routes)) > 1, "the test model should use several routes"
    assert rec.route(hs) == routes


def test_batch_equals_singles(rec):
    hs = histories(9)
    batch = rec.recommend(hs, k=6)
    assert isinstance(batch, list) and len(batch) == len(hs)
    for h, b in zip(hs, batch):
        s = rec.recommend(h, k=6)
        assert isinstance(s, Recommendation)
        assert (b.items, b.route) == (s.items, s.route)
        assert close(b.scores, s.scores)
    forced = rec.recommend(hs[:3], k=4, route=[0, 3, 7])
    assert [f.route for f in forced] == [0, 3, 7]
    assert [f.items for f in forced] == [rec.recommend(h, k=4, route=r).items
                                         for h, r in zip(hs[:3], (0, 3, 7))]
    assert [f.route for f in rec.recommend(hs[:3], k=4, route=5)] == [5, 5, 5]
    # tensors work too
    t = rec.recommend(torch.tensor(hs[0]), k=6)
    assert t.items == rec.recommend(hs[0], k=6).items


def test_seen_items_are_excluded(rec):
    h = [5, 9, 9, 13, 40] * 4                       # longer than max_len (12)
    for got in (rec.recommend(h, k=20), rec.recommend([h, [1]], k=20)[0]):
        assert not set(h) & set(got.items) and 0 not in got.items
        assert len(got.items) == len(got.scores) == 20
        assert got.scores == sorted(got.scores, reverse=True)
    keep = rec.recommend(h, k=N_ITEMS, exclude_seen=False)
    assert set(h) <= set(keep.items) and len(keep.items) == N_ITEMS
    # the model reads the last max_len items only
    assert rec.recommend(h, k=8, exclude_seen=False).items == \
        rec.recommend(h[-12:], k=8, exclude_seen=False).items
    # a user who has seen all but 3 items gets those 3
    almost = list(range(1, N_ITEMS - 2))
    got = rec.recommend(almost, k=10)
    assert sorted(got.items) == [N_ITEMS - 2, N_ITEMS - 1, N_ITEMS]
    assert all(s > float("-inf") for s in got.scores)
    assert rec.recommend(list(range(1, N_ITEMS + 1)), k=5).items == []


@pytest.mark.parametrize("history, message", [
    ([], "history is empty"),
    ([3, 0, 4], r"history\[1\] = 0: item ids must be in 1..60"),
    ([3, 61], r"history\[1\] = 61: item ids must be in 1..60"),
    ([3, -2], r"history\[1\] = -2"),
    ([1.5, 2], r"history\[0\] = 1.5 is not an integer item id"),
    ([[1, 2], []], r"history\[1\] is empty"),
    ([[1, 2], [4, 99]], r"history\[1\]\[1\] = 99: item ids must be in 1..60"),
    ("1 2 3", "list of item ids"),
    (torch.tensor([1.0, 2.0]), "integer item ids"),
])
def test_bad_histories_are_rejected(rec, history, message):
    with pytest.raises(ValueError, match=message):
        rec.recommend(history)


def test_bad_arguments_are_rejected(rec):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        rec.recommend([1, 2], k=0)
    with pytest.raises(ValueError, match=r"route id in 0..7"):
        rec.recommend([1, 2], route=8)
    with pytest.raises(ValueError, match="2 route ids for 3 histories"):
        rec.recommend([[1], [2], [3]], route=[1, 2])


def test_threads_get_the_serial_results(rec):
    hs = histories(16, seed=3)
    want = [rec.recommend(h, k=5) for h in hs] + [rec.recommend(hs[:4], k=5)]
    got = {}

    def client(i):
        for rep in range(6):
            for j, h in enumerate(hs):
                if (j + i + rep) % 4 == 0:
                    got[(i, rep, j)] = rec.recommend(h, k=5)
            got[(i, rep, "batch")] = rec.recommend(hs[:4], k=5)

    assert not run_threads(4, client)
    for (i, rep, j), r in got.items():
        assert r == (want[-1] if j == "batch" else want[j])


def save_run(model, out_dir):
    write_config(str(out_dir), model.cfg, TrainConfig(), {})
    save_weights(str(out_dir / "best.safetensors"), model)
    return str(out_dir)


def test_load_and_the_recommend_command(model, rec, tmp_path, capsys):
    run = save_run(model, tmp_path / "run")
    loaded = Recommender.load(run)
    hs = histories(4)
    assert loaded.recommend(hs, k=5) == rec.recommend(hs, k=5)
    args = ["recommend", "--ckpt", run, "-k", "4", "--json", "--mask-seen"]
    for h in hs[:2]:
        args += ["--seq", " ".join(map(str, h))]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for o, h in zip(out, hs):
        r = rec.recommend(h, k=4)
        assert (o["top"], o["route"], o["hidden"], o["depth"]) == \
            (r.items, r.route, r.hidden, r.depth)
        assert close(o["scores"], r.scores)
    with pytest.raises(SystemExit, match=r"history\[1\]\[2\] = 0: item ids must be in 1..60"):
        cli.main(["recommend", "--ckpt", run, "--seq", "1 2", "--seq", "3 4 0"])
