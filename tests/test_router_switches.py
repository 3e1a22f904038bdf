"""The router-training switches of CANetConfig (measured by
benchmarks/router_ablation.py): each does what it says, and the defaults
are the paper's method."""
from __future__ import annotations

import math

import pytest
import torch

import canet_kernels  # noqa: F401  registers the ops
from canet_kernels.model import CANet, CANetConfig, encoder
from canet_kernels.model.router import user_stats

from helpers import one_thread  # noqa: E402,F401  (autouse fixture)


def cfg_(**kw):
    base = dict(n_items=40, max_len=12, emb_widths=(8, 16), hidden_widths=(8, 16),
                depths=(1, 2), num_heads=2, dropout=0.0, router_width=8,
                router_heads=2, router_ffn=16, flop_target=0.5)
    base.update(kw)
    return CANetConfig(**base)


def batch(cfg, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_len
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    items = torch.randint(1, cfg.n_items + 1, (B, L), generator=g).masked_fill(pad, 0)
    targets = torch.randint(1, cfg.n_items + 1, (B, L), generator=g).masked_fill(pad, 0)
    return items, lengths, targets


def test_defaults_are_the_papers_method():
    cfg = cfg_()
    assert (cfg.guide_signal, cfg.guide_labels, cfg.balance, cfg.budget_shape) == \
        ("train", "small", "kl", "relu")
    assert cfg.tau_end is None and cfg.noise_end is None and not cfg.router_stats


@pytest.mark.parametrize("kw", [dict(guide_signal="x"), dict(balance="x"),
                                dict(budget_shape="x"), dict(guide_labels="x"),
                                dict(tau_end=0.0), dict(noise_end=1.5)])
def test_bad_switch_values_are_refused(kw):
    with pytest.raises(ValueError):
        cfg_(**kw)


def test_switch_loss_is_one_when_balanced_and_R_when_collapsed():
    R = 6
    flat = torch.full((12, R), 1.0 / R, dtype=torch.float64)
    routes = torch.arange(12) % R
    assert float(encoder.switch_loss(flat, routes)) == pytest.approx(1.0)
    one = torch.zeros(12, R, dtype=torch.float64)
    one[:, 2] = 1
    assert float(encoder.switch_loss(one, torch.full((12,), 2))) == pytest.approx(R)


def test_mi_balance_prefers_confident_users_over_a_shared_flat_prior():
    """Both batches have a uniform mean; "kl" cannot tell them apart, "mi"
    prefers the one where each user is sure of its own route."""
    m = CANet(cfg_(balance="mi"))
    R = m.cfg.num_routes
    flat = torch.zeros(R, R)
    sure = torch.eye(R) * 30
    kl = encoder.uniform_loss
    assert float(kl(flat.softmax(-1))) == pytest.approx(float(kl(sure.softmax(-1))), abs=1e-6)
    lf = m.logit_losses(flat)["uniform"]
    ls = m.logit_losses(sure)["uniform"]
    assert float(lf) == pytest.approx(math.log(R), rel=1e-5) and float(ls) < 1e-6


def test_two_sided_budget_also_charges_undershooting():
    m = CANet(cfg_(budget_shape="two_sided", flop_target=0.9))
    logits = torch.zeros(4, m.cfg.num_routes)
    logits[:, 0] = 50                                  # all on the smallest route
    ls = m.logit_losses(logits)
    assert float(ls["budget"]) == pytest.approx(0.9 - float(m.route_ratio[0]), rel=1e-5)
    assert float(CANet(cfg_(flop_target=0.9)).logit_losses(logits)["budget"]) == 0


def test_holdout_guide_keeps_the_last_target_out_of_the_ce():
    """Same weights and random draws: the holdout model's CE is the default
    model's CE on targets whose last label is removed."""
    cfg = cfg_(guide_signal="holdout")
    torch.manual_seed(0)
    held = CANet(cfg).train()
    plain = CANet(cfg_()).train()
    plain.load_state_dict(held.state_dict())
    items, lengths, targets = batch(cfg)
    cut = targets.clone()
    cut[torch.arange(len(lengths)), lengths - 1] = 0
    torch.manual_seed(1)
    _, a = held.loss(items, lengths, targets)
    torch.manual_seed(1)
    _, b = plain.loss(items, lengths, cut)
    torch.manual_seed(1)
    _, c = plain.loss(items, lengths, targets)
    assert a["ce"] == pytest.approx(b["ce"], abs=1e-6)
    assert a["ce"] != pytest.approx(c["ce"], abs=1e-6)


def test_sandwich_labels_train():
    m = CANet(cfg_(guide_labels="sandwich")).train()
    items, lengths, targets = batch(m.cfg)
    loss, st = m.loss(items, lengths, targets)
    loss.backward()
    assert math.isfinite(st["guide"]) and m.router.head.weight.grad.abs().sum() > 0


def test_user_stats_and_router_reading_them():
    items = torch.tensor([[3, 3, 3, 0], [1, 2, 3, 4]])
    lengths = torch.tensor([3, 4])
    s = user_stats(items, lengths, 4)
    torch.testing.assert_close(s[:, 1], torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(s[:, 0], torch.log1p(lengths.float()) / math.log1p(4))
    m = CANet(cfg_(router_stats=True, max_len=4)).eval()
    logits = m.router(items, lengths)
    assert logits.shape == (2, m.cfg.num_routes)
    # the features reach the logits
    m.router.stats.bias.data += 1.0
    assert not torch.allclose(m.router(items, lengths), logits)


def test_tau_anneals_geometrically():
    m = CANet(cfg_(tau=1.0, tau_end=0.1))
    m.anneal(0.0)
    assert m.tau == pytest.approx(1.0)
    m.anneal(0.5)
    assert m.tau == pytest.approx(0.1 ** 0.5)
    m.anneal(1.0)
    assert m.tau == pytest.approx(0.1)
    still = CANet(cfg_())
    still.anneal(1.0)
    assert still.tau == 1.0 and still.noise == 1.0


def test_noise_annealed_to_zero_samples_the_argmax():
    m = CANet(cfg_(noise_end=0.0)).train()
    items, lengths, _ = batch(m.cfg)
    m.anneal(0.5)
    assert m.noise == pytest.approx(0.5)
    m.anneal(1.0)
    rt = m.route(items, lengths)
    assert torch.equal(rt.routes, rt.logits.argmax(-1))
    assert torch.all(rt.gate == 1)
    rt.gate.sum().backward()                           # straight-through gradient
    assert m.router.head.weight.grad.abs().sum() > 0


def test_distill_off_is_the_plain_loss_and_refuses_bad_values():
    torch.manual_seed(0)
    plain = CANet(cfg_()).train()
    zero = CANet(cfg_(distill=0.0)).train()
    zero.load_state_dict(plain.state_dict())
    items, lengths, targets = batch(plain.cfg)
    torch.manual_seed(1)
    a, sa = plain.loss(items, lengths, targets)
    torch.manual_seed(1)
    b, sb = zero.loss(items, lengths, targets)
    assert float(a.detach()) == float(b.detach()) and "distill" not in sa and "distill" not in sb
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="distill"):
            cfg_(distill=bad)


@pytest.mark.parametrize("path", ["routed", "masked"])
@pytest.mark.parametrize("last_only", [False, True])
def test_distill_adds_the_max_routes_ce_and_kl(path, last_only):
    """With the same draws, distill's loss is the plain loss + the max
    route's CE + distill * KL; the KL is 0 where every sample is on the max
    route, and its gradient reaches the router and the supernet."""
    torch.manual_seed(0)
    m = CANet(cfg_(distill=0.5)).train()
    plain = CANet(cfg_()).train()
    plain.load_state_dict(m.state_dict())
    items, lengths, targets = batch(m.cfg)
    if last_only:
        targets = targets[torch.arange(len(lengths)), lengths - 1]
    torch.manual_seed(1)
    loss, st = m.loss(items, lengths, targets, path=path)
    torch.manual_seed(1)
    base, _ = plain.loss(items, lengths, targets, path=path)
    top = m.fixed_routes(len(lengths))
    _, ref = plain.loss(items, lengths, targets, routes=top, path=path)
    assert math.isfinite(st["distill"]) and st["distill"] > 0
    assert st["ce_max"] == pytest.approx(ref["ce"], rel=1e-5)
    want = float(base.detach()) + st["ce_max"] + 0.5 * st["distill"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    if last_only:   # the KL pairs each sample's routed logits with its own max-route ones
        torch.manual_seed(1)
        picked = m.route(items, lengths).routes
        with torch.no_grad():
            kl = torch.nn.functional.kl_div(
                m.last_scores(items, lengths, picked, path=path).log_softmax(-1),
                m.last_scores(items, lengths, top, path=path).log_softmax(-1),
                reduction="batchmean", log_target=True)
        assert len(set(picked.tolist())) > 1
        assert st["distill"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    loss.backward()
    assert m.router.head.weight.grad.abs().sum() > 0
    assert m.net.item_emb.weight.grad.abs().sum() > 0
    # all samples on the max route: the routed logits are the teacher's
    m.zero_grad()
    m.router.head.bias.data[:] = -1e4
    m.router.head.bias.data[m.cfg.max_route] = 1e4
    m.cfg.noise_end = 0.0
    m.anneal(1.0)
    _, st = m.loss(items, lengths, targets, path=path)
    assert st["distill"] == pytest.approx(0.0, abs=1e-5)
