"""Data: readers for common sequential-recommendation file formats, a
synthetic generator with users of different complexity, and the
leave-one-out split (last item test, second-to-last validation).

Formats (in `users` and `pairs` items are positive integers, 0 is reserved
for padding):
  users  one user per line: `user_id item_1 item_2 ... item_n` (S3Rec / CANet
         preprocessed files, e.g. Beauty.txt, LastFM.txt). No timestamps:
         by the convention of these files each line is already in time
         order, and it is taken as such without a warning.
  pairs  one interaction per line: `user_id item_id` (SASRec repositories).
         No timestamps: each user's lines are taken in file order as time
         order, and reading one warns so (TimeOrderWarning).
  inter  a RecBole atomic `.inter` file: tab-separated, the first line a
         typed header `name:type` per column (type token, token_seq, float
         or float_seq), e.g. `user_id:token<TAB>item_id:token<TAB>timestamp:float`.
         User, item and time columns are named by `user_field`, `item_field`
         and `time_field` (RecBole's USER_ID_FIELD, ITEM_ID_FIELD,
         TIME_FIELD; default user_id, item_id, timestamp); other columns are
         ignored. Item tokens are numbered 1..n in the order of their first
         appearance in the file, as RecBole's own remap does (pd.factorize;
         the same ids for the file alone, without an .item file or
         filtering); `SeqDataset.item_tokens[i]` is the token of item id i
         (index 0 is "[PAD]"). Users keep their tokens (`SeqDataset.users`),
         in order of first appearance. Each user's interactions are sorted
         by the time column, stably (equal times keep file order). Without
         the default time column the file order is taken as time order, with
         a TimeOrderWarning; a time column asked for by name must exist.
`read_file(path)` without a format reads `*.inter` files as `inter`, all
others as `users`.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

FORMATS = ("users", "pairs", "inter")
INTER_TYPES = ("token", "token_seq", "float", "float_seq")
INTER_FIELDS = {"user_field": "user_id", "item_field": "item_id",
                "time_field": "timestamp"}           # RecBole's defaults
PAD_TOKEN = "[PAD]"


class DataFormatError(ValueError):
    """A malformed data file; the message names the file and the line."""


class TimeOrderWarning(UserWarning):
    """A data file without timestamps: its line order is taken as time order."""


def _warn_file_order(path, why):
    warnings.warn(f"{path}: {why}; each user's interactions are taken in file order "
                  "as their time order", TimeOrderWarning, stacklevel=4)


@dataclass
class SeqDataset:
    name: str
    sequences: list            # per user: list of item ids in time order
    users: list                # the user ids as they appear in the source
    n_items: int               # largest item id (ids are 1..n_items)
    source: dict = field(default_factory=dict)   # how to load it again
    user_types: np.ndarray | None = None          # synthetic only: 0 simple, 1 complex
    item_tokens: list | None = None               # inter only: item id i -> token

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def summary(self) -> str:
        lens = np.array([len(s) for s in self.sequences])
        return (f"{self.name}: {len(self.sequences)} users, {self.n_items} items, "
                f"{int(lens.sum())} interactions, mean/max length "
                f"{lens.mean():.1f}/{lens.max()}")


def _err(path, lineno, msg):
    return DataFormatError(f"{path}:{lineno}: {msg}")


def _ints(path, lineno, parts):
    out = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise _err(path, lineno, f"expected an integer, got {p!r}") from None
        out.append(v)
    return out


def _check_items(path, lineno, items):
    for v in items:
        if v < 1:
            raise _err(path, lineno, f"item ids must be >= 1 (0 is padding), got {v}")


def read_user_sequences(path: str) -> SeqDataset:
    """`user item item ...` per line."""
    sequences, users, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            vals = _ints(path, lineno, parts)
            user, items = vals[0], vals[1:]
            if not items:
                raise _err(path, lineno, f"user {user} has no items")
            _check_items(path, lineno, items)
            if user in seen:
                raise _err(path, lineno, f"user {user} already appeared on line "
                           f"{seen[user]} (expected one line per user)")
            seen[user] = lineno
            users.append(user)
            sequences.append(items)
    return _finish(path, sequences, users, "users")


def read_interactions(path: str) -> SeqDataset:
    """`user item` per line, each user's interactions in time order."""
    by_user: dict = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise _err(path, lineno, f"expected 2 columns `user item`, got "
                           f"{len(parts)}")
            user, item = _ints(path, lineno, parts)
            _check_items(path, lineno, [item])
            by_user.setdefault(user, []).append(item)
    ds = _finish(path, list(by_user.values()), list(by_user.keys()), "pairs")
    _warn_file_order(path, "the pairs format has no timestamps")
    return ds


def _finish(path, sequences, users, fmt):
    if not sequences:
        raise DataFormatError(f"{path}: no interactions found")
    n_items = max(max(s) for s in sequences)
    name = os.path.splitext(os.path.basename(path))[0]
    return SeqDataset(name, sequences, users, n_items,
                      {"kind": "file", "path": os.path.abspath(path), "format": fmt})


_HEADER_EXAMPLE = "`user_id:token<TAB>item_id:token<TAB>timestamp:float`"


def _columns(line):
    return line.rstrip("\r\n").split("\t")


def _inter_header(path, lineno, line):
    """{name: (column index, type)} of a typed RecBole header line."""
    cols, header = _columns(line), {}
    if len(cols) == 1 and len(line.split()) > 1 and ":" in line:
        raise _err(path, lineno, "header columns must be separated by tabs, got "
                   f"{line.strip()!r}")
    for i, col in enumerate(cols):
        parts = col.strip().split(":")
        if len(parts) != 2 or not parts[0]:
            raise _err(path, lineno, f"expected a typed RecBole header such as "
                       f"{_HEADER_EXAMPLE}, got column {col!r}")
        name, ftype = parts
        if ftype not in INTER_TYPES:
            raise _err(path, lineno, f"column {col!r}: type must be one of "
                       f"{', '.join(INTER_TYPES)}")
        if name in header:
            raise _err(path, lineno, f"column {name!r} appears twice in the header")
        header[name] = (i, ftype)
    return header


def _header_field(path, lineno, header, name, what, option, want_type):
    if name not in header:
        raise _err(path, lineno, f"no {what} column {name!r} in the header (columns: "
                   f"{', '.join(header)}); name it with {option}")
    i, ftype = header[name]
    if ftype != want_type:
        raise _err(path, lineno, f"the {what} column {name!r} must be of type "
                   f"{want_type}, got {ftype}")
    return i


def read_recbole_inter(path: str, user_field: str | None = None,
                       item_field: str | None = None,
                       time_field: str | None = None) -> SeqDataset:
    """A RecBole atomic `.inter` file (see the module docstring). None for a
    field means RecBole's default name (user_id, item_id, timestamp)."""
    uf = user_field or INTER_FIELDS["user_field"]
    itf = item_field or INTER_FIELDS["item_field"]
    tf = time_field or INTER_FIELDS["time_field"]
    rows: dict = {}                       # user token -> [(time, item id)]
    item_ids: dict = {}                   # item token -> id, first appearance
    header = None
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if header is None:
                header = _inter_header(path, lineno, line)
                hline = lineno
                ui = _header_field(path, lineno, header, uf, "user", "user_field / "
                                   "--user-field", "token")
                ii = _header_field(path, lineno, header, itf, "item", "item_field / "
                                   "--item-field", "token")
                if tf in header:
                    ti = _header_field(path, lineno, header, tf, "time", "time_field "
                                       "/ --time-field", "float")
                elif time_field:
                    raise _err(path, lineno, f"no time column {tf!r} in the header "
                               f"(columns: {', '.join(header)})")
                else:
                    ti = None
                continue
            cols = _columns(line)
            if len(cols) != len(header):
                hint = (" (columns must be separated by tabs)"
                        if len(line.split()) == len(header) else "")
                raise _err(path, lineno, f"expected {len(header)} tab-separated columns "
                           f"as in the header on line {hline}, got {len(cols)}{hint}")
            user, item = cols[ui], cols[ii]
            if not user:
                raise _err(path, lineno, f"empty user token in column {uf!r}")
            if not item:
                raise _err(path, lineno, f"empty item token in column {itf!r}")
            t = 0.0
            if ti is not None:
                try:
                    t = float(cols[ti])
                except ValueError:
                    t = math.nan
                if not math.isfinite(t):
                    raise _err(path, lineno, f"time column {tf!r}: expected a finite "
                               f"number, got {cols[ti]!r}")
            iid = item_ids.setdefault(item, len(item_ids) + 1)
            rows.setdefault(user, []).append((t, iid))
    if header is None:
        raise DataFormatError(f"{path}:1: empty file; a RecBole .inter file starts "
                              f"with a typed header such as {_HEADER_EXAMPLE}")
    if not rows:
        raise DataFormatError(f"{path}:{hline}: no interactions found, only the "
                              "header")
    # sorted() is stable: interactions at the same time keep their file order
    sequences = [[i for _, i in sorted(r, key=lambda x: x[0])] for r in rows.values()]
    ds = _finish(path, sequences, list(rows), "inter")
    ds.item_tokens = [PAD_TOKEN, *item_ids]
    ds.source.update(user_field=user_field, item_field=item_field,
                     time_field=time_field)
    if ti is None:
        _warn_file_order(path, f"no time column {tf!r} in the header")
    return ds


def guess_format(path: str) -> str:
    """`inter` for a `.inter` file, else `users`."""
    return "inter" if path.lower().endswith(".inter") else "users"


def read_file(path: str, fmt: str | None = None, user_field: str | None = None,
              item_field: str | None = None, time_field: str | None = None
              ) -> SeqDataset:
    """Reads `path` in format `fmt` (None: guess_format). The field names
    only apply to the inter format."""
    if fmt is None:
        fmt = guess_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if fmt == "inter":
        return read_recbole_inter(path, user_field, item_field, time_field)
    given = [k for k, v in (("user_field", user_field), ("item_field", item_field),
                            ("time_field", time_field)) if v]
    if given:
        raise ValueError(f"{', '.join(given)}: only the inter format has named "
                         f"columns, not {fmt}")
    if fmt == "users":
        return read_user_sequences(path)
    return read_interactions(path)


def synthetic(n_users: int = 2000, n_items: int = 400, seed: int = 0,
              complex_share: float = 0.5, noise: float = 0.05) -> SeqDataset:
    """Users of two kinds, so that a per-user model size matters.

    simple  short histories (5-15 items) that follow one global first-order
            chain over the first half of the items: a small model learns it.
    complex long histories (20-50 items) that repeat a user-specific pattern
            of 10-20 steps over 8-14 items of the second half, with repeats
            inside the pattern, so the next item depends on more than the
            last one: the model has to match the recent context against the
            user's own history.
    Each step is replaced by a random item of the user's half with
    probability `noise`. Deterministic given the seed.
    """
    if n_items < 40:
        raise ValueError("synthetic data needs n_items >= 40")
    rng = np.random.default_rng(seed)
    half = n_items // 2
    simple_items = np.arange(1, half + 1)
    complex_items = np.arange(half + 1, n_items + 1)
    succ = dict(zip(simple_items.tolist(), rng.permutation(simple_items).tolist()))
    types = (rng.random(n_users) < complex_share).astype(np.int64)
    sequences = []
    for t in types:
        if t == 0:
            n = int(rng.integers(5, 16))
            cur = int(rng.choice(simple_items))
            seq = [cur]
            for _ in range(n - 1):
                cur = (int(rng.choice(simple_items)) if rng.random() < noise
                       else succ[cur])
                seq.append(cur)
        else:
            n = int(rng.integers(20, 51))
            alphabet = rng.choice(complex_items, size=int(rng.integers(8, 15)),
                                  replace=False)
            pattern = rng.choice(alphabet, size=int(rng.integers(10, 21)))
            seq = [int(pattern[i % len(pattern)]) for i in range(n)]
            flip = rng.random(n) < noise
            for i in np.nonzero(flip)[0]:
                seq[i] = int(rng.choice(complex_items))
        sequences.append(seq)
    return SeqDataset("synthetic", sequences, list(range(1, n_users + 1)), n_items,
                      {"kind": "synthetic", "n_users": n_users, "n_items": n_items,
                       "seed": seed, "complex_share": complex_share, "noise": noise},
                      types)


def load(source: dict) -> SeqDataset:
    """Rebuild a data set from its `source` description (as saved in a
    checkpoint's config)."""
    kind = source.get("kind")
    if kind == "synthetic":
        keys = ("n_users", "n_items", "seed", "complex_share", "noise")
        return synthetic(**{k: source[k] for k in keys if k in source})
    if kind == "file":
        return read_file(source["path"], source.get("format", "users"),
                         **{k: source.get(k) for k in INTER_FIELDS})
    raise ValueError(f"unknown data source {source!r}")


# ------------------------------------------------------------ the split ----

@dataclass
class TrainSet:
    items: torch.Tensor        # [N, L] right-padded inputs
    targets: torch.Tensor      # [N, L] next item at each position, 0 at padding
    lengths: torch.Tensor      # [N]

    def __len__(self):
        return int(self.lengths.shape[0])


@dataclass
class EvalSet:
    items: torch.Tensor        # [U, L] right-padded last max_len items of the history
    lengths: torch.Tensor      # [U]
    targets: torch.Tensor      # [U] held-out item
    seen: torch.Tensor         # [U, H] the whole history (for seen-item masking), 0-padded
    users: torch.Tensor        # [U] index of the user in the data set

    def __len__(self):
        return int(self.lengths.shape[0])

    def subset(self, idx) -> "EvalSet":
        """The users `idx` (indices into this set), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return EvalSet(self.items[idx], self.lengths[idx], self.targets[idx],
                       self.seen[idx], self.users[idx])


@dataclass
class Split:
    train: TrainSet
    valid: EvalSet
    test: EvalSet
    n_items: int
    max_len: int


def pad_right(seqs, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> ([N, width] right-padded with 0, lengths [N])."""
    out = torch.zeros(len(seqs), max(width, 1), dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            out[i, :len(s)] = torch.as_tensor(s, dtype=torch.int64)
    return out, lengths


def _eval_set(histories, targets, users, max_len):
    items, lengths = pad_right([h[-max_len:] for h in histories], max_len)
    seen, _ = pad_right(histories, max((len(h) for h in histories), default=1))
    return EvalSet(items, lengths, torch.tensor(targets, dtype=torch.int64), seen,
                   torch.tensor(users, dtype=torch.int64))


def leave_one_out(ds: SeqDataset, max_len: int, windows: bool = False) -> Split:
    """Last item -> test, second-to-last -> validation, the rest -> training.

    Users with fewer than 3 items are only trained on. Training examples are
    the last max_len + 1 training items (inputs and shifted targets); with
    `windows`, longer training histories are cut into more examples from the
    end back, so every training target is predicted once.
    """
    train_in, train_tg = [], []
    v_hist, v_tgt, v_user, t_hist, t_tgt, t_user = [], [], [], [], [], []
    for u, seq in enumerate(ds.sequences):
        if len(seq) >= 3:
            train = seq[:-2]
            v_hist.append(seq[:-2]); v_tgt.append(seq[-2]); v_user.append(u)
            t_hist.append(seq[:-1]); t_tgt.append(seq[-1]); t_user.append(u)
        else:
            train = seq
        end = len(train)
        while end >= 2:
            w = train[max(0, end - max_len - 1):end]
            train_in.append(w[:-1]); train_tg.append(w[1:])
            if not windows:
                break
            end -= max_len
    if not v_tgt:
        raise ValueError(f"{ds.name}: no user has >= 3 items; nothing to evaluate")
    items, lengths = pad_right(train_in, max_len)
    targets, _ = pad_right(train_tg, max_len)
    return Split(TrainSet(items, targets, lengths),
                 _eval_set(v_hist, v_tgt, v_user, max_len),
                 _eval_set(t_hist, t_tgt, t_user, max_len), ds.n_items, max_len)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index tensors covering range(n); shuffled when a generator is given."""
    idx = torch.randperm(n, generator=generator) if generator is not None \
        else torch.arange(n)
    return list(idx.split(batch_size))
