"""The accuracy scripts run end to end on tiny settings and write what their
README tables read: router_ablation's oracle, refit and ladder runs, accuracy_real's
comparators, per-quartile FLOP ratios, logit spread and a reused dense run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")


def run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_router_ablation_oracle_and_refit(tmp_path):
    out = str(tmp_path / "abl.json")
    text = run(["benchmarks/router_ablation.py", "--users", "120", "--items", "60",
                "--epochs", "1", "--seeds", "0", "--static-candidates", "1",
                "--variants", "default", "--oracle", "0", "29", "--finetune-epochs", "1",
                "--refit", "--ladder", "2", "--out", out], tmp_path)
    assert "oracle routes [0, 29]" in text and "finetuned" in text
    with open(out) as f:
        rep = json.load(f)
    orc = rep["oracle"]["0-29/0"]
    assert orc["routes"] == [0, 29]
    # every simple user on route 0, every complex one on 29: only those two
    used = [r for r, c in enumerate(orc["route_counts"]) if c]
    assert set(used) == {0, 29}
    assert 0 < orc["flop_ratio"] < 1 and "ratio" in orc["ndcg10_vs_static"]
    ft = rep["runs"]["default/0"]["finetuned"]
    assert ft["epochs"] == 1 and 0 <= ft["test_route_equals_valid_route_share"] <= 1
    # two rungs: every test user is on one of them
    assert len(ft["ladder"]) == 2
    assert {r for r, c in enumerate(ft["route_counts"]) if c} <= set(ft["ladder"])


def test_router_ablation_variants_build():
    """Every variant names real CANetConfig / TrainConfig fields with valid
    values (a misspelt switch would otherwise fail only hours into a run)."""
    sys.path.insert(0, ROOT)
    from benchmarks.router_ablation import DEMO_MODEL, VARIANTS
    from canet_kernels.model import CANetConfig
    from canet_kernels.train import TrainConfig
    base = CANetConfig(n_items=10, **DEMO_MODEL).to_dict()
    for name, v in VARIANTS.items():
        assert set(v) <= {"model", "train"}, name
        CANetConfig.from_dict(dict(base, **v.get("model", {})))
        TrainConfig(**v.get("train", {}))


def test_router_ablation_merge(tmp_path):
    """A committed report cut into one file per seed merges back into the
    same runs and per-variant means; a run that differs between files, or
    another data set, is refused with the argument named."""
    with open(os.path.join(ROOT, "benchmarks", "results", "accuracy",
                           "router_ablation_target0.2.json")) as f:
        whole = json.load(f)
    parts = []
    for seed in whole["settings"]["seeds"]:
        part = json.loads(json.dumps(whole))
        part["settings"]["seeds"] = [seed]
        part["runs"] = {k: v for k, v in whole["runs"].items() if v["seed"] == seed}
        part["static_runs"] = {k: v for k, v in whole["static_runs"].items()
                               if k.split("/")[0] == str(seed)}
        del part["summary"]
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(part))
        parts.append(str(path))
    out = str(tmp_path / "merged.json")
    run(["benchmarks/router_ablation.py", "--merge", *parts[::-1], "--out", out], tmp_path)
    with open(out) as f:
        merged = json.load(f)
    assert merged["runs"] == whole["runs"] and merged["static_runs"] == whole["static_runs"]
    assert merged["settings"]["seeds"] == whole["settings"]["seeds"]
    for v, s in whole["summary"].items():
        got = merged["summary"][v]
        assert sorted(got.pop("seeds")) == sorted(s["seeds"])
        assert got == pytest.approx({k: x for k, x in s.items() if k != "seeds"})
    bad = json.loads((tmp_path / "s0.json").read_text())
    key = next(iter(bad["runs"]))
    bad["runs"][key]["test_ndcg@10"] += 0.01
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    other = json.loads((tmp_path / "s1.json").read_text())
    other["data"] = "another data set"
    (tmp_path / "other.json").write_text(json.dumps(other))
    for files, words in (([*parts, str(tmp_path / "bad.json")], key),
                         ([parts[0], str(tmp_path / "other.json")], "'data'"),
                         ([parts[0], os.path.join(ROOT, "README.md")], "cannot read")):
        p = subprocess.run([sys.executable, "benchmarks/router_ablation.py", "--merge", *files,
                            "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode != 0 and "--merge" in p.stderr and words in p.stderr
    with open(out) as f:                  # a refused merge leaves --out as it was
        assert json.load(f)["runs"] == whole["runs"]


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "LastFM.txt")),
                    reason="needs ../shared/data/LastFM.txt")
def test_accuracy_real_reports_and_reuses_dense(tmp_path):
    common = ["benchmarks/accuracy_real.py", "--datasets", "LastFM", "--limit-users", "150",
              "--epochs", "1", "--warmup-epochs", "0", "--emb-widths", "16,32",
              "--hidden-widths", "16,32", "--depths", "1,2", "--threads", "1",
              "--no-progress", "--balance", "switch", "--uniform-weight", "3"]
    first = str(tmp_path / "a.json")
    run([*common, "--models", "dense", "canet", "static", "supernet",
         "--run-dir", str(tmp_path / "runs"), "--out", first], tmp_path)
    with open(first) as f:
        e = json.load(f)["datasets"]["LastFM"]
    assert e["canet"]["logit_spread"]["between_routes"] >= 0
    assert len(e["canet_flop_ratio_by_dense_loss_quartile"]["mean"]) == 4
    for other in ("dense", "static", "supernet"):
        assert f"ndcg10_ratio_vs_{other}" in e
    second = str(tmp_path / "b.json")
    text = run([*common, "--models", "dense", "--dense-from", str(tmp_path / "runs"),
                "--run-dir", str(tmp_path / "runs2"), "--out", second], tmp_path)
    assert "epoch 1: loss" not in text    # read, not trained
    with open(second) as f:
        d = json.load(f)["datasets"]["LastFM"]["dense"]
    assert d["test"]["ndcg@10"] == e["dense"]["test"]["ndcg@10"]
    assert d["read_from"].endswith(os.path.join("LastFM", "dense"))


def test_accuracy_real_probe_split_compares_on_the_selection_half(tmp_path):
    """With --rung-probe-split every model's validation metric is also taken
    on CANet's selection users (the half the probe did not see), drawn here
    independently of the code under test."""
    import torch
    from canet_kernels import data as D
    from canet_kernels.train import evaluate, load_model
    out, runs = str(tmp_path / "a.json"), tmp_path / "runs"
    run(["benchmarks/accuracy_real.py", "--datasets", "LastFM", "--limit-users", "150",
         "--epochs", "2", "--warmup-epochs", "0", "--rungs", "2", "--rung-epoch", "1",
         "--rung-choice", "probe", "--rung-probe-split", "--emb-widths", "16,32",
         "--hidden-widths", "16,32", "--depths", "1,2", "--threads", "1", "--no-progress",
         "--seed", "3", "--models", "dense", "canet", "static", "--run-dir", str(runs),
         "--out", out], tmp_path)
    with open(out) as f:
        e = json.load(f)["datasets"]["LastFM"]
    ds = D.read_file(os.path.join(DATA, "LastFM.txt"))
    ds.sequences, ds.users = ds.sequences[:150], ds.users[:150]
    valid = D.leave_one_out(ds, 50).valid
    perm = torch.randperm(len(valid), generator=torch.Generator().manual_seed(3))
    halves = {"probe": perm[:len(valid) // 2], "selection": perm[len(valid) // 2:]}
    got = e["valid_halves"]
    assert e["canet"]["valid"]["users"] == len(halves["selection"])
    assert got["selection"]["canet"] == pytest.approx(e["canet"]["valid"]["ndcg@10"],
                                                      abs=1e-12)
    models = {k: load_model(str(runs / "LastFM" / d))[0] for k, d in (
        ("dense", "dense"), ("canet", "canet"), ("static", f"static_route{e['static']['route']}"))}
    for half, users in halves.items():
        for kind, route in (("dense", "max"), ("canet", None), ("static", 0)):
            want = evaluate(models[kind], valid.subset(users), mask_seen=True,
                            route=route)["ndcg@10"]
            assert got[half][kind] == pytest.approx(want, abs=1e-12), (half, kind)
    # --table prints CANet's ratios on each half and on test
    test = {k: e[k]["test"]["ndcg@10"] for k in ("canet", "dense", "static")}
    cells = [", ".join(f"{v['canet'] / v[k]:.3f}" if v[k] else "-" for k in ("dense", "static"))
             for v in (got["probe"], got["selection"], test)]
    rows = run(["benchmarks/accuracy_real.py", "--table", out], tmp_path).splitlines()
    assert f"| LastFM | 3 | {' | '.join(cells)} |" in rows
    assert f"| LastFM | means of 1 | {' | '.join(cells)} |" in rows


def test_accuracy_real_table(tmp_path):
    """--table on committed runs prints the seed means the results README
    reports for them (worked out when those runs were written up), and names
    the argument when a file has no CANet run."""
    res = os.path.join("benchmarks", "results", "accuracy")
    text = run(["benchmarks/accuracy_real.py", "--table",
                *[os.path.join(res, f"lastfm_s{s}_rungs4_probe_lift.json") for s in range(3)]],
               tmp_path)
    rows = [r for r in text.splitlines() if r.startswith("| LastFM |")]
    assert len(rows) == 4
    assert rows[0].startswith("| LastFM | 0 | 0.0373 / 0.0250 | 0.359 | "
                              "14: 249, 19: 325, 28: 294, 33: 222 | 0.43/0.43/0.41/0.17 |")
    assert rows[3] == ("| LastFM | 3 | 0.02467 (0.00051) | 0.02547 (0.00098), FLOP 0.370 | "
                       "0.02426 (0.00163) | 1.032 | 1.050 |")
    one = run(["benchmarks/accuracy_real.py", "--table",
               os.path.join(res, "lastfm_s1_rungs4_probe_lift.json")], tmp_path)
    assert one.splitlines()[-1] == ("| LastFM | 1 | 0.02384 | 0.02402, FLOP 0.375 | 0.02358 | "
                                    "1.008 | 1.019 |")
    bad = tmp_path / "dense_only.json"
    bad.write_text(json.dumps({"settings": {"seed": 0}, "datasets": {"LastFM": {}}}))
    p = subprocess.run([sys.executable, "benchmarks/accuracy_real.py", "--table", str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--table" in p.stderr and "no canet run" in p.stderr
    p = subprocess.run([sys.executable, "benchmarks/accuracy_real.py", "--table",
                         str(tmp_path / "missing.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--table: cannot read" in p.stderr and "missing.json" in p.stderr


def test_compute_need_spearman_matches_scipy():
    """compute_need's rank correlation (average ranks for ties) against
    scipy's, on tied and untied data."""
    stats = pytest.importorskip("scipy.stats")
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from compute_need import spearman, top_share
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g)
    b = a + torch.randn(200, generator=g)
    ties = torch.randint(0, 4, (200,), generator=g).double()   # heavy ties, as NDCG has
    for x, y in ((a, b), (ties, b), (ties, ties.flip(0))):
        want = stats.spearmanr(x.numpy(), y.numpy()).statistic
        assert abs(spearman(x, y) - want) < 1e-12
    assert top_share(torch.tensor([0.1, 3.0, 2.0, 2.0, -1.0]), 0.4).tolist() == \
        [False, True, True, False, False]


def test_compute_need_share_router_by_hand():
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from compute_need import share_router
    large = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    small = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    gain = torch.tensor([2.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    # the two largest scores (users 0, 1) on the large model: 1, 0; the rest small: 0, 1
    r = share_router(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.5, large, small, gain)
    assert r["test_ndcg@10"] == 0.5
    assert abs(r["vs_random"] - 0.5 / 0.375) < 1e-12   # random: mean of 0.5, 0, 0.5, 0.5
    assert r["test_gain_of_chosen"] == 1.5 and r["test_gain_of_others"] == -0.25


def test_compute_need_end_to_end(tmp_path):
    """Two tiny runs of `canet train` on the synthetic data: the report has
    every field the README reads, and each router's ratio is its NDCG over
    the random choice's expectation."""
    common = ["-m", "canet_kernels.cli", "train", "--synthetic-users", "80",
              "--synthetic-items", "40", "--max-len", "8", "--epochs", "1", "--batch-size", "32",
              "--no-progress", "--threads", "1", "--heads", "2"]
    large, small = str(tmp_path / "large"), str(tmp_path / "small")
    run([*common, "--emb-widths", "16", "--hidden-widths", "16", "--depths", "2",
         "--out", large], tmp_path)
    run([*common, "--emb-widths", "8", "--hidden-widths", "8", "--depths", "1",
         "--out", small], tmp_path)
    out = str(tmp_path / "need.json")
    text = run(["benchmarks/compute_need.py", "--pair", large, small, "--threads", "1",
                "--out", out], tmp_path)
    assert "share 0.25 on the large model" in text
    with open(out) as f:
        p = json.load(f)["pairs"][0]
    assert p["users"] == 80 and p["small_route"] == [8, 8, 1]
    for k in ("difficulty_valid_vs_test", "gain_valid_vs_test", "gain_test_vs_length"):
        assert -1 <= p["spearman"][k] <= 1
    nd = p["test_ndcg@10"]
    for f, rows in p["routers"].items():
        want = float(f) * nd["large"] + (1 - float(f)) * nd["small"]
        assert abs(rows["random"]["test_ndcg@10"] - want) < 1e-9
        for name in ("validation_gain", "longest", "shortest"):
            r = rows[name]
            assert abs(r["vs_random"] - r["test_ndcg@10"] / want) < 1e-9
            assert r["ci95"][0] <= r["ci95"][1]


def test_probe_holdout_shrinks_and_scores_the_other_half():
    """The probe's choice with each group's metric shrunk toward all users'
    (values worked out by hand), and the held-out NDCG@10 of each choice on
    users whose values are fixed by their group."""
    sys.path.insert(0, ROOT)
    import torch
    from benchmarks.probe_holdout import choose, held_out
    ratio = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    # group 0: 2 users best on route 0; group 1: 8 users best on route 1;
    # all users: [0.2, 0.4, 0]
    values = torch.tensor([[1.0, 0, 0]] * 2 + [[0, 0.5, 0]] * 8, dtype=torch.float64)
    group = torch.tensor([0] * 2 + [1] * 8)
    for lam, want in [(0, [0, 1]), (8, [0, 1]), (20, [1, 1]), (math.inf, [1, 1])]:
        # lam 8: group 0 [0.36, 0.32, 0]; lam 20: [0.27, 0.36, 0]
        assert choose(values, group, 2, ratio, None, False, lam).tolist() == want, lam
    values = torch.tensor([[1.0, 0, 0]] * 100 + [[0.1, 0, 0.8]] * 100, dtype=torch.float64)
    group = torch.tensor([0] * 100 + [1] * 100)
    res = held_out(values, group, 2, ratio, None, False, [0, math.inf], 50, 0)
    assert res["probe, shrink 0"]["ndcg@10"] == pytest.approx(0.9, abs=0.02)
    for name in ("probe, shrink inf", "one route"):       # route 0 for everyone
        assert res[name]["ndcg@10"] == pytest.approx(0.55, abs=0.02)
        assert res[name]["flop_ratio"] == pytest.approx(0.2)
    assert res["max route"]["ndcg@10"] == pytest.approx(0.4, abs=0.02)


def test_probe_holdout_end_to_end(tmp_path):
    out = str(tmp_path / "p.json")
    text = run(["benchmarks/probe_holdout.py", "--datasets", "LastFM", "--limit-users", "150",
                "--rungs", "2", "--rung-epoch", "1", "--warmup-epochs", "0",
                "--rung-choice", "probe", "--rung-signal", "length", "--rung-cut", "served",
                "--rung-order", "rising", "--emb-widths", "16,32", "--hidden-widths", "16,32",
                "--depths", "1,2", "--threads", "1", "--no-progress", "--halves", "5",
                "--out", out], tmp_path)
    assert "epoch 1:" in text and "epoch 2:" not in text    # stopped at the rung epoch
    with open(out) as f:
        d = json.load(f)["datasets"]["LastFM"]
    assert set(d["held_out"]) == {"probe, shrink 0", "probe, shrink 300", "probe, shrink 1000",
                                  "probe, shrink inf", "one route", "max route"}
    assert d["held_out"]["max route"]["flop_ratio"] == 1.0 and sum(d["groups"]) == d["users"]
    table = run(["benchmarks/probe_holdout.py", "--table", out, out], tmp_path).splitlines()
    assert table[0].startswith("| data | seed | one route NDCG@10 | probe, shrink 0 |")
    assert len(table) == 5 and table[-1].startswith("| LastFM | mean of 2 ")
    assert "| 1.000 (0.000) |" in table[-1]          # one route against itself
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "benchmarks/probe_holdout.py", "--halves", "0"],
                       cwd=ROOT, check=True, capture_output=True)
