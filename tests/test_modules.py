"""The module layer (RoutedLayer, RoutedEncoder, DenseEncoder, CANetEncoder)
and CANet's contract for host code, checked against a plain SASRec written
without canet's model code (tests/plain_sasrec.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import canet_kernels  # noqa: F401  registers the ops
from canet_kernels.model import (CANet, CANetConfig, CANetEncoder, DenseEncoder,
                                 RoutedEncoder, RoutedLayer)

import plain_sasrec
from helpers import one_thread  # noqa: E402,F401  (autouse fixture)


def cfg_(**kw):
    base = dict(n_items=30, max_len=9, emb_widths=(8, 16), hidden_widths=(8, 12, 16),
                depths=(1, 3), num_heads=2, dropout=0.0, router_width=8,
                router_heads=2, router_ffn=16, flop_target=0.5)
    base.update(kw)
    return CANetConfig(**base)


def perturb(m):
    """Non-trivial biases, LayerNorm affines and residual scales (initialised
    near 0, which would hide every sublayer) so slicing mistakes show."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("res_scale"):
                p.copy_(0.5 + torch.rand_like(p))
            elif p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m


def make(cls, cfg, seed=0):
    torch.manual_seed(seed)
    return perturb(cls(cfg).double()).eval()


def right_batch(cfg, B=6, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = L or cfg.max_len
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0], lengths[1] = L, 1
    pos = torch.arange(L)
    items = torch.randint(1, cfg.n_items + 1, (B, L), generator=g)
    return items.masked_fill(pos[None] >= lengths[:, None], 0), lengths


def to_left(items, lengths):
    L = items.shape[1]
    out = torch.zeros_like(items)
    for b, n in enumerate(lengths.tolist()):
        out[b, L - n:] = items[b, :n]
    return out


# ------------------------------------------------ against a plain SASRec --

@pytest.mark.parametrize("tied", [False, True])
def test_every_route_matches_a_plain_sasrec(tied):
    """Every route's hidden states and scores equal a plain SASRec at that
    route's widths and depth (catches a dropped residual scale, a wrong
    slice or head split, a missing layer)."""
    cfg = cfg_(tie_embeddings=tied)
    m = make(CANet, cfg)
    state = m.state_dict()
    items, lengths = right_batch(cfg)
    for r, (e, d, k) in enumerate(cfg.routes()):
        routes = m.fixed_routes(items.shape[0], r)
        h = m.hidden(items, lengths, routes)
        s = m.last_scores(items, lengths, routes)
        for b, n in enumerate(lengths.tolist()):
            ref = plain_sasrec.one_user(state, items[b, :n].tolist(), e, d, k,
                                        cfg.num_heads)
            torch.testing.assert_close(h[b, :n, :d], ref, atol=1e-10, rtol=0)
            assert (h[b, :, d:] == 0).all() and (h[b, n:] == 0).all()
            torch.testing.assert_close(s[b], plain_sasrec.scores(state, ref[-1], d),
                                       atol=1e-10, rtol=0)


def test_routed_layer_module_matches_the_plain_layer():
    torch.manual_seed(0)
    layer = perturb(RoutedLayer(16, num_heads=2, residual_scale_init=0.3).double())
    x = torch.randn(7, 16, dtype=torch.float64)
    cu = torch.tensor([0, 4, 7])
    widths = torch.tensor([16, 8])
    x[4:, 8:] = 0
    y = layer(x, cu, widths)
    state = {f"net.layers.0.{n}": v for n, v in layer.state_dict().items()}
    for b, (s, e, d) in enumerate(((0, 4, 16), (4, 7, 8))):
        # plain_sasrec starts from embeddings; feed the layer input directly
        ref = _plain_layers_from(state, x[s:e, :d], d, 1, 2)
        torch.testing.assert_close(y[s:e, :d], ref, atol=1e-10, rtol=0)
        assert (y[s:e, d:] == 0).all()


def _plain_layers_from(state, h, d, k, heads):
    """plain_sasrec's layers on a given input (identity embeddings)."""
    n = h.shape[0]
    eye = {"net.item_emb.weight": torch.zeros(1, d, dtype=h.dtype),
           "net.pos_emb.weight": h,
           "net.w_p": torch.eye(d, dtype=h.dtype), "net.b_p": torch.zeros(d, dtype=h.dtype)}
    return plain_sasrec.one_user({**state, **eye}, [0] * n, d, d, k, heads)


# --------------------------------------------------------------- layout ----

def test_left_right_lengths_mask_and_id_padding_agree():
    cfg = cfg_()
    enc = make(RoutedEncoder, cfg)
    items, lengths = right_batch(cfg)
    routes = torch.tensor([0, 5, 3, 2, 1, 4])
    ref = enc(items, lengths, routes)
    left = to_left(items, lengths)
    L = items.shape[1]
    pos = torch.arange(L)
    variants = [
        enc(items, None, routes),                                   # id 0 = padding
        enc(items, routes=routes, padding_mask=pos[None] >= lengths[:, None]),
        enc(left, lengths, routes, left_padded=True),
        enc(left, None, routes),
        enc(left, routes=routes, padding_mask=pos[None] < (L - lengths)[:, None]),
    ]
    for i, out in enumerate(variants):
        torch.testing.assert_close(out.last, ref.last, atol=1e-12, rtol=0, msg=str(i))
        h = out.hidden if i < 2 else torch.stack(
            [torch.cat([out.hidden[b, L - n:], out.hidden[b, :L - n]])
             for b, n in enumerate(lengths.tolist())])
        torch.testing.assert_close(h, ref.hidden, atol=1e-12, rtol=0, msg=str(i))
    # zeros at padding, in the caller's layout
    out = variants[2]
    assert all((out.hidden[b, :L - n] == 0).all() for b, n in enumerate(lengths.tolist()))
    # last = the hidden state of the last real position
    torch.testing.assert_close(ref.last, ref.hidden[torch.arange(6), lengths - 1])
    assert ref.route_ids.tolist() == routes.tolist()
    assert ref.routes.hidden.tolist() == [cfg.routes()[r][1] for r in routes.tolist()]


def test_masked_path_and_dense_encoder():
    cfg = cfg_()
    enc = make(RoutedEncoder, cfg)
    items, lengths = right_batch(cfg)
    left = to_left(items, lengths)
    routes = torch.tensor([0, 5, 3, 2, 1, 4])
    for x, kw in ((items, {}), (left, {"left_padded": True})):
        a = enc(x, lengths, routes, **kw)
        b = enc(x, lengths, routes, path="masked", **kw)
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-12, rtol=0)
        torch.testing.assert_close(a.last, b.last, atol=1e-12, rtol=0)
    dense = DenseEncoder(cfg).double()
    dense.load_state_dict(enc.state_dict())
    torch.testing.assert_close(dense(items, lengths).hidden,
                               enc(items, lengths, torch.full((6,), cfg.max_route)).hidden)


def test_routes_as_widths_and_embeddings_in():
    cfg = cfg_()
    enc = make(RoutedEncoder, cfg)
    items, lengths = right_batch(cfg)
    routes = torch.tensor([0, 5, 3, 2, 1, 4])
    ref = enc(items, lengths, routes)
    table = torch.tensor(cfg.routes())[routes]
    by_widths = enc(items, lengths, (table[:, 0], table[:, 1], table[:, 2]))
    torch.testing.assert_close(by_widths.hidden, ref.hidden, atol=0, rtol=0)
    emb = enc.item_emb(items)
    by_emb = enc(embeddings=emb, lengths=lengths, routes=routes)
    torch.testing.assert_close(by_emb.hidden, ref.hidden, atol=1e-12, rtol=0)


def test_bad_inputs_get_clear_errors():
    cfg = cfg_()
    enc = RoutedEncoder(cfg)
    items, lengths = right_batch(cfg)
    left = to_left(items, lengths)
    cases = [
        (dict(items=items.clone().fill_(cfg.n_items + 1), lengths=lengths), "ids must lie"),
        (dict(items=items.float(), lengths=lengths), "integer item ids"),
        (dict(items=enc.item_emb(items), lengths=lengths), "embeddings="),
        (dict(items=left, lengths=lengths), "left_padded=True"),
        (dict(items=items, lengths=lengths[:3]), "lengths must be"),
        (dict(items=items, lengths=lengths + 20), "lengths must lie"),
        (dict(items=torch.tensor([[0, 3, 0, 4]])), "contiguous"),
        (dict(items=items, lengths=lengths, routes=torch.full((6,), 99)), "routes: ids"),
        (dict(items=items, lengths=lengths, routes=(8, 9, 1)), "divisible"),
        (dict(embeddings=torch.randn(6, cfg.max_len, 3), lengths=lengths), "last dim"),
        (dict(items=torch.ones(2, cfg.max_len + 1, dtype=torch.long)), "max_len"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            enc(**kw)


# ------------------------------------------------------- host contract ----

def test_router_gets_a_gradient_through_the_gate():
    """With every auxiliary weight at 0, the router learns only through the
    straight-through gate on the hidden states."""
    cfg = cfg_(guide_weight=0.0, uniform_weight=0.0, budget_weight=0.0)
    m = make(CANet, cfg).train()
    items, lengths = right_batch(cfg)
    targets = torch.randint(1, cfg.n_items + 1, (6,))
    loss, _ = m.loss(items, lengths, targets)
    loss.backward()
    g = [p.grad for p in m.router.parameters() if p.grad is not None]
    assert g and sum(float(x.abs().sum()) for x in g) > 0


def test_loss_scores_labelled_positions_only():
    """CE over labelled positions equals the CE of full scoring at every
    position ([B, L] targets) or the last one ([B] targets), computed from
    hidden states and the output layer by hand."""
    cfg = cfg_()
    m = make(CANet, cfg)
    items, lengths = right_batch(cfg)
    routes = torch.tensor([0, 5, 3, 2, 1, 4])
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(1, cfg.n_items + 1, items.shape, generator=g)
    targets = targets.masked_fill(items == 0, 0)
    targets[2, 0] = 0                                # an unlabelled real position
    h = m.hidden(items, lengths, routes)
    logits = h @ m.net.w_out.T + m.net.b_out
    full = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    for path in ("routed", "masked"):
        loss, _ = m.loss(items, lengths, targets, routes=routes, path=path)
        torch.testing.assert_close(loss, full, atol=1e-12, rtol=0)
    last_t = targets[torch.arange(6), lengths - 1].clamp_min(1)
    last = F.cross_entropy(logits[torch.arange(6), lengths - 1], last_t)
    loss, _ = m.loss(items, lengths, last_t, routes=routes)
    torch.testing.assert_close(loss, last, atol=1e-12, rtol=0)
    # left padding gives the same loss
    loss_l, _ = m.loss(to_left(items, lengths), lengths, last_t, routes=routes,
                       left_padded=True)
    torch.testing.assert_close(loss_l, last, atol=1e-12, rtol=0)


def test_host_adds_router_losses_to_its_own_loss():
    cfg = cfg_(tie_embeddings=True)
    enc = make(CANetEncoder, cfg).train()
    items, lengths = right_batch(cfg)
    out = enc(items, lengths)
    assert out.logits is not None and out.gate is not None
    target = torch.randint(1, cfg.n_items + 1, (6,))
    hit = enc.smallest_route_hits(items, lengths, target)
    ls = enc.router_losses(out, hit)
    assert set(ls) >= {"uniform", "budget", "guide"}
    probs = torch.softmax(out.logits, -1)
    mean = probs.mean(0)
    R = cfg.num_routes
    torch.testing.assert_close(ls["uniform"], (mean * torch.log(mean * R)).sum())
    host = F.cross_entropy(enc.tied_scores(out.last), target)     # tied BPR/CE alike
    total = host + enc.router_loss(out, hit)
    total.backward()
    assert enc.router.head.weight.grad.abs().sum() > 0
    enc.eval()
    assert enc(items, lengths).gate is None
    assert float(enc.router_loss(enc(items, lengths, torch.zeros(6, dtype=torch.long)))) == 0


def test_calibrate_takes_any_batches():
    cfg = cfg_(flop_target=0.3)
    enc = make(CANetEncoder, cfg)
    items, lengths = right_batch(cfg, B=12)
    left = to_left(items, lengths)
    batches = [(items[:6], lengths[:6]), (left[6:], None)]
    c = enc.calibrate(batches)
    ratio = enc.route_ratio[enc(items, lengths).route_ids].mean()
    assert float(ratio) <= 0.3 + 1e-9
    assert c == float(enc.cost_bias)


def test_readme_module_example_runs():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
              if "canet_kernels.modules import" in b]
    assert blocks, "README lost its module example"
    for b in blocks:
        exec(compile(b, "README.md", "exec"), {})
