"""CANet model: masked (paper) vs routed (canet ops) parity of outputs,
gradients and training; router, losses, FLOP budget."""
from __future__ import annotations

import math

import pytest
import torch

import canet_kernels  # noqa: F401  registers the ops
from canet_kernels import _library, functional, reference
from canet_kernels.model import CANet, CANetConfig, encoder

KERNELS = all(_library.has_kernel(op, "CPU") for op in (
    "sliced_linear", "sliced_attention_fwd", "sliced_ffn_fwd", "sliced_add_layernorm_fwd"))


from helpers import one_thread  # noqa: E402,F401  (autouse fixture)


@pytest.fixture(autouse=True)
def ops_backend(monkeypatch):
    """The routed path runs the compiled CPU ops; the plain-PyTorch
    references stand in only where the library lacks a CPU kernel."""
    if not KERNELS:
        monkeypatch.setattr(encoder, "ops", reference)
    yield


def test_routed_path_runs_the_compiled_ops():
    if not KERNELS:
        pytest.skip("canet has no CPU kernel for every op yet")
    assert encoder.ops is functional


def tiny_cfg(**kw):
    base = dict(n_items=40, max_len=12, emb_widths=(8, 12, 16), hidden_widths=(8, 16),
                depths=(1, 2, 3), num_heads=2, dropout=0.0, router_width=8,
                router_heads=2, router_ffn=16, flop_target=0.5)
    base.update(kw)
    return CANetConfig(**base)


def batch(cfg, B=9, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = L or cfg.max_len
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    lengths[1] = 1
    pos = torch.arange(L)
    pad = pos[None] >= lengths[:, None]
    items = torch.randint(1, cfg.n_items + 1, (B, L), generator=g).masked_fill(pad, 0)
    targets = torch.randint(1, cfg.n_items + 1, (B, L), generator=g).masked_fill(pad, 0)
    routes = torch.randint(0, cfg.num_routes, (B,), generator=g)
    if B > 3:
        routes[2] = cfg.max_route
        routes[3] = 0
    return items, lengths, targets, routes


def model(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = CANet(cfg).to(dtype)
    # non-trivial LayerNorm affine, biases and residual scales (initialised
    # near 0, which would hide every sublayer) so slicing mistakes show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("res_scale"):
                p.copy_(0.5 + torch.rand_like(p))
            if n.endswith(("_b", "b1", "b2", "b_o", "b_qkv", "b_p", "b_out")) or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def grads(m):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in m.named_parameters()}


def assert_close_dicts(a, b, atol, rtol=0.0):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


# ------------------------------------------------------------------ parity --

def test_forward_parity_fixed_routes_fp64():
    cfg = tiny_cfg()
    m = model(cfg).eval()
    items, lengths, _, routes = batch(cfg)
    hr = m.hidden(items, lengths, routes, path="routed")
    hm = m.hidden(items, lengths, routes, path="masked")
    valid = (torch.arange(items.shape[1])[None] < lengths[:, None])[..., None]
    torch.testing.assert_close(hr, hm * valid, atol=1e-12, rtol=0)
    # zero beyond each sample's hidden width
    d = m.route_hid[routes]
    beyond = torch.arange(cfg.D)[None, None, :] >= d[:, None, None]
    assert (hr.masked_select(beyond) == 0).all()
    sr = m.last_scores(items, lengths, routes, path="routed")
    sm = m.last_scores(items, lengths, routes, path="masked")
    torch.testing.assert_close(sr, sm, atol=1e-12, rtol=0)


def test_every_route_matches_fp64():
    cfg = tiny_cfg()
    m = model(cfg).eval()
    items, lengths, _, _ = batch(cfg, B=4)
    for r in range(cfg.num_routes):
        routes = m.fixed_routes(4, r)
        torch.testing.assert_close(m.last_scores(items, lengths, routes, path="routed"),
                                   m.last_scores(items, lengths, routes, path="masked"),
                                   atol=1e-12, rtol=0, msg=f"route {r}")


def test_gradient_parity_fixed_routes_fp64():
    cfg = tiny_cfg()
    m = model(cfg)
    items, lengths, targets, routes = batch(cfg)
    out = {}
    for path in ("routed", "masked"):
        m.zero_grad(set_to_none=True)
        loss, _ = m.loss(items, lengths, targets, routes=routes, path=path)
        loss.backward()
        out[path] = (loss.detach(), grads(m))
    torch.testing.assert_close(out["routed"][0], out["masked"][0], atol=1e-12, rtol=0)
    assert_close_dicts(out["routed"][1], out["masked"][1], atol=1e-11)
    # the router is bypassed with fixed routes
    assert all((g == 0).all() for n, g in out["routed"][1].items() if n.startswith("router."))


def test_gradient_parity_with_router_fp64():
    """Training mode with the router: same Gumbel draws, same losses and
    gradients (router included) on both paths."""
    cfg = tiny_cfg()
    m = model(cfg).train()
    items, lengths, targets, _ = batch(cfg)
    out = {}
    for path in ("routed", "masked"):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss, stats = m.loss(items, lengths, targets, path=path)
        loss.backward()
        out[path] = (stats, grads(m))
    for k in out["routed"][0]:
        assert math.isclose(out["routed"][0][k], out["masked"][0][k],
                            rel_tol=1e-9, abs_tol=1e-12), k
    assert_close_dicts(out["routed"][1], out["masked"][1], atol=1e-11)
    router = [g for n, g in out["routed"][1].items() if n.startswith("router.")]
    assert any(g.abs().sum() > 0 for g in router)
    # the straight-through gate reaches the router's head through the CE too
    assert out["routed"][1]["router.head.weight"].abs().sum() > 0


def loss_and_grads(m, items, lengths, targets, routes):
    """{path: (loss, parameter gradients)} for the routed and masked paths."""
    res = {}
    for path in ("routed", "masked"):
        m.zero_grad(set_to_none=True)
        loss, _ = m.loss(items, lengths, targets, routes=routes, path=path)
        loss.backward()
        res[path] = (loss.detach(), grads(m))
    return res


def test_parity_fp32():
    cfg = tiny_cfg()
    m = model(cfg, torch.float32)
    res = loss_and_grads(m, *batch(cfg))
    torch.testing.assert_close(res["routed"][0], res["masked"][0], atol=1e-5, rtol=1e-5)
    assert_close_dicts(res["routed"][1], res["masked"][1], atol=2e-5, rtol=1e-4)


def test_routed_training_tracks_masked_training():
    """A few Adam steps from the same init (router, Gumbel noise and all):
    the routed path's losses follow the masked path's."""
    cfg = tiny_cfg(flop_target=0.3, budget_weight=0.5)
    items, lengths, targets, _ = batch(cfg, B=16, seed=1)
    curves = {}
    for path in ("routed", "masked"):
        m = model(cfg, torch.float32, seed=7).train()
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        torch.manual_seed(99)
        losses = []
        for _ in range(6):
            loss, st = m.loss(items, lengths, targets, path=path)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(st["loss"])
        curves[path] = losses
    for a, b in zip(curves["routed"], curves["masked"]):
        assert abs(a - b) < 1e-3 * max(1.0, abs(b)), (curves["routed"], curves["masked"])
    assert curves["routed"][-1] < curves["routed"][0]


# ---------------------------------------------------------------- routing --

def test_inference_routes_are_deterministic():
    cfg = tiny_cfg(dropout=0.2)
    m = model(cfg, torch.float32).eval()
    items, lengths, _, _ = batch(cfg)
    s1, r1 = m(items, lengths)
    s2, r2 = m(items, lengths)
    assert torch.equal(r1, r2) and torch.equal(s1, s2)
    torch.testing.assert_close(r1, m.router(items, lengths).argmax(-1))


def test_training_routes_are_one_hot_gates():
    cfg = tiny_cfg()
    m = model(cfg, torch.float32).train()
    items, lengths, _, _ = batch(cfg)
    routing = m.route(items, lengths)
    torch.testing.assert_close(routing.gate, torch.ones_like(routing.gate))
    assert routing.gate.requires_grad


def test_caller_order_is_kept():
    """Scores come back in the caller's order, whatever the route sort."""
    cfg = tiny_cfg()
    m = model(cfg).eval()
    items, lengths, _, routes = batch(cfg)
    full = m.last_scores(items, lengths, routes)
    for b in range(items.shape[0]):
        one = m.last_scores(items[b:b + 1], lengths[b:b + 1], routes[b:b + 1])
        torch.testing.assert_close(one[0], full[b], atol=1e-12, rtol=0)


# ------------------------------------------------------------ FLOPs, loss --

def test_flop_ratios():
    cfg = tiny_cfg()
    ratios = cfg.route_flop_ratios()
    assert ratios[-1] == 1.0 and min(ratios) == ratios[0]
    e, d, L = cfg.routes()[0]
    n, N = cfg.max_len, cfg.n_items + 1
    by_hand = n * (2 * e * d + L * (8 * d * d + 16 * d * d)) + L * 4 * d * n * (n + 1) / 2 \
        + 2 * d * N
    assert cfg.route_flops()[0] == pytest.approx(by_hand)
    # deeper is dearer at equal widths
    table = cfg.routes()
    for i, (e, d, L) in enumerate(table[:-1]):
        if table[i + 1][:2] == (e, d):
            assert ratios[i + 1] > ratios[i]


def test_uniform_and_guide_losses():
    cfg = tiny_cfg()
    m = model(cfg)
    R = cfg.num_routes
    uniform = torch.full((4, R), 1.0 / R, dtype=torch.float64)
    assert encoder.uniform_loss(uniform).abs() < 1e-12
    peaked = torch.zeros(4, R, dtype=torch.float64)
    peaked[:, 0] = 1
    assert encoder.uniform_loss(peaked) == pytest.approx(math.log(R))
    # guide: a hit is cheaper for a router that prefers the smallest route
    small = torch.full((1, R), 1e-6, dtype=torch.float64)
    small[0, 0] = 1
    small = small / small.sum()
    big = small.flip(-1)
    hit, miss = torch.tensor([True]), torch.tensor([False])
    assert encoder.guide_loss(cfg, small, hit) < encoder.guide_loss(cfg, big, hit)
    assert encoder.guide_loss(cfg, big, miss) < encoder.guide_loss(cfg, small, miss)


def test_budget_penalty_pulls_flops_down():
    """With a low target, the budget term alone drives the router's expected
    FLOP ratio down."""
    cfg = tiny_cfg(flop_target=0.1, budget_weight=5.0, guide_weight=0.0,
                   uniform_weight=0.0)
    m = model(cfg, torch.float32).train()
    items, lengths, targets, _ = batch(cfg, B=16)
    opt = torch.optim.Adam(m.router.parameters(), lr=2e-2)
    torch.manual_seed(0)
    first = last = None
    for _ in range(15):
        loss, st = m.loss(items, lengths, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = st["exp_ratio"] if first is None else first
        last = st["exp_ratio"]
    assert last < first - 0.1
    # no penalty once under the target
    cfg2 = tiny_cfg(flop_target=1.0)
    m2 = model(cfg2, torch.float32).train()
    _, st = m2.loss(items, lengths, targets)
    assert st["budget"] == 0.0


def test_recommend_masks_padding_and_seen():
    cfg = tiny_cfg()
    m = model(cfg, torch.float32).eval()
    items, lengths, _, _ = batch(cfg, B=3)
    top, _, _ = m.recommend(items, lengths, k=cfg.n_items - cfg.max_len, mask_seen=True)
    for b in range(3):
        seen = set(items[b, :lengths[b]].tolist())
        assert 0 not in top[b].tolist()
        assert not seen & set(top[b].tolist())


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        tiny_cfg(hidden_widths=(10, 16), num_heads=4)
    with pytest.raises(ValueError, match="flop_target"):
        tiny_cfg(flop_target=1.5)
    cfg = tiny_cfg()
    assert CANetConfig.from_dict(cfg.to_dict()) == cfg
    assert tiny_cfg(residual_scale_init=0.0).residual_scale_init is None  # plain post-LN


def test_bad_batches_are_refused():
    cfg = tiny_cfg()
    m = model(cfg, torch.float32).eval()
    items, lengths, _, routes = batch(cfg, B=4)
    with pytest.raises(ValueError, match="lengths must lie"):
        m(items, lengths * 0)
    long = torch.ones(4, cfg.max_len + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_len"):
        m(long, torch.full((4,), cfg.max_len + 1))
    with pytest.raises(ValueError, match="path"):
        m.last_scores(items, lengths, routes, path="dense")


def test_router_reads_the_last_position_of_a_full_layer():
    """The router computes one query per user; that equals running its
    transformer layer over every position and reading the last one."""
    import torch.nn.functional as F
    cfg = tiny_cfg(router_width=16, router_heads=4)
    m = model(cfg)
    r = m.router.eval()
    with torch.no_grad():
        for p in r.parameters():
            p.add_(0.1 * torch.randn_like(p))
    items, lengths, _, _ = batch(cfg)
    B, L = items.shape
    H, W = cfg.router_heads, cfg.router_width
    pos = torch.arange(L)
    h = r.item_emb(items) + r.pos_emb(pos)[None]
    valid = pos[None] < lengths[:, None]
    q, k, v = r.qkv(h).view(B, L, 3, H, W // H).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    h = r.ln1(h + r.out(ctx.transpose(1, 2).reshape(B, L, W)))
    h = r.ln2(h + r.ff2(F.gelu(r.ff1(h))))
    full = r.head(h[torch.arange(B), lengths - 1])
    torch.testing.assert_close(r(items, lengths), full, atol=1e-12, rtol=0)


def test_cost_bias_calibration_meets_the_target():
    cfg = tiny_cfg()
    m = CANet(cfg).double()
    ratio = m.route_ratio
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, cfg.num_routes, generator=g, dtype=torch.float64)

    def mean(c):
        return float(ratio[m.pick(logits, c)].mean())

    # argmax above the target: the smallest non-negative bias that meets it
    big = logits + 3 * ratio
    target = 0.5 * float(ratio[m.pick(big, 0.0)].mean())
    c = m.calibrate_cost_bias(big, target)
    assert c > 0 and float(m.cost_bias) == c
    assert float(ratio[m.pick(big, c)].mean()) <= target
    assert float(ratio[m.pick(big, 0.99 * c)].mean()) > target
    # argmax below the target: left alone, or moved up to it with spend
    target = min(1.0, 1.5 * mean(0.0))
    assert mean(0.0) <= target
    assert m.calibrate_cost_bias(logits, target) == 0.0
    c = m.calibrate_cost_bias(logits, target, spend=True)
    assert c < 0 and mean(c) <= target < mean(1.01 * c)


def test_route_value_loss_trains_the_router_only():
    """The router regresses centred per-route losses measured on the
    supernet: its gradient reaches the router alone, and a few router steps
    bring its centred logits towards the measured values."""
    cfg = tiny_cfg()
    m = model(cfg, torch.float32).train()
    items, lengths, targets, _ = batch(cfg, B=16)
    last = targets[torch.arange(16), lengths - 1]
    cand = torch.tensor([0, 3, 7, cfg.max_route])
    loss = m.route_value_loss(items, lengths, last, cand)
    loss.backward()
    assert all(p.grad is None for p in m.net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.router.parameters())
    opt = torch.optim.Adam(m.router.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = m.route_value_loss(items, lengths, last, cand)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
