"""Triton kernels of the canet ops (installed as `canet_kernels.triton`).

Every op runs a whole batch of mixed routes in a fixed number of launches,
with tile metadata built on the device (no host sync: CUDA-graph
capturable). The launchers below take the op schema's arguments in the same
order and work on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

`register()` serves torch.ops.canet.* on CUDA tensors with these kernels for
every op that has no CUDA C++ kernel; `register(force=True)` (what
CANET_BACKEND=triton does) takes every op.
"""
from __future__ import annotations

import os

import torch

from .sliced_add_layernorm import (sliced_add_layernorm_backward,
                                   sliced_add_layernorm_fwd)
from .sliced_attention import sliced_attention_backward, sliced_attention_fwd
from .sliced_ffn import sliced_ffn_backward, sliced_ffn_fwd
from .sliced_linear import sliced_linear, sliced_linear_backward
from .sliced_linear_cross_entropy import (sliced_linear_cross_entropy_backward,
                                          sliced_linear_cross_entropy_fwd)
from .sliced_linear_topk import sliced_linear_topk
from ._tiles import shared_plans

# Kernels are compiled or interpreted depending on TRITON_INTERPRET at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNELS = {
    "sliced_linear": sliced_linear,
    "sliced_linear_backward": sliced_linear_backward,
    "sliced_attention_fwd": sliced_attention_fwd,
    "sliced_attention_backward": sliced_attention_backward,
    "sliced_ffn_fwd": sliced_ffn_fwd,
    "sliced_ffn_backward": sliced_ffn_backward,
    "sliced_add_layernorm_fwd": sliced_add_layernorm_fwd,
    "sliced_add_layernorm_backward": sliced_add_layernorm_backward,
    "sliced_linear_cross_entropy_fwd": sliced_linear_cross_entropy_fwd,
    "sliced_linear_cross_entropy_backward": sliced_linear_cross_entropy_backward,
    "sliced_linear_topk": sliced_linear_topk,
}

_registered: set = set()


def register(force: bool = False) -> list:
    """Register the Triton launchers as the CUDA kernels of canet's ops.

    Ops that already have a CUDA kernel (C++) keep it unless `force`.
    Returns the names of the ops that Triton serves after the call.
    """
    for name, fn in KERNELS.items():
        if name in _registered:
            continue
        qualname = f"canet::{name}"
        if not force and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
            continue
        torch.library.register_kernel(qualname, "cuda", fn)
        _registered.add(name)
    return sorted(_registered)


__all__ = ["register", "shared_plans", "KERNELS", "INTERPRETED"] + list(KERNELS)
