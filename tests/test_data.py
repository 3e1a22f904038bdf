"""Data readers, malformed files, synthetic data and the leave-one-out split."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from canet_kernels import data as D

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
BEAUTY = os.path.join(SHARED, "Beauty.txt")


def write(tmp_path, text, name="d.txt"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.fixture
def beauty_head(tmp_path):
    if not os.path.exists(BEAUTY):
        pytest.skip(f"{BEAUTY} is not here")
    with open(BEAUTY) as f:
        lines = [next(f) for _ in range(40)]
    return write(tmp_path, "".join(lines), "beauty40.txt"), lines


def test_read_beauty_lines(beauty_head):
    path, lines = beauty_head
    ds = D.read_file(path, "users")
    assert len(ds.sequences) == 40
    first = [int(v) for v in lines[0].split()]
    assert ds.users[0] == first[0] and ds.sequences[0] == first[1:]
    assert ds.n_items == max(max(int(v) for v in l.split()[1:]) for l in lines)
    split = D.leave_one_out(ds, max_len=50)
    seq = ds.sequences[1]                           # "2 6 7 8 9 10 4 11"
    assert split.test.targets[1] == seq[-1] and split.valid.targets[1] == seq[-2]
    n = split.test.lengths[1]
    assert split.test.items[1, :n].tolist() == seq[:-1]


def test_pairs_format_keeps_time_order(tmp_path):
    path = write(tmp_path, "1 5\n2 7\n1 3\n1 9\n2 8\n2 1\n1 2\n")
    with pytest.warns(D.TimeOrderWarning, match="file order") as caught:
        ds = D.read_file(path, "pairs")
    assert len(caught) == 1 and path in str(caught[0].message)   # once per file
    assert ds.users == [1, 2]
    assert ds.sequences == [[5, 3, 9, 2], [7, 8, 1]]
    assert ds.n_items == 9


def test_users_and_pairs_agree(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # users: time order by convention, silent
        u = D.read_file(write(tmp_path, "1 4 5 6\n2 6 4\n", "u.txt"), "users")
    with pytest.warns(D.TimeOrderWarning):
        p = D.read_file(write(tmp_path, "1 4\n1 5\n2 6\n1 6\n2 4\n", "p.txt"),
                        "pairs")
    assert u.sequences == p.sequences and u.n_items == p.n_items


# RecBole atomic .inter files: tab-separated, typed header. Lines out of time
# order; u3's plum and apple share t=7 and must keep their file order (plum
# first), which is neither id nor alphabetical order.
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "u1\tapple\t4\t30\n"
         "u2\tpear\t3\t5\n"
         "u1\tkiwi\t5\t10\n"
         "u1\tplum\t2\t20.5\n"
         "u3\tplum\t1\t7\n"
         "\n"
         "u2\tapple\t1\t1\n"
         "u3\tapple\t1\t7\n"
         "u1\tfig\t3\t40\n"
         "u3\tkiwi\t2\t3e0\n")


def test_inter_remaps_tokens_and_sorts_by_time(tmp_path):
    path = write(tmp_path, INTER, "d.inter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # it has a time column: no warning
        ds = D.read_file(path, "inter")
    # item ids in order of first appearance in the file (as RecBole's remap)
    assert ds.item_tokens == ["[PAD]", "apple", "pear", "kiwi", "plum", "fig"]
    assert ds.n_items == 5
    assert ds.users == ["u1", "u2", "u3"]
    tokens = [[ds.item_tokens[i] for i in s] for s in ds.sequences]
    assert tokens == [["kiwi", "plum", "apple", "fig"], ["apple", "pear"],
                      ["kiwi", "plum", "apple"]]
    assert ds.sequences == [[3, 4, 1, 5], [1, 2], [3, 4, 1]]
    assert ds.source["format"] == "inter" and ds.name == "d"
    again = D.load(ds.source)                 # how a checkpoint reloads it
    assert again.sequences == ds.sequences and again.item_tokens == ds.item_tokens
    assert D.read_file(path).sequences == ds.sequences   # .inter: format guessed


def test_inter_leave_one_out_by_hand(tmp_path):
    ds = D.read_file(write(tmp_path, INTER, "d.inter"), "inter")
    s = D.leave_one_out(ds, max_len=3)
    # u1 kiwi plum apple fig: train kiwi plum, valid apple, test fig
    # u2 apple pear (2 items): training only
    # u3 kiwi plum apple: train kiwi (no training example), valid plum, test apple
    assert s.train.items.tolist() == [[3, 0, 0], [1, 0, 0]]
    assert s.train.targets.tolist() == [[4, 0, 0], [2, 0, 0]]
    assert s.valid.users.tolist() == [0, 2] and s.test.users.tolist() == [0, 2]
    assert [ds.item_tokens[i] for i in s.valid.targets] == ["apple", "plum"]
    assert [ds.item_tokens[i] for i in s.test.targets] == ["fig", "apple"]
    assert s.test.items.tolist() == [[3, 4, 1], [3, 4, 0]]


def test_inter_field_names(tmp_path):
    text = ("ts:float\tiid:token\tuid:token\tuser_id:token\n"
            "2\tx\t7\tz\n1\ty\t7\tz\n3\tx\t8\tz\n")
    path = write(tmp_path, text, "f.inter")
    ds = D.read_file(path, "inter", user_field="uid", item_field="iid", time_field="ts")
    assert ds.users == ["7", "8"] and ds.sequences == [[2, 1], [1]]
    assert ds.item_tokens == ["[PAD]", "x", "y"]
    assert D.load(ds.source).sequences == ds.sequences
    with pytest.raises(D.DataFormatError, match=f"{path}:1: no time column 'time'"):
        D.read_file(path, "inter", user_field="uid", item_field="iid",
                    time_field="time")
    with pytest.raises(ValueError, match="only the inter format"):
        D.read_file(write(tmp_path, "1 2 3\n"), "users", user_field="uid")


def test_inter_without_time_warns_and_keeps_file_order(tmp_path):
    path = write(tmp_path, "user_id:token\titem_id:token\nu\tb\nu\ta\nv\ta\nu\tc\n",
                 "n.inter")
    with pytest.warns(D.TimeOrderWarning, match="no time column 'timestamp'") as caught:
        ds = D.read_file(path, "inter")
    assert len(caught) == 1 and path in str(caught[0].message)
    assert "file order" in str(caught[0].message)
    assert ds.sequences == [[1, 2, 3], [2]]


H = "user_id:token\titem_id:token\ttimestamp:float\n"


@pytest.mark.parametrize("text,line,what", [
    ("u1\ta\t1\nu2\tb\t2\n", 1, "expected a typed RecBole header"),
    ("user_id\titem_id\ttimestamp\nu1\ta\t1\n", 1, "expected a typed RecBole header"),
    ("user_id:token item_id:token timestamp:float\n", 1, "separated by tabs"),
    ("\nuser_id:token\titem_id:int\n", 2, "type must be one of token, token_seq"),
    ("user_id:token\titem_id:token\tuser_id:float\n", 1, "'user_id' appears twice"),
    ("uid:token\titem_id:token\n", 1, "no user column 'user_id'"),
    ("user_id:token\tiid:token\n", 1, "no item column 'item_id'"),
    ("user_id:float\titem_id:token\n", 1, "must be of type token, got float"),
    ("user_id:token\titem_id:token\ttimestamp:token\n", 1, "must be of type float"),
    (H + "u1\ta\t1\nu1\tb\n", 3, "expected 3 tab-separated columns"),
    (H + "u1\ta\t1\tx\n", 2, "as in the header on line 1, got 4"),
    (H + "u1 a 1\n", 2, "columns must be separated by tabs"),
    (H + "u1\ta\t1\nu1\tb\tnoon\n", 3, "expected a finite number, got 'noon'"),
    (H + "u1\ta\t\n", 2, "expected a finite number, got ''"),
    (H + "u1\ta\tnan\n", 2, "expected a finite number, got 'nan'"),
    (H + "u1\t\t1\n", 2, "empty item token"),
    (H + "\tb\t1\n", 2, "empty user token"),
    (H, 1, "no interactions found"),
    ("", 1, "empty file"),
    ("\n \n", 1, "empty file"),
])
def test_malformed_inter_files_name_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, text, "bad.inter")
    with pytest.raises(D.DataFormatError) as err:
        D.read_file(path, "inter")
    assert f"{path}:{line}:" in str(err.value)
    assert what in str(err.value)


@pytest.mark.parametrize("fmt,text,line,what", [
    ("users", "1 2 3\n2 4 x5\n", 2, "expected an integer, got 'x5'"),
    ("users", "1 2 3\n\n3 0 4\n", 3, "item ids must be >= 1"),
    ("users", "1 2 3\n1 4 5\n", 2, "user 1 already appeared on line 1"),
    ("users", "1 2 3\n7\n", 2, "user 7 has no items"),
    ("users", "1 2 3\n2 4 -1\n", 2, "item ids must be >= 1"),
    ("pairs", "1 2\n1 3\n1 2 3\n", 3, "expected 2 columns"),
    ("pairs", "1 2\n1 3.5\n", 2, "expected an integer, got '3.5'"),
])
def test_malformed_files_name_file_and_line(tmp_path, fmt, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(D.DataFormatError) as err:
        D.read_file(path, fmt)
    assert f"{path}:{line}:" in str(err.value)
    assert what in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(D.DataFormatError, match="no interactions"):
        D.read_file(write(tmp_path, "\n\n"), "users")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.read_file(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="format"):
        D.read_file(write(tmp_path, "1 2\n"), "csv")


def test_leave_one_out_by_hand(tmp_path):
    ds = D.read_file(write(tmp_path, "1 1 2 3 4 5 6\n2 7 8\n3 9 10 11\n"), "users")
    s = D.leave_one_out(ds, max_len=3)
    # user 1: train 1 2 3 4 -> last max_len + 1 = 4 items: inputs 1 2 3, targets 2 3 4
    # user 2 (2 items): training only: inputs 7, targets 8
    # user 3: train 9 -> a single item gives no training example
    assert s.train.items.tolist() == [[1, 2, 3], [7, 0, 0]]
    assert s.train.targets.tolist() == [[2, 3, 4], [8, 0, 0]]
    assert s.train.lengths.tolist() == [3, 1]
    assert s.valid.users.tolist() == [0, 2] and s.test.users.tolist() == [0, 2]
    assert s.valid.targets.tolist() == [5, 10]
    assert s.test.targets.tolist() == [6, 11]
    # histories truncated to the last max_len items, seen = the whole history
    assert s.valid.items.tolist() == [[2, 3, 4], [9, 0, 0]]
    assert s.test.items.tolist() == [[3, 4, 5], [9, 10, 0]]
    assert s.test.seen.tolist() == [[1, 2, 3, 4, 5], [9, 10, 0, 0, 0]]


def test_windows_cover_every_training_target(tmp_path):
    seq = list(range(1, 13))                        # train part: 1..10
    ds = D.read_file(write(tmp_path, "1 " + " ".join(map(str, seq)) + "\n"), "users")
    s = D.leave_one_out(ds, max_len=4, windows=True)
    tg = s.train.targets[s.train.targets > 0].tolist()
    assert sorted(tg) == list(range(2, 11))
    last = D.leave_one_out(ds, max_len=4)
    assert last.train.targets.tolist() == [[7, 8, 9, 10]]


def test_synthetic_is_seeded_and_mixed():
    a = D.synthetic(200, 100, seed=3)
    b = D.synthetic(200, 100, seed=3)
    c = D.synthetic(200, 100, seed=4)
    assert a.sequences == b.sequences and a.sequences != c.sequences
    types = a.user_types
    assert 0 < types.mean() < 1
    lens = np.array([len(s) for s in a.sequences])
    assert lens[types == 0].max() <= 15 and lens[types == 1].min() >= 20
    half = a.n_items // 2
    for s, t in zip(a.sequences, types):
        assert all(1 <= v <= a.n_items for v in s)
        if t == 0:
            assert all(v <= half for v in s)
    assert D.load(a.source).sequences == a.sequences


def test_simple_users_follow_one_chain():
    ds = D.synthetic(300, 100, seed=0, noise=0.0)
    succ = {}
    for s, t in zip(ds.sequences, ds.user_types):
        if t == 0:
            for x, y in zip(s, s[1:]):
                assert succ.setdefault(x, y) == y


def test_pad_right_and_batches():
    items, lengths = D.pad_right([[1, 2], [3], []], 3)
    assert items.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [2, 1, 0]
    g = torch.Generator().manual_seed(0)
    parts = D.batches(10, 4, g)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
