"""The accuracy scripts run end to end on tiny settings and write what their
README tables read: router_ablation's oracle, refit and ladder runs, accuracy_real's
comparators, per-quartile FLOP ratios, logit spread and a reused dense run."""
from __future__ import annotations

import json
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
