"""The SASRec.pytorch-style adapter: its interface on left-padded numpy ids,
equal to the encoder on the same users right-padded, and the example
script."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import torch

from canet_kernels.integrations.sasrec import CANetSASRec

from helpers import one_thread  # noqa: E402,F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_(**kw):
    a = dict(hidden_units=16, maxlen=8, num_blocks=2, num_heads=2, dropout_rate=0.0)
    a.update(kw)
    return types.SimpleNamespace(**a)


def batch(n_items=30, B=5, L=8, seed=0):
    g = np.random.default_rng(seed)
    lengths = np.array([8, 1, 3, 5, 8])
    left = np.zeros((B, L), dtype=np.int64)
    right = np.zeros((B, L), dtype=np.int64)
    for b, n in enumerate(lengths):
        s = g.integers(1, n_items + 1, n)
        left[b, L - n:] = s
        right[b, :n] = s
    return left, right, torch.as_tensor(lengths)


def test_log2feats_predict_and_router_loss():
    torch.manual_seed(0)
    m = CANetSASRec(10, 30, args_()).double().eval()
    assert m.cfg.hidden_widths == (8, 12, 16) and m.cfg.depths == (1, 2)
    left, right, lengths = batch()
    feats = m.log2feats(left)                                     # [B, L, H]
    routes = m.last_output.route_ids
    ref = m.encoder(torch.as_tensor(right), lengths, routes)
    L = left.shape[1]
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(feats[b, L - n:], ref.hidden[b, :n])
        assert (feats[b, :L - n] == 0).all()
    items = np.arange(1, 31)
    s = m.predict(None, left, items)
    torch.testing.assert_close(s, ref.last @ m.item_emb.weight[1:, :16].T)
    pos = np.where(left > 0, 3, 0)
    pl, nl = m(None, left, pos, pos)
    torch.testing.assert_close(pl, nl)
    torch.testing.assert_close(pl[:, -1], ref.last @ m.item_emb.weight[3, :16])
    m.train()
    m(None, left, pos, pos)
    assert m.router_loss().item() > 0
    dense = CANetSASRec(10, 30, args_(canet_dense=True)).train()
    dense(None, left, pos, pos)
    assert dense.router_loss().item() == 0
    assert (dense.last_output.route_ids == dense.cfg.max_route).all()


def test_rungs_fix_the_routes_from_validation_users():
    """args.canet_rungs: consolidate() takes left-padded validation ids, the
    rungs are the votes of the same users right-padded (set_rungs), and
    afterwards every user is on a rung with no router loss."""
    torch.manual_seed(0)
    m = CANetSASRec(10, 30, args_(canet_rungs=2)).train()
    left, right, lengths = batch()
    want = CANetSASRec(10, 30, args_(canet_rungs=2))
    want.load_state_dict(m.state_dict())
    with torch.no_grad():
        want_rungs = want.encoder.set_rungs(want.encoder.router.eval()(
            torch.as_tensor(right), lengths))
    assert m.consolidate([left[:2], left[2:]]) == want_rungs
    assert m.training                                      # mode kept
    pos = np.where(left > 0, 3, 0)
    m(None, left, pos, pos)
    assert set(m.last_output.route_ids.tolist()) <= set(want_rungs)
    assert m.router_loss().item() == 0


def test_example_script_runs():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import sasrec_style
    ndcg, ratio = sasrec_style.main(["--users", "120", "--items", "60", "--epochs", "1",
                                     "--dense"])
    assert ratio == 1.0 and 0 <= ndcg <= 1
