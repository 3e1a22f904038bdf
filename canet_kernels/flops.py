"""Analytic FLOP and byte counts of the backbone and its ops: the one count
the model (CANetConfig.route_flops) and the benchmarks use.

FLOPs (a multiply-add is 2), per sample of n tokens at width w, per layer:
  projections  Q, K, V, O           4 * n * w^2 * 2
  FFN          up + down            2 * n * w * (ratio * w) * 2
  attention    scores + P @ V       2 * 2 * pairs * w,
               pairs = n (n + 1) / 2 causal, n^2 otherwise
LayerNorm, GELU, softmax and biases are left out (linear in w). A sample
counts only its own depth. The dense model counts every (padded) token at
the full width and depth. A training step counts 3x the forward (backward
= 2x forward), for every provider alike.

Bytes ("op-by-op" model, each op reads its inputs and writes its outputs
once, at the sample's width, in the element size of the dtype):
  attention    x, Q/K/V written and read, ctx written and read, out: 10 n w
  add + LN     x and residual read, out written:                      3 n w
  FFN          x, hidden written and read (ratio w), out: (2 + 2 ratio) n w
plus, per op call, the weight block of the widest active sample, read once.
A training step counts 3x the forward bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

OPS = ("sliced_attention", "sliced_ffn", "sliced_add_layernorm", "sliced_linear")


def _pairs(n: int, causal: bool) -> float:
    return n * (n + 1) / 2 if causal else float(n * n)


def op_flops(op: str, n: int, w: int, ratio: int = 4, causal: bool = True) -> float:
    """Forward FLOPs of one op on one sample (n tokens, width w)."""
    if op == "sliced_attention":
        return 4 * n * w * w * 2 + 2 * 2 * _pairs(n, causal) * w
    if op == "sliced_ffn":
        return 2 * n * w * ratio * w * 2
    if op == "sliced_linear":
        return n * w * w * 2
    if op == "sliced_add_layernorm":
        return 0.0
    raise ValueError(f"unknown op {op!r}")


def layer_flops(n: int, w: int, ratio: int = 4, causal: bool = True) -> float:
    return (op_flops("sliced_attention", n, w, ratio, causal)
            + op_flops("sliced_ffn", n, w, ratio, causal))


def _ints(v) -> list:
    return [int(a) for a in (v.tolist() if hasattr(v, "tolist") else v)]


def backbone_flops(lengths: Sequence, widths: Sequence, depths: Sequence,
                   ratio: int = 4, causal: bool = True) -> float:
    """Routed forward FLOPs of the layer stack: each sample at its own
    width and depth."""
    return sum(layer_flops(n, w, ratio, causal) * d
               for n, w, d in zip(_ints(lengths), _ints(widths), _ints(depths)))


def dense_flops(batch: int, seq_len: int, width: int, layers: int,
                ratio: int = 4, causal: bool = True) -> float:
    """Forward FLOPs of the max-size stack on a padded [batch, seq_len] batch."""
    return batch * layers * layer_flops(seq_len, width, ratio, causal)


def ops_flops(op: str, lengths, widths, ratio: int = 4, causal: bool = True) -> float:
    return sum(op_flops(op, n, w, ratio, causal)
               for n, w in zip(_ints(lengths), _ints(widths)))


def _act_elems(op: str, n: int, w: int, ratio: int) -> float:
    if op == "sliced_attention":
        return 10 * n * w
    if op == "sliced_add_layernorm":
        return 3 * n * w
    if op == "sliced_ffn":
        return (2 + 2 * ratio) * n * w
    if op == "sliced_linear":
        return 2 * n * w
    raise ValueError(f"unknown op {op!r}")


def _weight_elems(op: str, w: int, ratio: int) -> float:
    if op == "sliced_attention":
        return 4 * w * w + 4 * w
    if op == "sliced_add_layernorm":
        return 2 * w
    if op == "sliced_ffn":
        return 2 * ratio * w * w + (ratio + 1) * w
    if op == "sliced_linear":
        return w * w + w
    raise ValueError(f"unknown op {op!r}")


def op_bytes(op: str, lengths, widths, elem_size: int, ratio: int = 4) -> float:
    """Bytes of one op call over a batch (each sample at its width)."""
    ls, ws = _ints(lengths), _ints(widths)
    act = sum(_act_elems(op, n, w, ratio) for n, w in zip(ls, ws))
    wmax = max(ws) if ws else 0
    return (act + _weight_elems(op, wmax, ratio)) * elem_size


LAYER_OPS = ("sliced_attention", "sliced_add_layernorm", "sliced_ffn",
             "sliced_add_layernorm")


def backbone_bytes(lengths, widths, depths, elem_size: int, ratio: int = 4) -> float:
    """Forward bytes of the routed layer stack under the op-by-op model."""
    ls, ws, ds = _ints(lengths), _ints(widths), _ints(depths)
    total = 0.0
    for layer in range(max(ds) if ds else 0):
        act = [(n, w) for n, w, d in zip(ls, ws, ds) if d > layer]
        for op in LAYER_OPS:
            total += op_bytes(op, [a[0] for a in act], [a[1] for a in act],
                              elem_size, ratio)
    return total


def dense_bytes(batch: int, seq_len: int, width: int, layers: int, elem_size: int,
                ratio: int = 4) -> float:
    return backbone_bytes([seq_len] * batch, [width] * batch, [layers] * batch,
                          elem_size, ratio)


# The forward kernels of one layer and their share of the op counts above:
# sliced_attention is two kernels, the grouped-GEMM projections (x read, Q/K/V
# written, ctx read, out written: 6 n w) and the attention core (Q/K/V read,
# ctx written: 4 n w; the score FLOPs); the other ops are one kernel each.
KERNEL_FAMILIES = ("attention projections", "attention core", "add + LayerNorm", "FFN")


def _family_counts(family: str, n: int, w: int, ratio: int, causal: bool) -> tuple:
    """(FLOPs, activation elements) of one kernel family on one sample."""
    if family == "attention projections":
        return 4 * n * w * w * 2, 6 * n * w
    if family == "attention core":
        return 2 * 2 * _pairs(n, causal) * w, 4 * n * w
    if family == "add + LayerNorm":   # two per layer
        return 0.0, 2 * _act_elems("sliced_add_layernorm", n, w, ratio)
    if family == "FFN":
        return op_flops("sliced_ffn", n, w, ratio), _act_elems("sliced_ffn", n, w, ratio)
    raise ValueError(f"unknown kernel family {family!r}")


def stack_kernel_counts(lengths, widths, depths, elem_size: int, ratio: int = 4,
                        causal: bool = True) -> dict:
    """family -> (FLOPs, bytes) of the routed forward stack, per kernel family
    (KERNEL_FAMILIES), under the counts above; the weight block of the widest
    active sample is read once per layer and kernel. Sums to backbone_flops
    and backbone_bytes."""
    ls, ws, ds = _ints(lengths), _ints(widths), _ints(depths)
    out = {f: [0.0, 0.0] for f in KERNEL_FAMILIES}
    for layer in range(max(ds) if ds else 0):
        act = [(n, w) for n, w, d in zip(ls, ws, ds) if d > layer]
        if not act:
            break
        wmax = max(w for _, w in act)
        for fam in KERNEL_FAMILIES:
            for n, w in act:
                f, e = _family_counts(fam, n, w, ratio, causal)
                out[fam][0] += f
                out[fam][1] += e * elem_size
            if fam == "attention projections":
                wel = _weight_elems("sliced_attention", wmax, ratio)
            elif fam == "attention core":
                wel = 0.0
            elif fam == "add + LayerNorm":
                wel = 2 * _weight_elems("sliced_add_layernorm", wmax, ratio)
            else:
                wel = _weight_elems("sliced_ffn", wmax, ratio)
            out[fam][1] += wel * elem_size
    return {f: tuple(v) for f, v in out.items()}
