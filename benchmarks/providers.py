"""The providers every benchmark compares, on one weight dict.

A backbone provider runs the post-LN layer stack
    a = attn(x); x = LN1(a + x); f = ffn(x); x = LN2(f + x)
for a batch whose sample b runs at hidden width widths[b] (head dim
widths[b] / heads, FFN inner ratio * widths[b], LayerNorm over the first
widths[b] features, the leading block W[:out, :in] of every weight) and only
its first depths[b] layers. Input: a right-padded batch x[B, L, D] in the
caller's order, zero beyond each sample's width. Each provider returns its
own native output (what the next stage of a model would read) and converts
it to [B, L, D] with `padded` for comparisons.

  dense        the max-size stack (width D, every layer) in plain PyTorch:
               F.linear, F.scaled_dot_product_attention(is_causal), F.layer_norm
  masked       the official CANet formulation (canet_kernels.functional's
               masked_layer): full width and every layer for every sample;
               outputs zero-masked beyond each width, per-head feature masks
               (head dim w/h), rows frozen past each depth
  loop         one padded sub-batch per route (width, depth), sliced weights
  bucket       sort by route once, then one plain-PyTorch call per width
               bucket and op on packed rows (attention padded per bucket)
  canet-cpu    canet's layer (functional.routed_layer) on a route plan:
               route-sorted packed batch, layer l on the active prefix
               (routing.run_layers)
  canet-cuda   the same on CUDA tensors through torch.ops.canet (CUDA C++
               kernels where built, Triton for the rest)
  canet-triton the same through the canet_kernels.triton launchers
               (ops.KernelOps: torch.ops.canet's autograd, whatever kernels
               the dispatcher serves)
  reference    the same with canet_kernels.reference (slow; tests only)

The strongest plain-PyTorch variants of the dense and bucket models:
  dense-compile, dense-compile-max-autotune, bucket-compile
               torch.compile (inductor; dynamic=False, fullgraph=True) of
               dense_stack and of Bucket's tensor work, mode "default" or
               "max-autotune-no-cudagraphs"; compiled once per shape (and
               bucket layout) on the first call
  dense-graphs, dense-compile-graphs, bucket-compile-graphs
               (CUDA) the forward captured in a CUDA graph on its first call
               with given weights and batch, replayed after (`Graphed`)
Training steps as a user runs them (forward, loss, backward, AdamW over the
weight leaves, optionally the whole step in one CUDA graph): `TrainStep`.

Right padding makes causal attention exact for real tokens: a real token
never sees a padded one, so the padded providers need no key mask.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import canet_kernels  # noqa: F401  registers torch.ops.canet
from canet_kernels import functional as CF
from canet_kernels import reference as REF
from canet_kernels.ops import shared_plans
from canet_kernels.routing import (gather_tokens, plan_routes, run_layers,
                                   run_masked_layers, token_index)

EPS = 1e-5
WIDTHS = (64, 96, 128)
DEPTHS = (2, 4, 6, 8)
HEADS = 4
RATIO = 4


# --------------------------------------------------------------- inputs ----

def make_weights(D: int = 128, layers: int = 8, ratio: int = RATIO, heads: int = HEADS,
                 dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Random weights of a max-size stack (same for every provider)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale)

    out = []
    for _ in range(layers):
        p = dict(w_qkv=r(3, D, D, scale=D ** -0.5), b_qkv=r(3, D, scale=0.02),
                 w_o=r(D, D, scale=D ** -0.5), b_o=r(D, scale=0.02),
                 ln1_w=1 + r(D, scale=0.1), ln1_b=r(D, scale=0.05),
                 w1=r(ratio * D, D, scale=D ** -0.5), b1=r(ratio * D, scale=0.02),
                 w2=r(D, ratio * D, scale=(ratio * D) ** -0.5), b2=r(D, scale=0.02),
                 ln2_w=1 + r(D, scale=0.1), ln2_b=r(D, scale=0.05))
        out.append({k: v.to(dtype=dtype, device=device) for k, v in p.items()})
    return {"D": D, "ratio": ratio, "heads": heads, "layers": out}


def trainable(weights: dict) -> dict:
    """A copy whose tensors are leaves that require grad."""
    return {**weights, "layers": [{k: v.detach().clone().requires_grad_()
                                   for k, v in p.items()} for p in weights["layers"]]}


def weight_tensors(weights: dict) -> list:
    return [v for p in weights["layers"] for v in p.values()]


@dataclass
class Batch:
    x: torch.Tensor          # [B, L, D] caller order, zero beyond width and padding
    lengths: torch.Tensor    # [B] int64, right padding
    widths: torch.Tensor     # [B] int64
    depths: torch.Tensor     # [B] int64

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def L(self) -> int:
        return self.x.shape[1]

    def valid(self) -> torch.Tensor:
        """[B, L, 1] bool: real tokens."""
        pos = torch.arange(self.L, device=self.x.device)
        return (pos[None, :] < self.lengths[:, None])[..., None]

    def to(self, device=None, dtype=None) -> "Batch":
        return Batch(self.x.to(device=device, dtype=dtype), self.lengths.to(device),
                     self.widths.to(device), self.depths.to(device))

    def tokens(self) -> int:
        return int(self.lengths.sum())


# Route mixes over (hidden width, depth). "trained" stands in for what a
# router trained with a FLOP budget produces: most users on small, shallow
# routes and a tail on the big ones (mean backbone FLOP ratio 0.27 at 50
# tokens). `load_route_mix` replaces it with a measured distribution.
DEFAULT_TRAINED_MIX = {
    (64, 2): 0.22, (64, 4): 0.16, (64, 6): 0.06, (64, 8): 0.04,
    (96, 2): 0.12, (96, 4): 0.10, (96, 6): 0.05, (96, 8): 0.03,
    (128, 2): 0.07, (128, 4): 0.06, (128, 6): 0.04, (128, 8): 0.05,
}
MIXES = ("uniform", "all-max", "all-min", "trained")


def load_route_mix(path: str) -> dict:
    """A route distribution {(width, depth): share} from a file.

    Accepted: JSON {"routes": [{"hidden": d, "depth": L, "share" | "users": x},
    ...]} (embedding widths are summed out); JSON {"route_counts": [...]}
    indexed like CANetConfig.routes() (emb x hidden x depth, the paper's
    sets unless a "config" entry says otherwise), as `evaluate` returns it.
    """
    with open(path) as f:
        data = json.load(f)
    mix: dict = {}
    if "routes" in data:
        for r in data["routes"]:
            key = (int(r["hidden"]), int(r["depth"]))
            mix[key] = mix.get(key, 0.0) + float(r.get("share", r.get("users", 0)))
    elif "route_counts" in data:
        from canet_kernels.model.config import CANetConfig
        cfg = CANetConfig(n_items=1, **data.get("config", {}))
        if len(data["route_counts"]) != cfg.num_routes:
            raise ValueError(f"{path}: {len(data['route_counts'])} route counts for "
                             f"{cfg.num_routes} routes (give the model's 'config')")
        for (e, d, L), c in zip(cfg.routes(), data["route_counts"]):
            mix[(d, L)] = mix.get((d, L), 0.0) + float(c)
    else:
        raise ValueError(f"{path}: expected a 'routes' or 'route_counts' entry")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"{path}: the route distribution is empty")
    return {k: v / total for k, v in mix.items() if v > 0}


def sample_routes(B: int, mix="uniform", seed: int = 0, D: int = 128, layers: int = 8):
    """(widths, depths) [B] int64 for a route mix name or a {(w, L): p} dict."""
    g = torch.Generator().manual_seed(seed)
    widths = [w for w in WIDTHS if w <= D] or [D]
    depths = [d for d in DEPTHS if d <= layers] or [layers]
    if mix == "all-max":
        return torch.full((B,), max(widths)), torch.full((B,), max(depths))
    if mix == "all-min":
        return torch.full((B,), min(widths)), torch.full((B,), min(depths))
    if mix == "uniform":
        wi = torch.randint(len(widths), (B,), generator=g)
        di = torch.randint(len(depths), (B,), generator=g)
        return torch.tensor(widths)[wi], torch.tensor(depths)[di]
    table = DEFAULT_TRAINED_MIX if mix == "trained" else mix
    keys = list(table)
    p = torch.tensor([table[k] for k in keys], dtype=torch.float64)
    idx = torch.multinomial(p, B, replacement=True, generator=g)
    wd = torch.tensor(keys, dtype=torch.int64)[idx]
    return wd[:, 0].contiguous(), wd[:, 1].contiguous()


def make_batch(widths, depths, seq_len: int, D: int = 128, lengths=None,
               dtype=torch.float32, device="cpu", seed: int = 0) -> Batch:
    """Random hidden states [B, seq_len, D], zero beyond each width and at
    padding (lengths default to seq_len for every sample)."""
    g = torch.Generator().manual_seed(seed + 1)
    widths = torch.as_tensor(widths, dtype=torch.int64)
    depths = torch.as_tensor(depths, dtype=torch.int64)
    B = widths.shape[0]
    if lengths is None:
        lengths = torch.full((B,), seq_len, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    x = torch.randn(B, seq_len, D, generator=g)
    feat = torch.arange(D)
    pos = torch.arange(seq_len)
    x = x * (feat[None, None, :] < widths[:, None, None]) \
        * (pos[None, :, None] < lengths[:, None, None])
    return Batch(x.to(device=device, dtype=dtype), lengths.to(device),
                 widths.to(device), depths.to(device))


# ---------------------------------------------------- plain-PyTorch parts --

def _qkv_weight(p, w):
    """[3w, w] and [3w] for one fused Q/K/V F.linear at width w."""
    D = p["w_o"].shape[0]
    if w == D:
        return p["w_qkv"].reshape(3 * D, D), p["b_qkv"].reshape(3 * D)
    return p["w_qkv"][:, :w, :w].reshape(3 * w, w), p["b_qkv"][:, :w].reshape(3 * w)


def padded_attention(x, p, w, heads):
    """Attention sublayer on a padded [b, n, w] batch at width w."""
    b, n, _ = x.shape
    wq, bq = _qkv_weight(p, w)
    qkv = F.linear(x, wq, bq).view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
    ctx = ctx.transpose(1, 2).reshape(b, n, w)
    return F.linear(ctx, p["w_o"][:w, :w], p["b_o"][:w])


def ffn(x, p, w, ratio):
    r = ratio * w
    h = F.gelu(F.linear(x, p["w1"][:r, :w], p["b1"][:r]))
    return F.linear(h, p["w2"][:w, :r], p["b2"][:w])


def add_ln(a, x, p, key, w):
    return F.layer_norm(a + x, (w,), p[key + "_w"][:w], p[key + "_b"][:w], EPS)


def padded_layer(x, p, w, heads, ratio):
    """One post-LN layer on a padded [b, n, w] batch, leading blocks at w."""
    x = add_ln(padded_attention(x, p, w, heads), x, p, "ln1", w)
    return add_ln(ffn(x, p, w, ratio), x, p, "ln2", w)


def dense_stack(x, W):
    """The max-size stack on a padded [B, L, D] batch: every layer at width D."""
    for p in W["layers"]:
        x = padded_layer(x, p, W["D"], W["heads"], W["ratio"])
    return x


def routed_stack(ops, plan, h, W):
    """canet's routed stack on packed rows h [T, D] in `plan` order: layer l
    (functional.routed_layer through `ops`) on the samples deeper than l."""
    def layer(p, h, cu, w):
        return CF.routed_layer(h, cu, w, p, W["heads"], W["ratio"], EPS, ops=ops)
    with shared_plans():   # as the model runs it: one tile plan per route layout
        return run_layers(plan, h, W["layers"], layer)


def routed_forward(h, W, plan):
    """routed_stack through torch.ops.canet: what torch.compile traces (the
    ops stay opaque kernels; inductor fuses what lies between them)."""
    return routed_stack(CF, plan, h, W)


def routed_loss(h, W, plan):
    return routed_forward(h, W, plan).float().square().mean()


# ------------------------------------------------------------- backbones --

class Provider:
    name = "?"
    kind = "pytorch"

    def available(self, device) -> tuple[bool, str]:
        return True, ""

    def forward(self, W: dict, batch: Batch):
        raise NotImplementedError

    def padded(self, out, batch: Batch) -> torch.Tensor:
        return out

    def loss(self, out) -> torch.Tensor:
        """A scalar over the native output (training steps)."""
        if isinstance(out, (list, tuple)) and not torch.is_tensor(out):
            return sum(self.loss(o) for o in out)
        return out.float().square().mean()


class Dense(Provider):
    name = "dense"

    def forward(self, W, batch):
        return dense_stack(batch.x, W)


class Masked(Provider):
    name = "masked"

    def forward(self, W, batch):
        m = CF.MaskedContext(batch.widths, W["heads"], W["D"], W["ratio"], batch.L,
                             batch.x.dtype)
        return run_masked_layers(batch.x, batch.depths, W["layers"],
                                 lambda p, h: CF.masked_layer(h, p, m, EPS))


class LoopRoutes(Provider):
    """One sub-batch per distinct (width, depth) route, dense PyTorch on it."""
    name = "loop"

    def forward(self, W, batch):
        routes = (batch.widths * 1000 + batch.depths).tolist()
        groups: dict = {}
        for i, r in enumerate(routes):
            groups.setdefault(r, []).append(i)
        lens = batch.lengths.tolist()
        out = []
        for r, ids in groups.items():
            w, d = divmod(r, 1000)
            idx = torch.tensor(ids, device=batch.x.device)
            n = max(lens[i] for i in ids)
            x = batch.x.index_select(0, idx)[:, :n, :w]
            for p in W["layers"][:d]:
                x = padded_layer(x, p, w, W["heads"], W["ratio"])
            out.append((idx, x))
        return out

    def padded(self, out, batch):
        y = batch.x.new_zeros(batch.x.shape)
        for idx, x in out:
            y[idx, :x.shape[1], :x.shape[2]] = x
        return y * batch.valid()

    def loss(self, out):
        return sum(x.float().square().mean() for _, x in out)


class Bucket(Provider):
    """Sort by (width, depth desc) once; each width bucket is a contiguous
    block of packed rows kept at its own width, and every op is one plain
    PyTorch call per bucket on the active prefix of its rows.

    `layout(batch)` does the sorting and index building (Python lists and
    index tensors); `run(W, x, layout)` is the tensor work on it, a pure
    function of x, W and the layout (what `bucket-compile` compiles)."""
    name = "bucket"

    def forward(self, W, batch):
        return self.run(W, batch.x, self.layout(batch))

    @staticmethod
    def layout(batch: Batch) -> tuple:
        """((width, rows, per-layer ((b, t, n, pad_rows), ...)), ...) per
        width bucket: `rows` the flat [B * L] indices of the bucket's tokens
        in packed order, and for each layer the number b of its samples still
        active (depths sorted descending), their row count t, their longest
        length n and the rows of a padded [b, n] attention input (None when
        all b samples have length n: a view suffices). Ints and tensors only,
        so a compiled `run` specialises on it."""
        widths, depths, lengths = (t.tolist() for t in
                                   (batch.widths, batch.depths, batch.lengths))
        order = sorted(range(batch.B), key=lambda i: (-widths[i], -depths[i]))
        dev = batch.x.device
        groups = []
        s = 0
        while s < len(order):
            w = widths[order[s]]
            e = s
            while e < len(order) and widths[order[e]] == w:
                e += 1
            ids = order[s:e]
            rows = token_index(batch.lengths, batch.L,
                               order=torch.tensor(ids, device=dev))
            lens = [lengths[i] for i in ids]
            deps = [depths[i] for i in ids]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            layers = []
            for l in range(max(deps)):
                b = sum(1 for d in deps if d > l)
                n = max(lens[:b])
                pad = None
                if any(v != n for v in lens[:b]):
                    pad = token_index(torch.tensor(lens[:b], device=dev), n)
                layers.append((b, cu[b], n, pad))
            groups.append((w, rows, tuple(layers)))
            s = e
        return tuple(groups)

    def run(self, W, x, layout):
        """[(rows, hidden [T_w, w]) per bucket] for the padded x [B, L, D]."""
        return list(zip([g[1] for g in layout], _bucket_hidden(x, W, layout)))

    @staticmethod
    def _attention(x, p, w, heads, lens):
        """Attention on packed rows of one bucket: a view when every sample
        has the same length, else padded through one index_copy."""
        n = max(lens)
        pad = None
        if any(v != n for v in lens):
            pad = token_index(torch.tensor(lens, device=x.device), n)
        return _bucket_attention(x, p, w, heads, len(lens), n, pad)

    def padded(self, out, batch):
        B, L, D = batch.x.shape
        y = batch.x.new_zeros(B * L, D)
        for rows, x in out:
            y[rows, :x.shape[1]] = x
        return y.view(B, L, D)

    def loss(self, out):
        return sum(x.float().square().mean() for _, x in out)


def _bucket_attention(x, p, w, heads, b, n, pad):
    """Attention on the packed rows x [T, w] of b samples, the longest n
    tokens long; `pad` (rows of a padded [b, n] batch) or None (all n long)."""
    if pad is None:
        return padded_attention(x.view(b, n, w), p, w, heads).reshape(-1, w)
    xp = x.new_zeros(b * n, w).index_copy(0, pad, x).view(b, n, w)
    return padded_attention(xp, p, w, heads).reshape(-1, w).index_select(0, pad)


def _bucket_hidden(x, W, layout):
    """Bucket's tensor work: the output rows of every width bucket."""
    flat = x.reshape(-1, x.shape[-1])
    heads, ratio = W["heads"], W["ratio"]
    out = []
    for w, rows, layers in layout:
        h = flat[:, :w].index_select(0, rows)                          # [T_w, w]
        for p, (b, t, n, pad) in zip(W["layers"], layers):
            ha = h[:t]
            ha = add_ln(_bucket_attention(ha, p, w, heads, b, n, pad), ha, p, "ln1", w)
            ha = add_ln(ffn(ha, p, w, ratio), ha, p, "ln2", w)
            h = ha if t == h.shape[0] else torch.cat([ha, h[t:]])
        out.append(h)
    return out


def _bucket_loss(x, W, layout):
    return sum(h.float().square().mean() for h in _bucket_hidden(x, W, layout))


def _dense_loss(x, W):
    return dense_stack(x, W).float().square().mean()


class Canet(Provider):
    """canet's layer on a route plan; `ops` has the op functions
    functional.routed_layer calls (functional's signatures)."""

    def __init__(self, name="canet-cpu", ops=CF, kind="canet", device_type="cpu"):
        self.name, self.ops, self.kind, self.device_type = name, ops, kind, device_type

    def available(self, device):
        dev = torch.device(device).type
        if dev != self.device_type:
            return False, f"{self.name} runs on {self.device_type} tensors"
        return True, ""

    def forward(self, W, batch):
        plan = plan_routes(batch.lengths, batch.widths, batch.depths,
                           num_layers=len(W["layers"]))
        h = gather_tokens(batch.x, batch.lengths, plan)                  # [T, D]
        return routed_stack(self.ops, plan, h, W), plan

    def padded(self, out, batch):
        h, plan = out
        return CF.unpack(h, plan.lengths, batch.L)[plan.inverse]

    def loss(self, out):
        return out[0].float().square().mean()


# ------------------------------------------------------ triton launchers --

def triton_ops():
    """(ops or None, reason): the canet_kernels.triton launchers with
    torch.ops.canet's autograd (ops.KernelOps), explicitly Triton whatever
    kernels the dispatcher would pick (C++ ones for CPU tensors, and the CUDA
    C++ kernels of canet-cuda)."""
    try:
        import canet_kernels.triton as kt
    except Exception as exc:  # noqa: BLE001  triton missing or broken
        return None, f"canet_kernels.triton does not import ({exc})"
    from canet_kernels.ops import KernelOps
    return KernelOps(kt.KERNELS), "ok"


class CanetTriton(Canet):
    def __init__(self):
        super().__init__("canet-triton", None, "canet", "cuda")

    def available(self, device):
        ok, why = super().available(device)
        if not ok and not (os.environ.get("TRITON_INTERPRET") == "1"
                           and torch.device(device).type == "cpu"):
            return ok, why
        if self.ops is None:
            self.ops, why = triton_ops()
            if self.ops is None:
                return False, why
        return True, ""


class CanetCuda(Canet):
    def __init__(self):
        super().__init__("canet-cuda", CF, "canet", "cuda")

    def available(self, device):
        ok, why = super().available(device)
        if not ok:
            return ok, why
        from canet_kernels import _library
        if not _library.cuda_cpp_built():
            return False, "canet was built without csrc/cuda"
        return True, ""


# ------------------------------------------ compiled and graphed variants --
# torch.compile (inductor) of the plain-PyTorch providers, the strongest
# plain-PyTorch models: dynamic=False (one specialised compile per shape and
# route layout), fullgraph=True (no silent fallback to eager). The first
# call with a new shape compiles: benchmarks call `prepare` (or one warm-up
# call) before they time. "max-autotune-no-cudagraphs" also autotunes the
# GEMM and fusion choices; bench_triton measures both modes at the start of
# a run and keeps the faster one.

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
_COMPILED: dict = {}


def _raise_recompile_limit(n: int = 64) -> None:
    """Dynamo keeps its compiled variants per code object, 8 by default;
    every shape, layout, grad mode and compile mode of a run is one."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < n:
            setattr(cfg, key, n)


def compiled(fn, mode: str = "default", dynamic: bool = False):
    """torch.compile(fn) in `mode`, one wrapper per (fn, mode, dynamic)."""
    key = (fn, mode, dynamic)
    if key not in _COMPILED:
        _raise_recompile_limit()
        _COMPILED[key] = torch.compile(fn, mode=mode, dynamic=dynamic, fullgraph=True)
    return _COMPILED[key]


def compile_available(device) -> tuple[bool, str]:
    """Whether torch.compile's inductor can generate code for `device`."""
    dev = torch.device(device).type
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
        if not is_dynamo_supported():
            return False, "torch.compile is not supported on this Python"
    except Exception as exc:  # noqa: BLE001
        return False, f"torch._dynamo does not import ({exc})"
    if dev == "cpu":
        import shutil
        cxx = os.environ.get("CXX") or "g++"
        if not (shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")):
            return False, "inductor's CPU backend needs a C++ compiler (none found)"
    elif dev == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "inductor's CUDA backend needs triton"
    return True, ""


def graphs_available(device) -> tuple[bool, str]:
    if torch.device(device).type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


class DenseCompiled(Dense):
    """The dense stack through torch.compile (inductor) in `mode`."""

    def __init__(self, mode: str = "default", name: str | None = None):
        self.mode = mode
        self.name = name or ("dense-compile" if mode == "default"
                             else "dense-compile-" + mode.replace("-no-cudagraphs", ""))

    def available(self, device):
        return compile_available(device)

    def forward(self, W, batch):
        return compiled(dense_stack, self.mode)(batch.x, W)

    def loss_fn(self, W, x):
        """A zero-argument training loss (forward + loss compiled together,
        the backward by AOTAutograd) on fixed x and W."""
        fn = compiled(_dense_loss, self.mode)
        return lambda: fn(x, W)


class BucketCompiled(Bucket):
    """Bucket's tensor work (`run` on a layout) through torch.compile; the
    layout (sorting, index tensors) stays eager, like canet's route plan."""

    def __init__(self, mode: str = "default", name: str | None = None):
        self.mode = mode
        self.name = name or ("bucket-compile" if mode == "default"
                             else "bucket-compile-" + mode.replace("-no-cudagraphs", ""))

    def available(self, device):
        return compile_available(device)

    def run(self, W, x, layout):
        hidden = compiled(_bucket_hidden, self.mode)(x, W, layout)
        return list(zip([g[1] for g in layout], hidden))

    def loss_fn(self, W, x, layout):
        fn = compiled(_bucket_loss, self.mode)
        return lambda: fn(x, W, layout)


class Graphed(Provider):
    """A provider's forward replayed from a CUDA graph (timing.cuda_graph),
    captured on the first call with given weights and batch objects (and
    grad mode): later calls with the same objects replay it and return the
    same output tensors, overwritten in place. Inference only; graphed
    training steps are `TrainStep(..., graphs=True)`."""

    def __init__(self, base: Provider):
        self.base, self.name, self.kind = base, base.name + "-graphs", base.kind
        self._graphs: dict = {}

    def available(self, device):
        ok, why = graphs_available(device)
        return (ok, why) if not ok else self.base.available(device)

    def forward(self, W, batch):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{self.name}: forward under no_grad/inference_mode only "
                               "(training: TrainStep(graphs=True))")
        from benchmarks import timing
        key = (id(W), id(batch), torch.is_inference_mode_enabled())
        if key not in self._graphs:   # the closure keeps W and batch (and their ids) alive
            self._graphs[key] = timing.cuda_graph(lambda: self.base.forward(W, batch))
        return self._graphs[key]()

    def padded(self, out, batch):
        return self.base.padded(out, batch)

    def loss(self, out):
        return self.base.loss(out)


def optimizer(params, lr: float = 1e-5, capturable: bool = False):
    """AdamW as a user trains with it: fused on CUDA (and on the CPU where
    this torch has the fused CPU kernel), foreach otherwise."""
    params = list(params)
    dev = params[0].device.type
    kw = dict(fused=True)
    if dev == "cuda":
        kw["capturable"] = capturable
    try:
        return torch.optim.AdamW(params, lr=lr, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=dev == "cuda")


class TrainStep:
    """One training step as a user runs it: gradients reset, forward + loss
    (`loss_fn()`, reading fixed buffers and W's leaves), backward, AdamW
    step over W's leaves. Leaves in `extra` (an input that requires grad:
    the embeddings' gradient a model needs) get their gradient reset too.

    scope: a context manager factory opened around forward and backward
    (ops.shared_plans: the backward kernels reuse the forward's tile plans).

    graphs=True (CUDA): the whole step (forward, backward, optimizer step;
    capturable AdamW) captured in one CUDA graph after warm-up steps on a
    side stream (the pattern of torch's CUDA-graph docs); calls replay it.
    Small lr: the weights move little over a benchmark's thousands of steps."""

    def __init__(self, loss_fn, W: dict, extra=(), lr: float = 1e-5,
                 graphs: bool = False, warmup: int = 3, scope=None):
        self.loss_fn, self.extra = loss_fn, list(extra)
        self.scope = scope or contextlib.nullcontext
        self.params = weight_tensors(W)
        self.opt = optimizer(self.params, lr, capturable=graphs)
        self.graph = None
        if graphs:
            from benchmarks import timing
            self.graph = timing.cuda_graph(self._body, warmup=warmup,
                                           warmup_fn=self._eager,
                                           before_capture=self._zero)

    def _zero(self):
        self.opt.zero_grad(set_to_none=True)
        for t in self.extra:
            t.grad = None

    def _body(self):
        with self.scope():
            loss = self.loss_fn()
            loss.backward()
        self.opt.step()
        return loss.detach()

    def _eager(self):
        self._zero()
        return self._body()

    def __call__(self):
        return self.graph() if self.graph is not None else self._eager()


def backbone_providers(device="cpu", names=None) -> tuple[dict, dict]:
    """name -> Provider for the providers usable on `device` (all CPU
    baselines run on any device), and name -> reason for the others."""
    every = [Dense(), Masked(), LoopRoutes(), Bucket(), Canet(), CanetCuda(),
             CanetTriton(), DenseCompiled(),
             DenseCompiled("max-autotune-no-cudagraphs"), BucketCompiled()]
    every += [Graphed(p) for p in (Dense(), DenseCompiled(), BucketCompiled())]
    ok, skipped = {}, {}
    for p in every:
        if names is not None and p.name not in names:
            continue
        good, why = p.available(device)
        (ok.__setitem__(p.name, p) if good else skipped.__setitem__(p.name, why))
    return ok, skipped


def reference_provider() -> Canet:
    return Canet("reference", REF, "reference")


def run_forward(provider: Provider, W: dict, batch: Batch):
    with torch.inference_mode():
        return provider.forward(W, batch)


def train_step(provider: Provider, W: dict, batch: Batch, x_grad: bool = True):
    """Forward + backward of the loss; gradients land on W's leaves."""
    for t in weight_tensors(W):
        t.grad = None
    b = batch
    if x_grad:
        b = Batch(batch.x.detach().requires_grad_(), batch.lengths, batch.widths,
                  batch.depths)
    loss = provider.loss(provider.forward(W, b))
    loss.backward()
    return loss.detach()



# ------------------------------------------------------------------ ops ----
# One op on one batch, each provider in its own layout; the layout (and the
# route plan) is built once per batch outside the timed call, as a model
# builds it once for all its layers. `sliced_linear` runs a square D x D
# weight at in = out = each sample's width; `sliced_add_layernorm` gets a
# second input as the residual.

OP_PROVIDERS = ("dense", "masked", "loop", "bucket", "canet-cpu", "canet-cuda",
                "canet-triton")


def _linear_w(p):
    return p["w_o"], p["b_o"]


def _plain_op(op, p, x, r, w, heads, ratio, lens=None):
    """The op at width w on x ([b, n, w] padded, or [T, w] packed rows with
    `lens` for attention) with plain PyTorch."""
    if op == "sliced_attention":
        if x.dim() == 3:
            return padded_attention(x, p, w, heads)
        return Bucket._attention(x, p, w, heads, lens)
    if op == "sliced_ffn":
        return ffn(x, p, w, ratio)
    if op == "sliced_add_layernorm":
        return add_ln(x, r, p, "ln1", w)
    if op == "sliced_linear":
        wt, b = _linear_w(p)
        return F.linear(x, wt[:w, :w], b[:w])
    raise ValueError(f"unknown op {op!r}")


def _groups(keys):
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


class OpCase:
    """One op benchmark: `prepare(name)` builds a provider's input layout,
    `call(name, state)` runs the op (the timed part)."""

    def __init__(self, op, p, batch, residual, heads=HEADS, ratio=RATIO):
        self.op, self.p, self.batch, self.res = op, p, batch, residual
        self.heads, self.ratio = heads, ratio
        self.D = batch.x.shape[-1]

    def available(self, name, device):
        if name in ("canet-cuda", "canet-triton"):
            prov = CanetCuda() if name == "canet-cuda" else CanetTriton()
            ok, why = prov.available(device)
            if ok:
                self._ops = getattr(self, "_ops", {})
                self._ops[name] = prov.ops
            return ok, why
        if name == "canet-cpu":
            return Canet().available(device)
        return (True, "") if name in OP_PROVIDERS + ("reference",) else (False, "unknown")

    def prepare(self, name, grad=False):
        b, op = self.batch, self.op

        def leaf(t):
            return t.detach().clone().requires_grad_(grad)
        if name in ("dense", "masked"):
            st = SimpleNamespace(x=leaf(b.x), r=leaf(self.res))
            if name == "masked":
                st.m = CF.MaskedContext(b.widths, self.heads, self.D, self.ratio, b.L,
                                        b.x.dtype)
            return st
        if name == "loop":
            keys = (b.widths * 1000 + b.depths).tolist()
            lens = b.lengths.tolist()
            subs = []
            for k, ids in _groups(keys).items():
                w = k // 1000
                idx = torch.tensor(ids, device=b.x.device)
                n = max(lens[i] for i in ids)
                subs.append((w, leaf(b.x.index_select(0, idx)[:, :n, :w]),
                             leaf(self.res.index_select(0, idx)[:, :n, :w])))
            return SimpleNamespace(subs=subs)
        if name == "bucket":
            widths, lens = b.widths.tolist(), b.lengths.tolist()
            order = sorted(range(b.B), key=lambda i: -widths[i])
            subs = []
            flat = b.x.reshape(-1, self.D)
            rflat = self.res.reshape(-1, self.D)
            for w, ids in _groups([widths[i] for i in order]).items():
                ids = [order[i] for i in ids]
                rows = token_index(b.lengths, b.L,
                                   order=torch.tensor(ids, device=b.x.device))
                subs.append((w, leaf(flat[:, :w].index_select(0, rows)),
                             leaf(rflat[:, :w].index_select(0, rows)),
                             [lens[i] for i in ids]))
            return SimpleNamespace(subs=subs)
        # canet: route-sorted packed rows, as plan_routes lays them out
        plan = plan_routes(b.lengths, b.widths, b.depths)
        x = gather_tokens(b.x, b.lengths, plan)
        r = gather_tokens(self.res, b.lengths, plan)
        ops = {"canet-cpu": CF, "reference": REF}.get(name)
        if ops is None:
            ops = self._ops[name]
        return SimpleNamespace(x=leaf(x), r=leaf(r), cu=plan.cu_seqlens,
                               w=plan.widths, ops=ops)

    def call(self, name, st):
        op, p, H, ratio, D = self.op, self.p, self.heads, self.ratio, self.D
        if name == "dense":
            return _plain_op(op, p, st.x, st.r, D, H, ratio)
        if name == "masked":
            m = st.m
            if op == "sliced_attention":
                return CF.masked_attention(st.x, p, m)
            if op == "sliced_ffn":
                return CF.masked_ffn(st.x, p, m)
            if op == "sliced_add_layernorm":
                return CF.masked_layer_norm(st.x + st.r, m, p["ln1_w"], p["ln1_b"], EPS)
            wt, bias = _linear_w(p)
            return F.linear(st.x, wt, bias) * m.fmask
        if name == "loop":
            return [_plain_op(op, p, x, r, w, H, ratio) for w, x, r in st.subs]
        if name == "bucket":
            return [_plain_op(op, p, x, r, w, H, ratio, lens) for w, x, r, lens in st.subs]
        o = st.ops
        if op == "sliced_attention":
            return o.sliced_attention(st.x, st.cu, st.w, p["w_qkv"], p["b_qkv"], p["w_o"],
                                      p["b_o"], H, True)
        if op == "sliced_ffn":
            return o.sliced_ffn(st.x, st.cu, st.w, p["w1"], p["b1"], p["w2"], p["b2"],
                                ratio)
        if op == "sliced_add_layernorm":
            return o.sliced_add_layernorm(st.x, st.r, st.cu, st.w, p["ln1_w"],
                                          p["ln1_b"], EPS)
        wt, bias = _linear_w(p)
        return o.sliced_linear(st.x, st.cu, st.w, st.w, wt, bias)

    def to_padded(self, name, st, out):
        """[B, L, D] caller order, real tokens only (for checks)."""
        b = self.batch
        B, L, D = b.x.shape
        if name in ("dense", "masked"):
            y = out
        elif name == "loop":
            y = b.x.new_zeros(B, L, D)
            keys = (b.widths * 1000 + b.depths).tolist()
            for (k, ids), o in zip(_groups(keys).items(), out):
                idx = torch.tensor(ids, device=b.x.device)
                y[idx, :o.shape[1], :o.shape[2]] = o
        elif name == "bucket":
            y = b.x.new_zeros(B * L, D)
            widths = b.widths.tolist()
            order = sorted(range(b.B), key=lambda i: -widths[i])
            for (w, ids), o in zip(_groups([widths[i] for i in order]).items(), out):
                rows = token_index(b.lengths, b.L, order=torch.tensor(
                    [order[i] for i in ids], device=b.x.device))
                y[rows, :w] = o
            y = y.view(B, L, D)
        else:
            plan = plan_routes(b.lengths, b.widths, b.depths)
            y = CF.unpack(out, plan.lengths, L)[plan.inverse]
        return y * b.valid()


def op_loss(out):
    if isinstance(out, list):
        return sum(o.float().square().mean() for o in out)
    return out.float().square().mean()
