"""The weight-sliced SASRec-style supernet with its output layer.

Every route (e_b, d_b, L_b) uses the leading blocks of one set of weights:
item/position embeddings sliced to e_b, a projection W_p[:d_b, :e_b], L_b
post-LN transformer layers at width d_b (`RoutedLayer`) and an item scorer
W_out[:, :d_b] (or, tied, the item table's first d_b features).

* `routed`: the canet ops on a route-sorted packed batch (`plan_routes`);
  layer l runs on the prefix of samples deeper than l. Real savings.
* `masked`: the paper's formulation, full width and every layer with
  per-sample feature masks; the reference for the routed path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import encoder
from .config import CANetConfig
from .encoder import RoutedEncoder


class Supernet(RoutedEncoder):
    def __init__(self, cfg: CANetConfig):
        super().__init__(cfg)
        if cfg.tie_embeddings:
            self.w_out = None
        else:
            self.w_out = nn.Parameter(torch.empty(cfg.n_items + 1, cfg.D))
            encoder._init_(self.w_out)
        self.b_out = nn.Parameter(torch.zeros(cfg.n_items + 1))

    @property
    def out_weight(self):
        """[n_items + 1, >= D]: scoring at width d reads its first d columns."""
        return self.item_emb.weight if self.w_out is None else self.w_out

    def score_routed(self, h, cu_seqlens, widths):
        """Full-ranking scores [T, n_items + 1] of packed rows h [T, D]."""
        full = torch.full_like(widths, self.cfg.n_items + 1)
        return encoder.ops.sliced_linear(h, cu_seqlens, widths, full, self.out_weight,
                                         self.b_out)

    def score_rows(self, h, widths):
        """Scores [N, n_items + 1] of single rows h [N, D] at widths [N]."""
        cu = torch.arange(h.shape[0] + 1, device=h.device, dtype=torch.int64)
        return self.score_routed(h, cu, widths)

    def score_masked(self, h):
        """h [..., D] zero beyond each width -> scores [..., n_items + 1]."""
        return F.linear(h, self.out_weight[:, :self.cfg.D], self.b_out)
