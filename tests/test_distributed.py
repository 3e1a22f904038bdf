"""Training on several processes: `canet train` under torchrun with 2 gloo
processes on the CPU (data split per rank, DistributedDataParallel, sharded
evaluation, rank-0 checkpoints resumable on 1 process; the routes
consolidated into rungs at epoch 2 from all ranks' validation users) and the
row-sharded output table (`--shard-items`) against the full one."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from canet_kernels import cli
from canet_kernels import data as D
from canet_kernels import distributed as cd
from canet_kernels.model import CANet, CANetConfig
from canet_kernels.train import evaluate, load_model

from helpers import one_thread  # noqa: E402,F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--synthetic-users", "60", "--synthetic-items", "60", "--max-len", "12"]
TINY = [*DATA, "--emb-widths", "8,16", "--hidden-widths", "8,16", "--depths", "1,2",
        "--heads", "2", "--batch-size", "16", "--no-progress", "--threads", "1",
        "--warmup-epochs", "1", "--rungs", "2", "--rung-epoch", "2"]


def torchrun(args, nproc=2, timeout=180):
    """`torchrun --nproc-per-node nproc --standalone ARGS` (stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-epoch run on 2 processes, with the full output table and
    with it sharded over the processes."""
    base = tmp_path_factory.mktemp("dist")
    out = {}
    for name, extra in (("full", []), ("sharded", ["--shard-items"])):
        d = str(base / name)
        out[name + "_stdout"] = torchrun(["-m", "canet_kernels.cli", "train", *TINY,
                                          "--epochs", "2", "--out", d, *extra])
        out[name] = d
    return out


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_two_processes_write_one_run(runs):
    d = runs["full"]
    assert sorted(os.listdir(d)) == ["best.safetensors", "config.json", "last.safetensors",
                                     "results.json", "state.json"]
    assert runs["full_stdout"].count("checkpoint:") == 1        # rank 0 alone prints
    st = _json(os.path.join(d, "state.json"))
    assert st["epoch"] == 2 and len(st["history"]) == 2


def test_two_process_metrics_equal_one_process(runs):
    """The test and validation metrics the 2 processes computed (each rank a
    block of users, sums all-reduced) are those of one process evaluating
    the saved weights."""
    res = _json(os.path.join(runs["full"], "results.json"))
    model, cfg = load_model(runs["full"])
    split = D.leave_one_out(D.synthetic(60, 60, 0), 12)
    for name, stored in (("test", res["test"]), ("valid", res["valid"])):
        one = evaluate(model, getattr(split, name), (10, 20))
        for k in ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "flop_ratio"):
            assert stored[k] == pytest.approx(one[k], rel=1e-12, abs=1e-15), (name, k)
    test = evaluate(model, split.test, (10, 20))
    assert res["test"]["route_counts"] == test["route_counts"]
    assert sum(res["test"]["route_counts"]) == len(split.test)


def test_resume_two_process_run_on_one_process(runs, tmp_path, capsys):
    d = str(tmp_path / "resumed")
    shutil.copytree(runs["full"], d)
    before = _json(os.path.join(d, "state.json"))["history"]
    assert cli.main(["train", *TINY, "--epochs", "3", "--out", d, "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    st = _json(os.path.join(d, "state.json"))
    assert st["epoch"] == 3 and st["history"][:2] == before
    assert _json(os.path.join(d, "results.json"))["epochs_run"] == 3


def test_sharded_items_match_the_full_table(runs):
    """--shard-items on 2 processes trains and evaluates as the same run
    with the full table: the losses of every epoch, the metrics, the
    weights and optimizer state it saves (in the unsharded layout)."""
    from safetensors.torch import load_file
    full, sharded = (_json(os.path.join(runs[k], "state.json"))["history"]
                     for k in ("full", "sharded"))
    for a, b in zip(full, sharded):
        for k in ("loss", "ce", "flop_ratio"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
        assert b["valid"]["ndcg@10"] == pytest.approx(a["valid"]["ndcg@10"], abs=1e-9)
    ra, rb = (_json(os.path.join(runs[k], "results.json"))["test"]
              for k in ("full", "sharded"))
    assert rb["ndcg@10"] == pytest.approx(ra["ndcg@10"], abs=1e-9)
    assert rb["route_counts"] == ra["route_counts"]
    wa, wb = (load_file(os.path.join(runs[k], "last.safetensors")) for k in ("full", "sharded"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        if wa[k].is_floating_point():
            assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_sharded_table_worker():
    """2 processes: per-row losses and every gradient of the sharded
    cross-entropy, the metric ranks (seen items masked), the guide's count,
    the top-k and a whole CANet training step against the full table; and
    DistributedDataParallel leaving grad None where no rank used a
    parameter (see tests/distributed_worker.py)."""
    out = torchrun([os.path.join(ROOT, "tests", "distributed_worker.py")])
    assert "rank 0 ok" in out and "rank 1 ok" in out


# ------------------------------------------------------- one process --

def _cfg(**kw):
    return CANetConfig(n_items=41, max_len=6, emb_widths=(8, 16), hidden_widths=(8, 16),
                       depths=(1, 2), num_heads=2, router_width=8, router_heads=2,
                       router_ffn=16, **kw)


@pytest.mark.parametrize("extra", [{}, {"guide_signal": "holdout"},
                                   {"guide_labels": "sandwich"}])
def test_loss_through_sharded_table_matches_the_output_layer(extra):
    """CANet.loss scored through the sharded table (one process: one shard
    holding every row) gives the loss, statistics and gradients of the
    model's own output layer: the table's cross-entropy and guide hits."""
    cfg = _cfg(**extra)
    torch.manual_seed(0)
    ref = CANet(cfg)
    model = copy.deepcopy(ref)
    table = cd.ShardedTable(model, None, 0, 1)
    g = torch.Generator().manual_seed(1)
    B, L = 9, 6
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None] < lengths[:, None]
    items = torch.randint(1, 42, (B, L), generator=g) * pos
    targets = torch.randint(1, 42, (B, L), generator=g) * pos
    for routes in (None, torch.randint(cfg.num_routes, (B,), generator=g)):
        for m in (ref, model):
            m.train()
            m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        want, want_st = ref.loss(items, lengths, targets, routes=routes)
        torch.manual_seed(3)
        got, got_st = model.loss(items, lengths, targets, routes=routes, table=table)
        assert got.item() == pytest.approx(want.item(), abs=1e-5)
        assert got_st.keys() == want_st.keys()
        for k in want_st:
            assert got_st[k] == pytest.approx(want_st[k], abs=1e-5), k
        want.backward()
        got.backward()
        mine = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            if p.grad is None:
                assert mine[name].grad is None, name
            else:
                torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4)


def test_one_process_shard_items_evaluates_as_the_model():
    """evaluate() through the sharded table (one process) gives the full
    scoring path's metrics and routes, seen items masked or not."""
    split = D.leave_one_out(D.synthetic(40, 41, 0), 6)
    torch.manual_seed(0)
    model = CANet(_cfg())
    want = [evaluate(model, split.valid, (5, 10), m, batch_size=16) for m in (False, True)]
    sharded = copy.deepcopy(model)
    ctx = cd.Context(0, 1, cd.ShardedTable(sharded, None, 0, 1))
    got = [evaluate(sharded, split.valid, (5, 10), m, batch_size=16, dist=ctx)
           for m in (False, True)]
    for a, b in zip(want, got):
        assert a["route_counts"] == b["route_counts"]
        for k in ("recall@5", "ndcg@5", "ndcg@10"):
            assert b[k] == pytest.approx(a[k], abs=1e-12), k


def test_batches_split_over_ranks():
    """Each rank's parts of the single-process batches (same shuffle, the
    generator left where one process leaves it) cover every batch once; a
    batch smaller than the world is repeated so every rank gets a row."""
    want = D.batches(37, 8, torch.Generator().manual_seed(4))
    end = torch.Generator().manual_seed(4)
    D.batches(37, 8, end)
    for world in (1, 2, 3):
        gens = [torch.Generator().manual_seed(4) for _ in range(world)]
        ctxs = [cd.Context(r, world) for r in range(world)]
        per_rank = [c.train_batches(37, 8, g) for c, g in zip(ctxs, gens)]
        for g in gens:
            assert torch.equal(g.get_state(), end.get_state())
        for i, b in enumerate(want):
            parts = [pr[i][c.part(len(pr[i]))] for c, pr in zip(ctxs, per_rank)]
            assert all(len(p) for p in parts)
            assert torch.equal(torch.cat(parts), b)
    tiny = cd.Context(1, 4).train_batches(2, 8, torch.Generator().manual_seed(0))
    assert len(tiny[0]) == 4
    # evaluation: contiguous blocks of users, in order
    blocks = [torch.cat(cd.Context(r, 3).user_batches(10, 2)) for r in range(3)]
    assert torch.equal(torch.cat(blocks), torch.arange(10))


def test_shard_items_errors(capsys, tmp_path):
    for extra, want in ((["--tie-embeddings"], "--tie-embeddings"),
                        (["--path", "masked"], "--path routed"),
                        (["--router-mode", "value"], "--router-mode canet")):
        rc = cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path), "--shard-items",
                       *extra])
        err = capsys.readouterr().err
        assert rc == 2 and want in err, err
