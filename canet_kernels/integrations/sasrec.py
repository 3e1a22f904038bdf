"""canet as the backbone of SASRec.pytorch-style code.

That code base's model is `SASRec(user_num, item_num, args)` with
`log2feats(log_seqs) -> [B, L, H]` on left-padded item ids (0 = padding,
numpy arrays or tensors), `forward(user_ids, log_seqs, pos_seqs, neg_seqs)
-> (pos_logits, neg_logits)` for its BCE loss with sampled negatives, and
`predict(user_ids, log_seqs, item_indices)`. `CANetSASRec` keeps that
interface; scores are dot products with the (tied) item table, as there:

    from canet_kernels.integrations.sasrec import CANetSASRec
    model = CANetSASRec(usernum, itemnum, args).to(args.device)
    ...
    loss = bce(pos_logits[indices], ...) + bce(neg_logits[indices], ...)
    loss = loss + model.router_loss()          # after each training forward

Routing space from `args`: hidden widths {H/2, 3H/4, H} (those divisible by
num_heads), depths 1..num_blocks, embedding width = hidden width (tied
scoring needs E >= D). Optional `args.canet_hidden_widths`,
`args.canet_depths`, `args.canet_flop_target` override them;
`args.canet_dense=True` runs the max route only (a plain SASRec stand-in).
`args.canet_rungs=K`: the host calls `model.consolidate(valid_batches)`
when it wants the routes fixed (e.g. after a few epochs; after `calibrate`);
from then on every user takes its rung and `router_loss()` is 0 (the
router is frozen). The rung lift is `canet train`'s and RecBole's only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model.config import CANetConfig
from ..model.encoder import CANetEncoder, EncoderOutput


def _space(args):
    H, heads = int(args.hidden_units), int(args.num_heads)
    widths = getattr(args, "canet_hidden_widths", None) or \
        sorted({w for w in (H // 2, 3 * H // 4, H) if w > 0 and w % heads == 0})
    depths = getattr(args, "canet_depths", None) or tuple(range(1, int(args.num_blocks) + 1))
    return tuple(widths), tuple(depths)


class CANetSASRec(nn.Module):
    def __init__(self, user_num, item_num, args):
        super().__init__()
        widths, depths = _space(args)
        kw = {}
        if getattr(args, "canet_flop_target", None) is not None:
            kw["flop_target"] = args.canet_flop_target
        if getattr(args, "canet_rungs", None):
            kw["rungs"] = int(args.canet_rungs)
            kw["rung_signal"] = getattr(args, "canet_rung_signal", "router")
        self.cfg = CANetConfig(
            n_items=int(item_num), max_len=int(args.maxlen), emb_widths=widths,
            hidden_widths=widths, depths=depths, num_heads=int(args.num_heads),
            dropout=float(args.dropout_rate), tie_embeddings=True, **kw)
        self.dense = bool(getattr(args, "canet_dense", False))
        self.encoder = CANetEncoder(self.cfg)
        self.item_emb = self.encoder.net.item_emb   # the host's tied item table
        self.last_output: EncoderOutput | None = None
        self._hit = None

    @property
    def dev(self):
        return self.item_emb.weight.device

    def _ids(self, seqs):
        return torch.as_tensor(seqs, dtype=torch.int64, device=self.dev)

    def log2feats(self, log_seqs):
        """Left-padded ids [B, L] -> hidden states [B, L, H] (zeros at
        padding and beyond each user's route width)."""
        items = self._ids(log_seqs)
        routes = self.encoder.cfg.max_route if self.dense else None
        if routes is not None:
            routes = torch.full((items.shape[0],), routes, dtype=torch.int64,
                                device=self.dev)
        out = self.encoder(items, routes=routes, left_padded=True)
        self.last_output = out
        return out.hidden

    def forward(self, user_ids, log_seqs, pos_seqs, neg_seqs):
        feats = self.log2feats(log_seqs)
        pos = self.item_emb(self._ids(pos_seqs))[..., :feats.shape[-1]]
        neg = self.item_emb(self._ids(neg_seqs))[..., :feats.shape[-1]]
        if self.training and self.last_output.logits is not None:
            self._hit = self.encoder.smallest_route_hits(
                self._ids(log_seqs), None, self._ids(pos_seqs)[:, -1])
        return (feats * pos).sum(-1), (feats * neg).sum(-1)

    def predict(self, user_ids, log_seqs, item_indices):
        last = self.log2feats(log_seqs)[:, -1, :]                    # [B, H]
        embs = self.item_emb(self._ids(item_indices))[..., :last.shape[-1]]
        if embs.dim() == 2:                                          # [I, H]
            return last @ embs.T
        return (embs @ last[:, :, None]).squeeze(-1)                  # [B, I]

    def router_loss(self):
        """The router's weighted auxiliary losses for the last training
        forward (0 for the dense variant or at inference)."""
        if self.last_output is None:
            return self.item_emb.weight.new_zeros(())
        return self.encoder.router_loss(self.last_output, self._hit)

    def calibrate(self, batches, target=None):
        """Inference cost bias from validation users: `batches` yields
        left-padded id arrays [B, L]."""
        return self.encoder.calibrate(((self._ids(s), None) for s in batches), target)

    def consolidate(self, batches):
        """With args.canet_rungs: fixes the routes as rungs from validation
        users (`batches` as for calibrate). Returns the rung routes."""
        return self.encoder.consolidate((self._ids(s), None) for s in batches)
