"""Run by tests/test_distributed.py under torchrun (2 gloo processes): the
row-sharded output table against the full table on the same rows, and
DistributedDataParallel's handling of parameters no rank used. Exits
non-zero (an AssertionError) on a mismatch."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from canet_kernels import distributed as cd
from canet_kernels.metrics import mask_scores, target_rank
from canet_kernels.model import CANet, CANetConfig
from canet_kernels.data import EvalSet
from canet_kernels.train import _Step, evaluate

torch.set_num_threads(1)
cd.CHUNK = 5                       # several chunks per shard
rank, world = cd.init()
assert world == 2, world


def check(name, a, b, tol=1e-5):
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    print(f"rank {rank} {name}: max error {err:.1e}")
    assert err <= tol, f"rank {rank} {name}: max error {err} > {tol}"


cfg = CANetConfig(n_items=37, max_len=8, emb_widths=(8, 16), hidden_widths=(8, 16),
                  depths=(1, 2), num_heads=2, router_width=8, router_heads=2,
                  router_ffn=16)
torch.manual_seed(0)
ref = CANet(cfg)                   # the full table, on every rank
model = copy.deepcopy(ref)
table = cd.ShardedTable(model, torch.optim.Adam(model.parameters()), rank, world)
assert (table.lo, table.hi) == ((0, 19), (19, 38))[rank]

# the same global rows on every rank; each rank takes its block (7 / 6 rows)
g = torch.Generator().manual_seed(1)
N, D = 13, cfg.D
H = torch.randn(N, D, generator=g)
W = torch.tensor([8, 16])[torch.randint(2, (N,), generator=g)]
T = torch.randint(1, cfg.n_items + 1, (N,), generator=g)
part = slice(*cd.block(N, rank, world))

# cross-entropy: per-row losses, and gradients with DDP's convention (the
# mean over ranks of each rank's mean loss)
h = H[part].clone().requires_grad_()
loss = table.cross_entropy(h, W[part], T[part])
loss.mean().backward()
Href = H.clone().requires_grad_()
full = F.cross_entropy(ref.net.score_rows(Href, W), T, reduction="none")
check("loss rows", loss, full[part])
(sum(full[slice(*cd.block(N, r, world))].mean() for r in range(world)) / world).backward()
check("grad h", h.grad / world, Href.grad[part])
check("grad w_out", table.weight.grad, ref.net.w_out.grad[table.lo:table.hi])
check("grad b_out", table.bias.grad, ref.net.b_out.grad[table.lo:table.hi])

# ranks for the metrics: seen items masked, some targets among them
with torch.no_grad():
    seen = torch.randint(0, cfg.n_items + 1, (N, 4), generator=g)
    seen[::4, 0] = T[::4]
    scores = ref.net.score_rows(H, W)
    want = target_rank(mask_scores(scores, seen), T)
    got = table.count_ahead(H[part], W[part], T[part], seen[part])
    assert torch.equal(got, want[part]), (got, want[part])
    # the guide's count: items strictly above the target, item 0 excluded
    s = scores.clone()
    s[:, 0] = float("-inf")
    above = (s > s.gather(1, T[:, None])).sum(1)
    assert torch.equal(table.count_ahead(H[part], W[part], T[part], strict=True), above[part])
    # top-k: per shard, merged
    ex = torch.randint(-1, cfg.n_items + 1, (N, 3), generator=g)
    v_ref, i_ref = torch.ops.canet.sliced_linear_topk(H, W, ref.net.w_out, ref.net.b_out,
                                                     4, 4096, ex)
    v, i = table.topk(H[part], W[part], 4, ex[part])
    assert torch.equal(i, i_ref[part]), (i, i_ref[part])
    check("top-k values", v, v_ref[part])

# evaluate() with the sharded table: 3 users, one per batch, so rank 1
# passes an empty batch while rank 0 scores its second user
es = EvalSet(items=torch.tensor([[5, 9, 0], [7, 0, 0], [3, 4, 8]]),
             lengths=torch.tensor([2, 1, 3]), targets=torch.tensor([9, 36, 2]),
             seen=torch.tensor([[5, 9, 0], [7, 0, 0], [3, 4, 8]]), users=torch.arange(3))
for mask in (False, True):
    want = evaluate(ref, es, (1, 5), mask, batch_size=1)
    got = evaluate(model, es, (1, 5), mask, batch_size=1,
                   dist=cd.Context(rank, world, table))
    assert got["route_counts"] == want["route_counts"]
    for k in ("hr@1", "ndcg@5", "recall@5"):
        assert abs(got[k] - want[k]) < 1e-12, (k, got[k], want[k])

# a training step: CANet.loss through the sharded table (router on)
B, L = 10, 8
lengths = torch.randint(1, L + 1, (B,), generator=g)
pos = torch.arange(L)[None] < lengths[:, None]
items = torch.randint(1, cfg.n_items + 1, (B, L), generator=g) * pos
targets = torch.randint(1, cfg.n_items + 1, (B, L), generator=g) * pos
bpart = slice(*cd.block(B, rank, world))
for m in (ref, model):
    m.train()
    m.zero_grad(set_to_none=True)
torch.manual_seed(5 + rank)
want, want_st = ref.loss(items[bpart], lengths[bpart], targets[bpart])
torch.manual_seed(5 + rank)
got, got_st = model.loss(items[bpart], lengths[bpart], targets[bpart], table=table)
check("step loss", got, want)
assert want_st.keys() == got_st.keys()
want.backward()
got.backward()
sharded = dict(zip(cd.ShardedTable.names, table.params))
for name, p in ref.named_parameters():
    q = dict(model.named_parameters())[name]
    if name in sharded:          # the shard's gradient is already the mean over ranks
        gref = p.grad.clone()
        dist.all_reduce(gref)
        check(f"grad {name}", q.grad, (gref / world)[table.lo:table.hi])
    elif p.grad is None:
        assert q.grad is None, name
    else:
        check(f"grad {name}", q.grad, p.grad)

# DDP: a parameter no rank used keeps grad None (Adam then skips it, as in
# one process); one used by one rank gets half its gradient.
m2 = copy.deepcopy(ref)
m2.zero_grad(set_to_none=True)
step = cd.Context(rank, world).wrap(_Step(m2))
depth1 = [r for r, (e, d, k) in enumerate(cfg.routes()) if k == 1][0]
routes = torch.full((B // world,), depth1)
if rank == 1:
    routes[0] = cfg.max_route    # the second layer runs on rank 1 only
x, n, t = items[bpart][: B // world], lengths[bpart][: B // world], targets[bpart][: B // world]
loss2, _ = step(x, n, t, routes, "routed")
loss2.backward()
assert all(p.grad is None for p in m2.router.parameters()), "router grads"
m3 = copy.deepcopy(ref)
m3.zero_grad(set_to_none=True)
if rank == 1:
    m3.loss(x, n, t, routes=routes)[0].backward()
    check("half grad", m2.net.layers[1].w1.grad, m3.net.layers[1].w1.grad / 2, 1e-6)
# the whole table back in place (train() returns such a model)
table.unshard()
assert torch.equal(model.net.w_out, ref.net.w_out) and model.net.b_out.shape == (38,)
# no rank leaves while another still waits on it (that aborts the waiting one)
dist.barrier()
print(f"rank {rank} ok")
