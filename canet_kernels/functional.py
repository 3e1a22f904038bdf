"""Functional API of the canet ops.

Each function takes packed tokens `x[T, D]` with `cu_seqlens` (int32/int64,
B + 1 offsets) or, for convenience, a padded batch `x[B, L, D]` with
`lengths[B]` (right padding, or left padding with `left_padded=True`); the
padded form packs, runs the op and unpacks, and padded positions come back
as zeros. Routes are tensors of per-sample widths.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  registers fakes and autograd

_canet = torch.ops.canet


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    cu = lengths.new_zeros(lengths.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), 0, out=cu[1:])
    return cu


def _token_index(lengths, L, left_padded):
    """Flat indices into [B * L] of the real tokens, in packed order."""
    B = lengths.shape[0]
    pos = torch.arange(L, device=lengths.device).expand(B, L)
    lengths = lengths.to(pos.dtype)[:, None]
    keep = pos >= (L - lengths) if left_padded else pos < lengths
    return keep.reshape(-1).nonzero().squeeze(1)


def pack(x, lengths, left_padded=False):
    """[B, L, D] padded -> (packed [T, D], cu_seqlens [B + 1])."""
    if x.dim() != 3:
        raise ValueError(f"pack: x must be [B, L, D], got shape {tuple(x.shape)}")
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"pack: lengths must have shape ({x.shape[0]},), got "
                         f"{tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > x.shape[1]).any():
        raise ValueError(f"pack: lengths must lie in [0, {x.shape[1]}]")
    idx = _token_index(lengths, x.shape[1], left_padded)
    return x.reshape(-1, x.shape[2]).index_select(0, idx), \
        cu_seqlens_from_lengths(lengths)


def unpack(packed, lengths, L, left_padded=False):
    """packed [T, D] -> [B, L, D] with zeros at padded positions."""
    B, D = lengths.shape[0], packed.shape[1]
    idx = _token_index(lengths, L, left_padded)
    out = packed.new_zeros(B * L, D).index_copy(0, idx, packed)
    return out.reshape(B, L, D)


def _padded(fn, x, lengths, left_padded, *args):
    if lengths is None:
        raise ValueError("a padded x[B, L, D] needs lengths[B]")
    packed, cu = pack(x, lengths, left_padded)
    return unpack(fn(packed, cu, *args), lengths, x.shape[1], left_padded)


def sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias=None):
    """y[:, :o_b] = x[:, :i_b] @ weight[:o_b, :i_b].T + bias[:o_b]; zero beyond."""
    return _canet.sliced_linear(x, cu_seqlens, in_widths, out_widths, weight, bias)


def sliced_attention(x, cu_seqlens_or_lengths, widths, w_qkv, b_qkv, w_o, b_o,
                     num_heads, causal=True, left_padded=False):
    """Self-attention sublayer at per-sample width (w_qkv [3, D, D], w_o [D, D])."""
    if x.dim() == 3:
        return _padded(lambda p, cu: sliced_attention(
            p, cu, widths, w_qkv, b_qkv, w_o, b_o, num_heads, causal),
            x, cu_seqlens_or_lengths, left_padded)
    return _canet.sliced_attention(x, cu_seqlens_or_lengths, widths, w_qkv, b_qkv,
                                   w_o, b_o, num_heads, causal)


def sliced_ffn(x, cu_seqlens_or_lengths, widths, w1, b1, w2, b2, ratio=4,
               left_padded=False):
    """FFN sublayer gelu(x W1^T + b1) W2^T + b2 at per-sample width."""
    if x.dim() == 3:
        return _padded(lambda p, cu: sliced_ffn(p, cu, widths, w1, b1, w2, b2, ratio),
                       x, cu_seqlens_or_lengths, left_padded)
    return _canet.sliced_ffn(x, cu_seqlens_or_lengths, widths, w1, b1, w2, b2, ratio)


def sliced_add_layernorm(x, residual, cu_seqlens_or_lengths, widths, weight, bias,
                         eps=1e-5, left_padded=False):
    """LayerNorm(x + residual) over each sample's first width features."""
    if x.dim() == 3:
        lengths = cu_seqlens_or_lengths
        if lengths is None:
            raise ValueError("a padded x[B, L, D] needs lengths[B]")
        r, _ = pack(residual, lengths, left_padded)
        return _padded(lambda p, cu: sliced_add_layernorm(
            p, r, cu, widths, weight, bias, eps), x, lengths, left_padded)
    return _canet.sliced_add_layernorm(x, residual, cu_seqlens_or_lengths, widths,
                                       weight, bias, eps)
