"""Model configuration, the route table and the analytic FLOP count."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields


@dataclass
class CANetConfig:
    n_items: int                       # item ids are 1..n_items, 0 is padding
    max_len: int = 50
    emb_widths: tuple = (64, 96, 128)
    hidden_widths: tuple = (64, 96, 128)
    depths: tuple = (2, 4, 6, 8)
    num_heads: int = 4
    ffn_ratio: int = 4
    dropout: float = 0.2
    ln_eps: float = 1e-5
    # learnable scale on each sublayer's output before the residual add+LN,
    # initialised to this value as in the CANet code: every layer starts near
    # the identity, so deep routes train (without it the 8-layer model stalls
    # at the popularity loss on Beauty); None or <= 0 = plain post-LN
    residual_scale_init: float | None = 1e-8
    # score items against the input item table (its first d features at
    # hidden width d) instead of a separate output layer; needs E >= D
    tie_embeddings: bool = False
    # router: a 1-layer transformer over the sequence
    router_width: int = 32
    router_heads: int = 4
    router_ffn: int = 128
    tau: float = 1.0                   # Gumbel-softmax temperature
    # loss weights
    guide_weight: float = 0.01
    uniform_weight: float = 0.01
    guide_topk: int = 10
    # compute budget: target mean FLOP ratio (routed / max route); None = off
    flop_target: float | None = 0.45
    budget_weight: float = 1.0
    # Router-training switches, measured one at a time on the synthetic data
    # by benchmarks/router_ablation.py (defaults = the paper's method).
    # guide_signal: "train" = the guide reads the last training target, which
    #   the CE also trains on (so the smallest route comes to "hit" it by
    #   memory); "holdout" = that target is left out of the CE and the guide
    #   reads it, a hit the model has not been trained to make.
    guide_signal: str = "train"
    # guide_labels: "small" = small route hits -> small, misses -> large;
    #   "sandwich" = as DS-Net's gate: also a user the max route misses
    #   (hopeless) -> small, so only the users the max route gets and the
    #   smallest does not are pushed large.
    guide_labels: str = "small"
    # balance (weighted by uniform_weight): "kl" = KL(batch-mean router
    #   distribution || uniform), met by every user having the same flat
    #   distribution; "switch" = R * sum_r f_r * P_r (Switch Transformer: f the
    #   share of hard routes, P the mean probability), which spreads the
    #   routes actually taken; "mi" = kl + mean per-user entropy, i.e. a
    #   spread-out batch of confident per-user choices.
    balance: str = "kl"
    # Gumbel temperature annealed geometrically from tau to tau_end over the
    #   training epochs (None = constant). With hard samples the sampled route
    #   does not depend on tau; only the straight-through gradient does.
    tau_end: float | None = None
    # Gumbel noise scale annealed linearly from 1 to noise_end over the epochs
    #   (None = 1 throughout): the sampled training routes move from explored
    #   towards the deterministic argmax used at inference.
    noise_end: float | None = None
    # budget_shape: "relu" = relu(E[ratio] - target) on the batch mean;
    #   "two_sided" = |E[ratio] - target|, so the budget is also spent.
    budget_shape: str = "relu"
    # router_stats: the router also reads the history length and the share of
    #   distinct items (how repetitive the user is), two features of user
    #   complexity, through a linear layer added to its last-position state.
    router_stats: bool = False
    # distill: in-place distillation from the largest route (slimmable
    #   networks, DS-Net): when the router picks the routes, the max route also
    #   runs on the batch, its CE is trained, and distill * KL(softmax(max-route
    #   logits).detach() || softmax(routed logits)) over the labelled positions
    #   is added. 0 = off.
    distill: float = 0.0
    # rungs: 0 = the router picks any route for every user (the paper). K > 0:
    #   at TrainConfig.rung_epoch the router's routes are consolidated into K
    #   fixed rungs (CANetEncoder.set_rungs): validation users are cut into K
    #   equal groups by the FLOP ratio the router expects for them, each
    #   group's rung is the route most of them get (if these overshoot
    #   flop_target, the routes within it that hold the routes of most of
    #   them: rung_votes); from then on a user takes the rung of its score,
    #   the router is frozen and the supernet trains on these routes.
    #   Few, stable routes instead of many that move.
    rungs: int = 0
    # rung_signal: what orders users into the rungs' groups. "router" = the
    #   FLOP ratio the router expects for them (above); "length" = their
    #   history length (the input's, at most max_len), a measured signal of
    #   complexity that a router trained on a memorised label may not learn.
    rung_signal: str = "router"

    def __post_init__(self):
        if self.residual_scale_init is not None and self.residual_scale_init <= 0:
            self.residual_scale_init = None  # <= 0 means plain post-LN
        if self.flop_target is not None and self.flop_target <= 0:
            self.flop_target = None          # <= 0 means no budget
        self.emb_widths = tuple(sorted(int(v) for v in self.emb_widths))
        self.hidden_widths = tuple(sorted(int(v) for v in self.hidden_widths))
        self.depths = tuple(sorted(int(v) for v in self.depths))
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        for d in self.hidden_widths:
            if d % self.num_heads:
                raise ValueError(f"hidden width {d} is not divisible by "
                                 f"num_heads={self.num_heads}")
        if self.tie_embeddings and self.E < self.D:
            raise ValueError("tie_embeddings needs max(emb_widths) >= max(hidden_widths)")
        if self.router_width % self.router_heads:
            raise ValueError("router_width must be divisible by router_heads")
        if min(self.depths) < 1:
            raise ValueError("depths must be >= 1")
        if self.flop_target is not None and self.flop_target > 1:
            raise ValueError(f"flop_target must be in (0, 1], got {self.flop_target}")
        for name, ok in (("guide_signal", ("train", "holdout")),
                         ("guide_labels", ("small", "sandwich")),
                         ("balance", ("kl", "switch", "mi")),
                         ("budget_shape", ("relu", "two_sided")),
                         ("rung_signal", ("router", "length"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {getattr(self, name)!r}")
        if self.noise_end is not None and not 0 <= self.noise_end <= 1:
            raise ValueError(f"noise_end must be in [0, 1], got {self.noise_end}")
        if not self.distill >= 0:           # also refuses NaN
            raise ValueError(f"distill must be >= 0, got {self.distill}")
        if not isinstance(self.rungs, int) or self.rungs < 0:
            raise ValueError(f"rungs must be an int >= 0, got {self.rungs!r}")
        if self.tau_end is not None and self.tau_end <= 0:
            raise ValueError(f"tau_end must be > 0, got {self.tau_end}")

    # -- routes --------------------------------------------------------------
    @property
    def E(self) -> int:
        return max(self.emb_widths)

    @property
    def D(self) -> int:
        return max(self.hidden_widths)

    @property
    def L(self) -> int:
        return max(self.depths)

    def routes(self) -> list[tuple[int, int, int]]:
        """Route id -> (embedding width, hidden width, depth); id 0 is the
        smallest sub-network and the last id the full one."""
        return list(itertools.product(self.emb_widths, self.hidden_widths,
                                      self.depths))

    @property
    def num_routes(self) -> int:
        return len(self.emb_widths) * len(self.hidden_widths) * len(self.depths)

    @property
    def max_route(self) -> int:
        return self.num_routes - 1

    def route_flops(self, seq_len: int | None = None) -> list[float]:
        """Inference FLOPs (multiply-add = 2) of one sequence of `seq_len`
        tokens (default max_len) on each route: projection, attention
        (QKV, causal scores and mix, output), FFN, and full-ranking scores of
        the last position. Embedding look-ups, LayerNorm and GELU are left
        out (linear in width, small)."""
        from ..flops import layer_flops
        n = self.max_len if seq_len is None else seq_len
        out = []
        for e, d, depth in self.routes():
            projection = n * 2 * e * d
            backbone = depth * layer_flops(n, d, self.ffn_ratio)
            scores = 2 * d * (self.n_items + 1)
            out.append(projection + backbone + scores)
        return out

    def route_flop_ratios(self, seq_len: int | None = None) -> list[float]:
        f = self.route_flops(seq_len)
        return [v / f[-1] for v in f]

    def router_flops(self, seq_len: int | None = None) -> float:
        """FLOPs of the router on one sequence: keys and values of every
        position, then one query, attention, output and FFN for the last."""
        n = self.max_len if seq_len is None else seq_len
        w, f = self.router_width, self.router_ffn
        return n * 4 * w * w + 4 * w * w + 4 * w * n + 4 * w * f + 2 * w * self.num_routes

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("emb_widths", "hidden_widths", "depths"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CANetConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CANetConfig fields: {sorted(unknown)}")
        return cls(**d)
