"""canet as the backbone of SASRec.pytorch-style code: left-padded id arrays,
`log2feats`, BCE with one sampled negative per position, and the router's
losses added to the host's loss. Only the lines marked `# canet` differ from
such a training script.

    python examples/sasrec_style.py                 # CANet (router + supernet)
    python examples/sasrec_style.py --dense         # the max route only
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from canet_kernels import data as D  # noqa: E402
from canet_kernels.integrations.sasrec import CANetSASRec  # noqa: E402  # canet


def left_pad(seqs, maxlen):
    out = np.zeros((len(seqs), maxlen), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-maxlen:]
        if s:
            out[i, maxlen - len(s):] = s
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--maxlen", type=int, default=20)
    p.add_argument("--hidden_units", type=int, default=32)
    p.add_argument("--num_blocks", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=2)
    p.add_argument("--dropout_rate", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dense", dest="canet_dense", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    ds = D.synthetic(args.users, args.items, seed=args.seed)
    train = [s[:-1] for s in ds.sequences]           # last item held out for test
    model = CANetSASRec(len(train), ds.n_items, args)  # canet (was: SASRec(...))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    bce = torch.nn.BCEWithLogitsLoss()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, total = time.perf_counter(), 0.0
        for b in range(0, len(train), args.batch_size):
            seqs = train[b:b + args.batch_size]
            log = left_pad([s[:-1] for s in seqs], args.maxlen)
            pos = left_pad([s[1:] for s in seqs], args.maxlen)
            neg = np.where(pos > 0, rng.integers(1, ds.n_items + 1, pos.shape), 0)
            pos_logits, neg_logits = model(None, log, pos, neg)
            idx = torch.as_tensor(pos != 0)
            loss = bce(pos_logits[idx], torch.ones_like(pos_logits[idx])) + \
                bce(neg_logits[idx], torch.zeros_like(neg_logits[idx]))
            loss = loss + model.router_loss()        # canet
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        # full ranking of the held-out item over all items
        model.eval()
        with torch.no_grad():
            log = left_pad(train, args.maxlen)
            scores = model.predict(None, log, np.arange(1, ds.n_items + 1))
            target = torch.tensor([s[-1] for s in ds.sequences]) - 1
            rank = (scores > scores.gather(1, target[:, None])).sum(1)
            ndcg = torch.where(rank < 10, 1 / torch.log2(rank + 2.0), 0).mean()
            routes = model.last_output.route_ids
            ratio = float(model.encoder.route_ratio[routes].mean())
        print(f"epoch {epoch}: loss {total:.2f}  test NDCG@10 {float(ndcg):.4f}  "
              f"FLOP ratio {ratio:.3f}  {time.perf_counter() - t0:.1f}s")
    return float(ndcg), ratio


if __name__ == "__main__":
    main()
