"""The route plan: one batch's routes turned into the layout every op reads.

Samples are sorted by route, depth descending first, so the samples that
still run at layer l are a *prefix* of the batch (and their tokens a prefix of
the packed rows): layer l runs on views `x[:T_l]`, `cu_seqlens[:B_l + 1]`,
`widths[:B_l]`, no gather and no copy. Inside a depth group samples are sorted
by width (then length), so equal widths are contiguous and a backend runs each
width bucket as one block of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutePlan:
    order: torch.Tensor        # [B] sorted position -> caller's sample index
    inverse: torch.Tensor      # [B] caller's sample index -> sorted position
    lengths: torch.Tensor      # [B] tokens per sample, sorted order
    cu_seqlens: torch.Tensor   # [B + 1] int64 offsets of the packed tokens
    widths: torch.Tensor       # [B] hidden width per sample, sorted order
    depths: torch.Tensor       # [B] layers per sample, sorted order
    emb_widths: torch.Tensor   # [B] embedding width per sample, sorted order
    active_samples: list       # per layer l: samples with depth > l (B_l)
    active_tokens: list        # per layer l: their tokens (T_l)

    @property
    def num_samples(self) -> int:
        return int(self.order.shape[0])

    def layer(self, l: int, x: torch.Tensor):
        """Views of (x, cu_seqlens, widths) for the samples active at layer l."""
        b, t = self.active_samples[l], self.active_tokens[l]
        return x[:t], self.cu_seqlens[:b + 1], self.widths[:b]


def plan_routes(lengths, widths, depths, emb_widths=None, num_layers=None):
    """Sort a batch by route and describe its packed layout.

    lengths, widths, depths (and emb_widths, default = widths): [B] integer
    tensors in the caller's order. num_layers defaults to max(depths). Reads
    the depths and lengths on the host once (one device sync per batch).
    """
    B = lengths.shape[0]
    for name, t in (("widths", widths), ("depths", depths), ("emb_widths", emb_widths)):
        if t is not None and t.shape != (B,):
            raise ValueError(f"plan_routes: {name} must have shape ({B},), "
                             f"got {tuple(t.shape)}")
    if emb_widths is None:
        emb_widths = widths
    if B and int(depths.min()) < 0:
        raise ValueError("plan_routes: depths must be >= 0")
    # Descending on (depth, width, emb width, length): stable sorts from the
    # last key to the first. Equal lengths inside a route group let a backend
    # batch their attention as equal-shape problems.
    order = torch.argsort(lengths, descending=True, stable=True)
    for key in (emb_widths, widths, depths):
        order = order[torch.argsort(key[order], descending=True, stable=True)]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=order.device)
    lengths_s = lengths[order].to(torch.int64)
    cu = torch.zeros(B + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths_s, 0, out=cu[1:])
    depths_s = depths[order]
    if num_layers is None:
        num_layers = int(depths.max()) if B else 0
    # B_l = #samples with depth > l; depths are sorted descending.
    host_depths = depths_s.cpu()
    counts = torch.searchsorted(-host_depths.contiguous(),
                                -torch.arange(num_layers), right=False) \
        if B else torch.zeros(num_layers, dtype=torch.int64)
    active_samples = [int(c) for c in counts]
    host_cu = cu.cpu()
    active_tokens = [int(host_cu[b]) for b in active_samples]
    return RoutePlan(order, inverse, lengths_s, cu, widths[order], depths_s,
                     emb_widths[order], active_samples, active_tokens)


def token_index(lengths, L, left_padded=False, order=None):
    """Flat indices into a padded [B * L] batch of the real tokens, in packed
    order: samples in `order` (default 0..B-1), each sample's tokens in
    sequence order. The one place that knows where padding sits."""
    B = lengths.shape[0]
    if order is None:
        order = torch.arange(B, device=lengths.device)
    pos = torch.arange(L, device=lengths.device)
    lens = lengths[order].to(pos.dtype)[:, None]
    keep = pos[None, :] >= (L - lens) if left_padded else pos[None, :] < lens
    flat = order.to(pos.dtype)[:, None] * L + pos[None, :]
    return flat[keep]


def gather_tokens(items, lengths, plan, left_padded=False):
    """Padded [B, L, ...] (caller's order) -> packed [T, ...] in plan order."""
    B, L = items.shape[:2]
    idx = token_index(lengths, L, left_padded, plan.order)
    return items.reshape(B * L, *items.shape[2:])[idx]


def run_layers(plan, x, layers, layer_fn):
    """Depth routing over a route-sorted packed batch: for each layer,
    `layer_fn(layer, x_l, cu_seqlens_l, widths_l) -> x_l` runs on the prefix
    of samples deeper than it (views, see `RoutePlan.layer`); rows of samples
    that stop are set aside and merged back in packed order at the end."""
    finished = []
    for l, (layer, t) in enumerate(zip(layers, plan.active_tokens)):
        if t == 0:
            break
        if t < x.shape[0]:
            finished.append(x[t:])
        x = layer_fn(layer, *plan.layer(l, x))
    return merge_layers(x, finished)


def run_masked_layers(h, depths, layers, layer_fn):
    """Depth routing in the masked formulation: every layer runs on every
    sample at full size, `layer_fn(layer, h) -> h`; samples past their depth
    keep their state."""
    for l, layer in enumerate(layers):
        h = torch.where((depths > l)[:, None, None], layer_fn(layer, h), h)
    return h


def merge_layers(final, finished):
    """Rows of samples that stopped early, back in packed order.

    `final` holds the rows of the deepest samples (a prefix), `finished[l]`
    the rows that stopped after layer l (appended while walking the layers).
    One concatenation of the whole hidden state: the only copy depth routing
    costs.
    """
    if not finished:
        return final
    return torch.cat([final] + finished[::-1], dim=0)
