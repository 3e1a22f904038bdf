"""Training on several processes: `canet train` under torchrun.

    torchrun --nproc-per-node 2 --standalone -m canet_kernels.cli train ...

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; a run
without them (or with WORLD_SIZE=1) sets nothing up and runs as before
(`Context()` does nothing). With several processes:

- data: every step takes the batch a single process would take (the same
  shuffle generator on every rank) and splits it into WORLD_SIZE parts; rank
  r trains on part r. The generator advances as in one process, so a run
  resumes on any number of processes.
- model: router and supernet train as one DistributedDataParallel module;
  a step's gradient is the mean of the ranks' gradients.
- evaluation: users are split into contiguous blocks, one per rank; metric
  sums and counts are all-reduced, routes all-gathered, so the numbers are
  a single process's.
- checkpoints: always the unsharded layout, written by rank 0 only.
- `--shard-items` (`ShardedTable`): the output layer's item rows are split
  over the ranks; scoring runs per shard and is combined across ranks.

The process group is gloo on the CPU and NCCL with `--device cuda` (one GPU
per process, LOCAL_RANK); CPU-side collectives (metric sums) then travel
through the process's GPU.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import batches
from .metrics import METRICS, rank_metrics

CHUNK = 4096  # item rows scored at once: memory O(rows * CHUNK), never O(rows * items)


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_main() -> bool:
    """True on rank 0 or without torchrun (readable before `init`)."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device="cpu") -> tuple[int, int]:
    """(rank, world size). Joins the process group torchrun's environment
    variables describe (once per process) when WORLD_SIZE > 1."""
    world = env_world()
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return 0, 1
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start "
                         "the processes with torchrun (see README, Several processes)")
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank's contiguous block of n rows (sizes differ by <= 1)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def _comm_device(t):
    """Where a collective on t runs: NCCL takes CUDA tensors only, so CPU
    tensors (metric sums, shapes) travel through the process's GPU."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def gather_rows(t, group=None, fill=0):
    """(cat over ranks in rank order of t [n_r, ...], [n_r per rank]). The
    n_r and trailing sizes may differ between ranks (padded with `fill`)."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return t, [t.shape[0]]
    dev = _comm_device(t)
    shape = torch.tensor(t.shape, dtype=torch.int64, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    top = torch.stack(shapes).max(0).values.tolist()
    padded = t.new_full(top, fill, device=dev)
    padded[tuple(slice(0, s) for s in t.shape)] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    sizes = [int(s[0]) for s in shapes]
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device), sizes


def _all_reduce(t, op=dist.ReduceOp.SUM, group=None):
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dev = _comm_device(t)
        u = t if dev == t.device else t.to(dev)
        dist.all_reduce(u, op, group=group)
        if u is not t:
            t.copy_(u)
    return t


class Context:
    """This process's part of a run: rank, world size and, with
    --shard-items, the sharded output table. The default is a single
    process, for which every method leaves things as they are."""

    def __init__(self, rank=0, world=1, table=None):
        self.rank, self.world, self.table = rank, world, table

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------- data --
    def train_batches(self, n, batch_size, gen):
        """The single-process batches (global index tensors). One smaller
        than the world is repeated so that every rank gets a row: every rank
        must step as often as the others."""
        out = batches(n, batch_size, gen)
        if self.world > 1:
            out = [b.repeat(math.ceil(self.world / len(b)))[:max(len(b), self.world)]
                   for b in out]
        return out

    def part(self, n):
        """This rank's rows of a global batch of n rows."""
        if self.world == 1:
            return slice(None)
        return slice(*block(n, self.rank, self.world))

    def user_batches(self, n, batch_size):
        """Batches over this rank's block of n evaluation users. With a
        sharded table every rank must score as often as the others (the
        table's collectives), so short blocks get empty batches."""
        lo, hi = block(n, self.rank, self.world)
        out = [b + lo for b in batches(hi - lo, batch_size)]
        if self.table is not None:
            most = math.ceil(math.ceil(n / self.world) / batch_size)
            out += [torch.zeros(0, dtype=torch.int64)] * (most - len(out))
        return out

    def seed_epoch(self, seed, epoch):
        """Different dropout and Gumbel noise per rank, the same for the same
        (seed, epoch, rank): a resumed run draws what it would have drawn.
        One process keeps its own RNG stream, as before."""
        if self.world > 1:
            torch.manual_seed(seed * 1_000_003 + epoch * 1009 + self.rank)

    # ----------------------------------------------------------- model --
    def wrap(self, step):
        """DistributedDataParallel around the step module (several ranks).
        Routes differ per rank and the router sits out the warm-up, so some
        parameters get no gradient on some ranks: find_unused_parameters.
        A parameter unused on every rank keeps grad None, and Adam skips
        it, as in one process. The shards of a sharded table are not
        all-reduced (each rank owns its rows)."""
        if self.world == 1:
            return step
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.table is not None:
            DDP._set_params_and_buffers_to_ignore_for_model(
                step, [f"model.{n}" for n in self.table.names])
        # every buffer is a constant or set identically on every rank
        return DDP(step, find_unused_parameters=True, forward_sync_buffers=False)

    def clip_grad_norm(self, params, max_norm):
        """clip_grad_norm_ over all parameters; a sharded table's norm is the
        norm over every rank's rows."""
        params = [p for p in params if p.grad is not None]
        if self.table is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        own = {id(p) for p in self.table.params}
        norms = [torch.linalg.vector_norm(p.grad) for p in params if id(p) not in own]
        for p in self.table.params:
            if p.grad is not None:
                sq = _all_reduce(torch.linalg.vector_norm(p.grad).square(),
                                 group=self.table.group)
                norms.append(sq.sqrt())
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef)
        return total

    def full_table(self, opt=None):
        """Context manager: the whole output table (and its optimizer state)
        in place while saving or loading unsharded weights."""
        return self.table.gathered(opt) if self.table is not None \
            else contextlib.nullcontext()

    # --------------------------------------------------- communication --
    def mean_stats(self, sums: dict, nb: int) -> dict:
        """Per-batch means of training statistics over every rank's batches."""
        if self.world == 1:
            return {k: v / max(nb, 1) for k, v in sums.items()}
        keys = sorted(sums)
        t = _all_reduce(torch.tensor([sums[k] for k in keys] + [nb], dtype=torch.float64))
        return {k: float(v) / max(float(t[-1]), 1.0) for k, v in zip(keys, t[:-1])}

    def reduce_metrics(self, acc, ks):
        """All-reduces a MetricAccumulator's sums and count: the means are
        then those of every user, as in one process."""
        if self.world == 1:
            return
        keys = sorted(f"{m}@{k}" for m in METRICS for k in ks)
        t = torch.tensor([acc.sums.get(k, 0.0) for k in keys] + [acc.count],
                         dtype=torch.float64)
        _all_reduce(t)
        acc.sums = {k: float(v) for k, v in zip(keys, t[:-1])}
        acc.count = int(t[-1])

    def gather(self, t):
        """t [n_r, ...] of every rank, concatenated in rank order."""
        return gather_rows(t)[0] if self.world > 1 else t

    def max(self, x: float) -> float:
        if self.world == 1:
            return x
        return float(_all_reduce(torch.tensor([x], dtype=torch.float64),
                                 dist.ReduceOp.MAX)[0])

    def broadcast_model(self, model):
        """Rank 0's parameters and buffers to every rank."""
        if self.world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, 0)

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def check_shard_items(model_cfg, tcfg):
    """What --shard-items does not cover, as errors naming the option."""
    if model_cfg.tie_embeddings:
        raise ValueError("--shard-items shards the output layer; with --tie-embeddings "
                         "there is none (the input item table scores)")
    if tcfg.path != "routed":
        raise ValueError(f"--shard-items needs --path routed, got {tcfg.path!r}")
    if tcfg.router_mode != "canet":
        raise ValueError(f"--shard-items needs --router-mode canet, got {tcfg.router_mode!r}")


def setup(model, opt, shard_items=False, device="cpu") -> Context:
    """The process group (under torchrun; NCCL for a CUDA `device`, gloo
    otherwise) and, with shard_items, the model's output layer cut to this
    rank's rows. Call after loading a checkpoint (checkpoints hold the whole
    table)."""
    rank, world = init(device)
    table = ShardedTable(model, opt, rank, world) if shard_items else None
    return Context(rank, world, table)


# --------------------------------------------------------- sharded table --

def _masked(h, widths):
    """Rows zeroed beyond their width: a full-width product then equals the
    product at each row's width."""
    return h * (torch.arange(h.shape[1], device=h.device) < widths[:, None])


class ShardedTable:
    """The output layer (net.w_out [n_items + 1, D], net.b_out) row-sharded:
    rank r keeps items [lo, hi) in the same Parameters (cut in place, so the
    optimizer keeps them). Rows to score are all-gathered, each rank scores
    them against its items in chunks and the results are combined: a
    log-sum-exp from per-shard maxima and sums, target scores from the owning
    shard, ranks from per-shard counts, top-k from per-shard top-k. Its
    collectives run in their own process group, so that they never interleave
    with DistributedDataParallel's all-reduces."""

    names = ("net.w_out", "net.b_out")

    def __init__(self, model, opt, rank, world):
        net = model.net
        if net.w_out is None:
            raise ValueError("--shard-items needs a separate output layer (not "
                             "--tie-embeddings)")
        self.rows = net.w_out.shape[0]
        if self.rows < world:
            raise ValueError(f"--shard-items: {self.rows} item rows cannot be split over "
                             f"{world} processes")
        self.params = (net.w_out, net.b_out)
        self.rank, self.world = rank, world
        self.lo, self.hi = block(self.rows, rank, world)
        self.group = dist.new_group() if world > 1 else None
        self.opt = opt
        self._cut()

    @property
    def weight(self):
        return self.params[0]

    @property
    def bias(self):
        return self.params[1]

    def _cut(self):
        """Keep rows [lo, hi) of the (full) table and its optimizer state."""
        for p in self.params:
            p.data = p.data[self.lo:self.hi].clone()
            for k, v in (self.opt.state.get(p, {}) if self.opt else {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape[0] == self.rows:
                    self.opt.state[p][k] = v[self.lo:self.hi].clone()

    @contextlib.contextmanager
    def gathered(self, opt=None):
        """The whole table (and optimizer state) in place inside the block;
        cut back to this rank's rows after it (from what is there then, so a
        load inside the block takes effect)."""
        opt = opt or self.opt
        for p in self.params:
            p.data = gather_rows(p.data, self.group)[0]
            for k, v in (opt.state.get(p, {}) if opt else {}).items():
                if torch.is_tensor(v) and v.dim():
                    opt.state[p][k] = gather_rows(v, self.group)[0]
        try:
            yield
        finally:
            self._cut()

    def unshard(self):
        """The whole table in place from now on (no longer sharded)."""
        for p in self.params:
            p.data = gather_rows(p.data, self.group)[0]
        self.lo, self.hi = 0, self.rows

    def _chunks(self):
        n = self.hi - self.lo
        for c in range(0, n, CHUNK):
            yield c, min(c + CHUNK, n)

    def _logits(self, H, c0, c1):
        return F.linear(H, self.weight[c0:c1], self.bias[c0:c1])

    def _target_logits(self, H, T):
        """Score of each row's target item from the shard that owns it [N]."""
        own = (T >= self.lo) & (T < self.hi)
        out = H.new_zeros(H.shape[0])
        i = own.nonzero().squeeze(1)
        j = T[i] - self.lo
        out[i] = (H[i] * self.weight[j]).sum(1) + self.bias[j]
        return _all_reduce(out, group=self.group)

    # ------------------------------------------------------------ loss --
    def cross_entropy(self, h, widths, targets):
        """Per-row cross-entropy [N] of this rank's rows h [N, D] at widths
        [N] against all items of every shard; differentiable in h and the
        shard. The shard's gradient is the mean over ranks, as
        DistributedDataParallel gives the replicated parameters."""
        return _ShardedCE.apply(h, widths, targets, self.weight, self.bias, self)

    # ------------------------------------------------------ evaluation --
    @torch.no_grad()
    def count_ahead(self, h, widths, targets, seen=None, strict=False):
        """For this rank's rows: how many other items score >= (strict: >)
        the target, over all shards, with the padding item 0 and each row's
        `seen` ids [N, H] scored -inf (a seen or 0 target scores -inf too),
        as metrics.target_rank counts on the full scores."""
        H, _ = gather_rows(_masked(h, widths), self.group)
        T, sizes = gather_rows(targets, self.group)
        S = gather_rows(seen, self.group)[0] if seen is not None else None
        t = self._target_logits(H, T)
        off = (T == 0) if S is None else (T == 0) | (S == T[:, None]).any(1)
        t[off] = float("-inf")
        count = torch.zeros(H.shape[0], dtype=torch.int64, device=H.device)
        rows = torch.arange(H.shape[0], device=H.device)
        for c0, c1 in self._chunks():
            s = self._logits(H, c0, c1)
            lo = self.lo + c0
            if lo == 0:
                s[:, 0] = float("-inf")
            if S is not None:
                r, k = ((S >= lo) & (S < self.lo + c1)).nonzero(as_tuple=True)
                s[r, S[r, k] - lo] = float("-inf")
            mine = (T >= lo) & (T < self.lo + c1)
            s[rows[mine], T[mine] - lo] = float("nan")      # the target itself never counts
            count += (s > t[:, None]).sum(1) if strict else (s >= t[:, None]).sum(1)
        _all_reduce(count, group=self.group)
        start = sum(sizes[:self.rank])
        return count[start:start + h.shape[0]]

    def ranking(self, model, items, lengths, routes, targets, ks, seen=None, path="routed"):
        """(per-user metric values as metrics.full_ranking gives them, routes)
        of a batch; every rank calls it as often as the others (a rank
        without users passes an empty batch)."""
        if items.shape[0]:
            last, routes, widths = last_hidden(model, items, lengths, routes, path)
        else:
            last = self.weight.new_zeros(0, self.weight.shape[1])
            routes = widths = torch.zeros(0, dtype=torch.int64)
        rank = self.count_ahead(last, widths, targets, seen)
        return rank_metrics(rank.to(torch.float64), ks), routes

    @torch.no_grad()
    def topk(self, h, widths, k, exclude=None):
        """(values, item ids) [N, k] of this rank's rows over all shards:
        sliced_linear_topk per shard, all-gathered and merged (score
        descending, lower id first on ties, as the op orders them). exclude
        [N, M]: ids scored -inf, padded with -1."""
        smallest = self.rows // self.world
        if not 1 <= k <= smallest:
            raise ValueError(f"k must be in [1, {smallest}] (the smallest shard), got {k}")
        H, sizes = gather_rows(h, self.group)
        Wd = gather_rows(widths, self.group)[0]
        ex = None
        if exclude is not None:
            E = gather_rows(exclude, self.group, fill=-1)[0]
            mine = (E >= self.lo) & (E < self.hi)
            ex = torch.where(mine, E - self.lo, torch.full_like(E, -1))
        v, i = torch.ops.canet.sliced_linear_topk(H, Wd, self.weight, self.bias, k, CHUNK, ex)
        i = i + self.lo
        if self.world > 1:
            vs, is_ = [torch.empty_like(v) for _ in range(self.world)], \
                [torch.empty_like(i) for _ in range(self.world)]
            dist.all_gather(vs, v, group=self.group)
            dist.all_gather(is_, i, group=self.group)
            v, i = torch.cat(vs, 1), torch.cat(is_, 1)
            by_id = i.argsort(1)
            v, i = v.gather(1, by_id), i.gather(1, by_id)
            best = v.argsort(dim=1, descending=True, stable=True)[:, :k]
            v, i = v.gather(1, best), i.gather(1, best)
        start = sum(sizes[:self.rank])
        return v[start:start + h.shape[0]], i[start:start + h.shape[0]]


def last_hidden(model, items, lengths, routes=None, path="routed"):
    """(last-position hidden states [B, D], route ids [B], hidden widths [B])
    of a right-padded batch in eval mode: CANet.forward without the scoring."""
    net = model.net
    x, lengths, left = net.layout(items, lengths)
    if routes is None:
        routes = model.route(x, lengths).routes
    r, _ = net.resolve_routes(routes, x.shape[0], x.device)
    _, last = net.encode(x, lengths, left, r, None, path, True, hidden=False)
    return last, routes, r.hidden


class _ShardedCE(torch.autograd.Function):
    """Cross-entropy over a row-sharded table (see ShardedTable.cross_entropy).

    Forward: every rank scores all ranks' rows against its items, chunk by
    chunk, keeping a running max and sum of exp per row; all-reduced they
    give the log-sum-exp; the target logit comes from the owning shard.
    Backward recomputes each chunk's softmax: the shard's gradient from all
    rows, and each row's gradient summed over the shards."""

    @staticmethod
    def forward(ctx, h, widths, targets, weight, bias, table):
        H, sizes = gather_rows(_masked(h, widths).detach(), table.group)
        T, _ = gather_rows(targets, table.group)
        N = H.shape[0]
        m = H.new_full((N,), float("-inf"))
        s = H.new_zeros(N)
        for c0, c1 in table._chunks():
            z = table._logits(H, c0, c1)
            m_new = torch.maximum(m, z.max(1).values)
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m = m_new
        M = _all_reduce(m.clone(), dist.ReduceOp.MAX, table.group)
        lse = M + torch.log(_all_reduce(s * torch.exp(m - M), group=table.group))
        loss = lse - table._target_logits(H, T)
        ctx.save_for_backward(H, T, lse, widths)
        ctx.table, ctx.sizes = table, sizes
        start = sum(sizes[:table.rank])
        return loss[start:start + h.shape[0]]

    @staticmethod
    def backward(ctx, grad):
        H, T, lse, widths = ctx.saved_tensors
        table = ctx.table
        G, _ = gather_rows(grad.contiguous(), table.group)
        gW = torch.zeros_like(table.weight)
        gb = torch.zeros_like(table.bias)
        gH = torch.zeros_like(H)
        rows = torch.arange(H.shape[0], device=H.device)
        for c0, c1 in table._chunks():
            p = torch.exp(table._logits(H, c0, c1) - lse[:, None])      # softmax over all shards
            lo = table.lo + c0
            mine = (T >= lo) & (T < table.lo + c1)
            p[rows[mine], T[mine] - lo] -= 1.0
            p *= G[:, None]
            gW[c0:c1] = p.T @ H
            gb[c0:c1] = p.sum(0)
            gH += p @ table.weight[c0:c1]
        _all_reduce(gH, group=table.group)
        start = sum(ctx.sizes[:table.rank])
        gh = _masked(gH[start:start + grad.shape[0]], widths)
        world = table.world
        return gh, None, None, gW / world, gb / world, None
