"""The `canet` command and the training loop: checkpoints, resume,
reproducibility, eval / route-stats / recommend / demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from canet_kernels import cli
from canet_kernels import data as D
from canet_kernels.model import CANetConfig
from canet_kernels.train import TrainConfig, load_model, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic-users", "60", "--synthetic-items", "60", "--max-len", "12",
        "--emb-widths", "8,16", "--hidden-widths", "8,16", "--depths", "1,2",
        "--heads", "2", "--batch-size", "16", "--no-progress"]


from helpers import one_thread  # noqa: E402,F401  (autouse fixture)


def run_cli(args, capsys):
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    rc = cli.main(["train", *TINY, "--epochs", "2", "--out", out])
    assert rc == 0
    return out


def test_train_writes_checkpoint(trained):
    for name in ("config.json", "best.safetensors", "last.safetensors", "state.json",
                 "results.json"):
        assert os.path.exists(os.path.join(trained, name)), name
    with open(os.path.join(trained, "results.json")) as f:
        res = json.load(f)
    assert "full ranking" in res["protocol"] and "validation" in res["protocol"]
    for split in ("valid", "test"):
        for k in ("recall@10", "ndcg@10", "hr@20", "ndcg@20"):
            assert 0.0 <= res[split][k] <= 1.0
    assert 0 < res["test"]["flop_ratio"] <= 1
    assert sum(res["test"]["route_counts"]) > 0


def test_checkpoint_round_trip(trained):
    model, cfg = load_model(trained)
    assert cfg["model"]["hidden_widths"] == [8, 16]
    weights = load_file(os.path.join(trained, "best.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    split = D.leave_one_out(D.load({k: v for k, v in cfg["data"].items()
                                    if k not in ("max_len", "windows")}), 12)
    es = split.test
    s1, r1 = model(es.items[:8], es.lengths[:8])
    model2, _ = load_model(trained)
    s2, r2 = model2(es.items[:8], es.lengths[:8])
    assert torch.equal(s1, s2) and torch.equal(r1, r2)


def test_eval_route_stats_recommend(trained, capsys):
    rc, out, _ = run_cli(["eval", "--ckpt", trained], capsys)
    assert rc == 0 and "valid:" in out and "test:" in out and "ndcg@10" in out
    with open(os.path.join(trained, "results.json")) as f:
        res = json.load(f)
    line = [l for l in out.splitlines() if l.startswith("test:")][0]
    assert f"ndcg@10 {res['test']['ndcg@10']:.4f}" in line
    js = os.path.join(trained, "routes.json")
    rc, out, _ = run_cli(["route-stats", "--ckpt", trained, "--json", js], capsys)
    assert rc == 0 and "mean FLOP ratio" in out and "route  emb" in out
    with open(js) as f:
        routes = json.load(f)
    assert routes["route_counts"] == res["test"]["route_counts"]
    assert f"mean FLOP ratio {routes['flop_ratio']:.3f}" in out
    assert routes["rungs"] is None and "rungs" not in out
    rc, out, _ = run_cli(["recommend", "--ckpt", trained, "--seq", "1 2 3",
                          "--seq", "40 41", "-k", "5", "--json", "--mask-seen"], capsys)
    assert rc == 0
    recs = json.loads(out)
    assert len(recs) == 2 and all(len(r["top"]) == 5 for r in recs)
    assert not {1, 2, 3} & set(recs[0]["top"])


def test_route_stats_reports_rungs(tmp_path, capsys):
    out = str(tmp_path / "rungs")
    assert cli.main(["train", *TINY, "--epochs", "2", "--rungs", "2", "--rung-epoch", "1",
                     "--out", out]) == 0
    js = str(tmp_path / "routes.json")
    rc, text, _ = run_cli(["route-stats", "--ckpt", out, "--json", js], capsys)
    model, _ = load_model(out)
    with open(js) as f:
        rungs = json.load(f)["rungs"]
    assert rc == 0 and rungs["routes"] == model.rung_routes.tolist()
    assert rungs["cuts"] == model.rung_cuts.tolist()
    assert f"consolidated into 2 rungs: routes {rungs['routes']}" in text


def test_recommend_rejects_unknown_items(trained, capsys):
    with pytest.raises(SystemExit, match="item ids must be in 1..60"):
        cli.main(["recommend", "--ckpt", trained, "--seq", "1 999"])


def small(tmp_path, epochs, seed=0):
    ds = D.synthetic(50, 60, seed=1)
    split = D.leave_one_out(ds, 10)
    mcfg = CANetConfig(n_items=ds.n_items, max_len=10, emb_widths=(8, 16),
                       hidden_widths=(8, 16), depths=(1, 2), num_heads=2, dropout=0.2)
    tcfg = TrainConfig(epochs=epochs, batch_size=16, seed=seed, progress=False)
    return mcfg, tcfg, split, ds.source


def test_resume_matches_an_uninterrupted_run(tmp_path):
    mcfg, tcfg, split, src = small(tmp_path, 3)
    a = str(tmp_path / "a")
    train(mcfg, tcfg, split, a, src, log=lambda *_: None)
    b = str(tmp_path / "b")
    mcfg, tcfg1, split, src = small(tmp_path, 1)
    train(mcfg, tcfg1, split, b, src, log=lambda *_: None)
    train(mcfg, tcfg, split, b, src, resume=True, log=lambda *_: None)
    wa, wb = load_file(os.path.join(a, "last.safetensors")), \
        load_file(os.path.join(b, "last.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    with open(os.path.join(a, "state.json")) as f, open(os.path.join(b, "state.json")) as g:
        sa, sb = json.load(f), json.load(g)
    assert sa["best_epoch"] == sb["best_epoch"] and sa["best"] == sb["best"]


def test_resume_refuses_a_different_run(tmp_path):
    mcfg, tcfg, split, src = small(tmp_path, 1)
    out = str(tmp_path / "r")
    train(mcfg, tcfg, split, out, src, log=lambda *_: None)
    tcfg.lr = 0.5
    with pytest.raises(ValueError, match="lr"):
        train(mcfg, tcfg, split, out, src, resume=True, log=lambda *_: None)
    with pytest.raises(FileNotFoundError):
        train(mcfg, tcfg, split, str(tmp_path / "none"), src, resume=True)
    # a checkpoint from before rung_lift existed ran without the lift: resuming
    # it with today's default would change the run
    tcfg.lr = TrainConfig().lr
    path = os.path.join(out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["train"]["rung_lift"]
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="rung_lift"):
        train(mcfg, tcfg, split, out, src, resume=True, log=lambda *_: None)


def test_same_seed_same_run(tmp_path):
    mcfg, tcfg, split, _ = small(tmp_path, 1)
    m1, r1 = train(mcfg, tcfg, split, log=lambda *_: None)
    m2, r2 = train(mcfg, tcfg, split, log=lambda *_: None)
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k
    assert r1["test"] == r2["test"]
    tcfg.seed = 1
    m3, _ = train(mcfg, tcfg, split, log=lambda *_: None)
    assert not torch.equal(m1.net.w_p, m3.net.w_p)


def test_dense_baseline_uses_only_the_max_route(tmp_path, capsys):
    out = str(tmp_path / "dense")
    rc, text, _ = run_cli(["train", *TINY, "--epochs", "1", "--dense", "--out", out],
                          capsys)
    assert rc == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["test"]["flop_ratio"] == 1.0
    assert res["test"]["route_counts"][-1] == sum(res["test"]["route_counts"])


def test_malformed_file_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4\n2 5 six 7\n")
    rc, _, err = run_cli(["train", "--data", str(bad), "--out", str(tmp_path / "o"),
                          "--no-progress"], capsys)
    assert rc == 2
    assert f"{bad}:2:" in err and "'six'" in err


def _write_inter(path, ds, header, timed=True):
    """ds as a RecBole .inter file with string tokens; timed: lines in reverse
    time order (the reader must sort them), else in time order without times."""
    rows = [(t, f"user{u}", f"item{v}") for u, seq in zip(ds.users, ds.sequences)
            for t, v in enumerate(seq)]
    with open(path, "w") as f:
        f.write(header + "\n")
        for t, u, v in (sorted(rows, reverse=True) if timed else rows):
            f.write(f"{u}\t{v}\t{t}\n" if timed else f"{u}\t{v}\n")


def test_train_and_eval_on_a_recbole_inter_file(tmp_path, capsys):
    ds = D.synthetic(60, 60, seed=1)
    path = str(tmp_path / "tiny.inter")
    _write_inter(path, ds, "session:token\titem_id:token\tts:float")
    out = str(tmp_path / "run")
    rc, text, err = run_cli(["train", "--data", path, "--format", "inter",
                             "--user-field", "session", "--time-field", "ts", *TINY,
                             "--epochs", "1", "--out", out], capsys)
    assert rc == 0 and "warning" not in err
    assert "tiny: 60 users" in text
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    # eval reloads the .inter file (with its field names) from the checkpoint
    rc, text, _ = run_cli(["eval", "--ckpt", out], capsys)
    assert rc == 0
    line = [l for l in text.splitlines() if l.startswith("test:")][0]
    assert f"ndcg@10 {res['test']['ndcg@10']:.4f}" in line
    # no time column: a warning that file order is taken as time order
    plain = str(tmp_path / "plain.inter")
    _write_inter(plain, ds, "user_id:token\titem_id:token", timed=False)
    rc, _, err = run_cli(["route-stats", "--ckpt", out, "--data", plain], capsys)
    assert rc == 0
    assert f"canet: warning: {plain}: no time column 'timestamp'" in err
    assert "file order" in err and "numbered by the file itself" in err


def test_pairs_file_warns_through_the_cli(tmp_path, capsys):
    pairs = tmp_path / "p.txt"
    pairs.write_text("1 2\n1 3\n2 3\n1 4\n2 4\n1 5\n2 5\n2 6\n")
    rc, _, err = run_cli(["train", "--data", str(pairs), "--format", "pairs", *TINY,
                          "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0
    assert f"canet: warning: {pairs}: the pairs format has no timestamps" in err
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ta\tnoon\n")
    rc, _, err = run_cli(["train", "--data", str(bad), "--out", str(tmp_path / "b"),
                          "--no-progress"], capsys)
    assert rc == 2 and f"{bad}:2:" in err and "'noon'" in err


def test_demo_smoke(capsys):
    rc, out, _ = run_cli(["demo", "--users", "80", "--items", "60", "--epochs", "2",
                          "--rung-epoch", "1", "--max-len", "12", "--emb-widths", "8,16", "--hidden-widths",
                          "8,16", "--depths", "1,2", "--heads", "2", "--batch-size",
                          "16", "--no-progress", "--compare-dense"], capsys)
    assert rc == 0
    for what in ("test:", "mean FLOP ratio", "dense test:", "CANet / dense NDCG@10", "routed (router + canet ops)",
                 "dense  (max route", "masked (paper", "simple  users", "complex users",
                 "| rungs "):
        assert what in out, what


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "canet_kernels.cli", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "eval", "route-stats", "recommend", "demo"):
        assert cmd in r.stdout


def test_eval_with_and_without_seen_masking(trained, capsys, tmp_path):
    """A model trained without masking evaluates both ways; the default is
    the training protocol (reproduces results.json)."""
    with open(os.path.join(trained, "results.json")) as f:
        res = json.load(f)
    got = {}
    for flag in ("--mask-seen", "--no-mask-seen", None):
        js = str(tmp_path / f"{flag}.json")
        rc, out, _ = run_cli(["eval", "--ckpt", trained, "--json", js]
                             + ([flag] if flag else []), capsys)
        assert rc == 0
        assert ("seen items masked" in out) == (flag == "--mask-seen")
        with open(js) as f:
            got[flag] = json.load(f)["test"]
    assert got[None]["ndcg@10"] == res["test"]["ndcg@10"]
    assert got["--no-mask-seen"] == got[None]
    assert got["--mask-seen"]["ndcg@10"] != got[None]["ndcg@10"]


def test_router_switches_reach_the_config(tmp_path, capsys):
    out = str(tmp_path / "switches")
    rc, _, _ = run_cli(["train", *TINY, "--epochs", "1", "--balance", "mi", "--noise-end", "0",
                        "--guide-signal", "holdout", "--distill", "0.5", "--out", out], capsys)
    assert rc == 0
    with open(os.path.join(out, "config.json")) as f:
        model = json.load(f)["model"]
    assert (model["balance"], model["noise_end"], model["guide_signal"], model["distill"]) \
        == ("mi", 0.0, "holdout", 0.5)
    with pytest.raises(SystemExit):      # argparse names the bad value
        cli.main(["train", *TINY, "--balance", "entropy", "--out", out])
    assert "--balance" in capsys.readouterr().err
