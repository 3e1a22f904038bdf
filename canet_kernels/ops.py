"""Python side of the canet ops: fake (meta) kernels, autograd, and the
functional API that also accepts padded batches.

The schemas live in csrc/registration.cpp; backends register kernels for the
`*_fwd` / `*_backward` ops and for `sliced_linear(_backward)`. `KernelOps`
runs the same autograd over an explicit kernel table (e.g. the Triton
launchers) instead of the dispatcher.
"""
from __future__ import annotations

import contextlib
import os
import sys
from types import SimpleNamespace

import torch

from . import _library

_library.load()
ops = torch.ops.canet

_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(x):
    return torch.float32 if x.dtype in _HALF else x.dtype


# ---------------------------------------------------------------- fakes ----
# Shape checks only, no data access (routes may live on the GPU).

def _check_packed(x, cu_seqlens, widths, name="widths"):
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, features], got {x.dim()}-D")
    torch._check(cu_seqlens.dim() == 1, lambda: "cu_seqlens must be 1-D")
    torch._check(widths.dim() == 1, lambda: f"{name} must be 1-D")
    torch._check(widths.shape[0] + 1 == cu_seqlens.shape[0],
                 lambda: f"{name} needs one entry per sample (len(cu_seqlens) - 1)")


@torch.library.register_fake("canet::sliced_linear")
def _(x, cu_seqlens, in_widths, out_widths, weight, bias):
    _check_packed(x, cu_seqlens, in_widths, "in_widths")
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("canet::sliced_linear_backward")
def _(grad_out, x, cu_seqlens, in_widths, out_widths, weight, has_bias):
    gb = weight.new_empty(weight.shape[0] if has_bias else 0)
    return torch.empty_like(x), torch.empty_like(weight), gb


@torch.library.register_fake("canet::sliced_attention_fwd")
def _(x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads, causal=True,
      save_activations=True):
    _check_packed(x, cu_seqlens, widths)
    T, D = x.shape
    S = T if save_activations else 0
    return (x.new_empty(T, D), x.new_empty(S, 3, D), x.new_empty(S, D),
            x.new_empty(S, num_heads, dtype=_stat_dtype(x)))


@torch.library.register_fake("canet::sliced_attention_backward")
def _(grad_out, x, cu_seqlens, widths, w_qkv, w_o, qkv, ctx, lse, num_heads,
      causal):
    return (torch.empty_like(x), torch.empty_like(w_qkv),
            w_qkv.new_empty(w_qkv.shape[0], w_qkv.shape[1]),
            torch.empty_like(w_o), w_o.new_empty(w_o.shape[0]))


@torch.library.register_fake("canet::sliced_ffn_fwd")
def _(x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4, save_hidden=True):
    _check_packed(x, cu_seqlens, widths)
    return torch.empty_like(x), x.new_empty(x.shape[0] if save_hidden else 0, w1.shape[0])


@torch.library.register_fake("canet::sliced_ffn_backward")
def _(grad_out, x, cu_seqlens, widths, w1, w2, hidden, ratio):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]))


@torch.library.register_fake("canet::sliced_add_layernorm_fwd")
def _(x, residual, cu_seqlens, widths, weight, bias, eps=1e-5):
    _check_packed(x, cu_seqlens, widths)
    T = x.shape[0]
    return (torch.empty_like(x), x.new_empty(T, dtype=_stat_dtype(x)),
            x.new_empty(T, dtype=_stat_dtype(x)))


@torch.library.register_fake("canet::sliced_add_layernorm_backward")
def _(grad_out, x, residual, cu_seqlens, widths, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


# ------------------------------------------------------------- autograd ----
# One set of formulas: registered for torch.ops.canet below, and applied by
# KernelOps to an explicit kernel table (the backward kernels come from
# `ctx.kernels` there, from torch.ops.canet here).

def _kernels(ctx):
    return getattr(ctx, "kernels", ops)


def _keep(ctx, grads):
    """None for inputs that need no gradient (ctx.needs_input_grad)."""
    return tuple(g if need else None
                 for g, need in zip(grads, ctx.needs_input_grad))


def _linear_setup(ctx, inputs, output):
    x, cu_seqlens, in_widths, out_widths, weight, bias = inputs
    ctx.save_for_backward(x, cu_seqlens, in_widths, out_widths, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out):
    x, cu, iw, ow, weight = ctx.saved_tensors
    gx, gw, gb = _kernels(ctx).sliced_linear_backward(
        grad_out.contiguous(), x, cu, iw, ow, weight, ctx.has_bias)
    return _keep(ctx, (gx, None, None, None, gw, gb if ctx.has_bias else None))


torch.library.register_autograd("canet::sliced_linear", _linear_backward,
                                setup_context=_linear_setup)


def _attention_setup(ctx, inputs, output):
    x, cu, widths, w_qkv, b_qkv, w_o, b_o, num_heads, causal, _save = inputs
    _, qkv, attn_ctx, lse = output
    ctx.save_for_backward(x, cu, widths, w_qkv, w_o, qkv, attn_ctx, lse)
    ctx.num_heads, ctx.causal = num_heads, causal
    ctx.mark_non_differentiable(qkv, attn_ctx, lse)


def _attention_backward(ctx, grad_out, *_aux):
    x, cu, widths, w_qkv, w_o, qkv, attn_ctx, lse = ctx.saved_tensors
    grads = _kernels(ctx).sliced_attention_backward(
        grad_out.contiguous(), x, cu, widths, w_qkv, w_o, qkv, attn_ctx, lse,
        ctx.num_heads, ctx.causal)
    gx, gwqkv, gbqkv, gwo, gbo = grads
    return _keep(ctx, (gx, None, None, gwqkv, gbqkv, gwo, gbo, None, None))


torch.library.register_autograd("canet::sliced_attention_fwd",
                                _attention_backward,
                                setup_context=_attention_setup)


def _ffn_setup(ctx, inputs, output):
    x, cu, widths, w1, b1, w2, b2, ratio, _save_hidden = inputs
    ctx.save_for_backward(x, cu, widths, w1, w2, output[1])
    ctx.ratio = ratio
    ctx.mark_non_differentiable(output[1])


def _ffn_backward(ctx, grad_out, _grad_hidden):
    x, cu, widths, w1, w2, hidden = ctx.saved_tensors
    gx, gw1, gb1, gw2, gb2 = _kernels(ctx).sliced_ffn_backward(
        grad_out.contiguous(), x, cu, widths, w1, w2, hidden, ctx.ratio)
    return _keep(ctx, (gx, None, None, gw1, gb1, gw2, gb2, None, None))


torch.library.register_autograd("canet::sliced_ffn_fwd", _ffn_backward,
                                setup_context=_ffn_setup)


def _ln_setup(ctx, inputs, output):
    x, residual, cu, widths, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, cu, widths, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, grad_out, _gm, _gr):
    x, residual, cu, widths, weight, mean, rstd = ctx.saved_tensors
    gin, gw, gb = _kernels(ctx).sliced_add_layernorm_backward(
        grad_out.contiguous(), x, residual, cu, widths, weight, mean, rstd)
    return _keep(ctx, (gin, gin, None, None, gw, gb, None))


torch.library.register_autograd("canet::sliced_add_layernorm_fwd", _ln_backward,
                                setup_context=_ln_setup)


_FORMULAS = {
    "sliced_linear": (_linear_setup, _linear_backward),
    "sliced_attention_fwd": (_attention_setup, _attention_backward),
    "sliced_ffn_fwd": (_ffn_setup, _ffn_backward),
    "sliced_add_layernorm_fwd": (_ln_setup, _ln_backward),
}


class _WithKernels(torch.autograd.Function):
    """apply(*op_inputs, name, kernels): kernels.<name>(*op_inputs) with the
    formulas above; `name` and `kernels` (and any trailing input a formula
    returns no gradient for) get None."""

    @staticmethod
    def forward(*args):
        *inputs, name, kernels = args
        return getattr(kernels, name)(*inputs)

    @staticmethod
    def setup_context(ctx, args, output):
        *inputs, name, kernels = args
        ctx.kernels, ctx.formula, ctx.num_args = kernels, name, len(args)
        _FORMULAS[name][0](ctx, tuple(inputs), output)

    @staticmethod
    def backward(ctx, *grads):
        g = _FORMULAS[ctx.formula][1](ctx, *grads)
        return g + (None,) * (ctx.num_args - len(g))


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


class KernelOps:
    """canet's ops with the functional signatures (an `ops` object for
    functional.routed_layer) run by an explicit kernel table instead of the
    dispatcher, e.g. KernelOps(canet_kernels.triton.KERNELS): the Triton
    launchers on any tensors they accept (CPU ones under TRITON_INTERPRET=1)
    whatever kernels torch.ops.canet serves. Same autograd formulas as
    torch.ops.canet; without gradients the launchers save nothing."""

    def __init__(self, kernels):
        self.kernels = SimpleNamespace(**kernels) if isinstance(kernels, dict) else kernels

    def _run(self, name, *inputs):
        return _WithKernels.apply(*inputs, name, self.kernels)

    def sliced_linear(self, x, cu_seqlens, in_widths, out_widths, weight, bias=None):
        if not _needs_grad(x, weight, bias):
            return self.kernels.sliced_linear(x, cu_seqlens, in_widths, out_widths,
                                              weight, bias)
        return self._run("sliced_linear", x, cu_seqlens, in_widths, out_widths, weight,
                         bias)

    def sliced_attention(self, x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads,
                         causal=True):
        save = _needs_grad(x, w_qkv, b_qkv, w_o, b_o)
        args = (x, cu_seqlens, widths, w_qkv, b_qkv, w_o, b_o, num_heads, causal, save)
        if not save:
            return self.kernels.sliced_attention_fwd(*args)[0]
        return self._run("sliced_attention_fwd", *args)[0]

    def sliced_ffn(self, x, cu_seqlens, widths, w1, b1, w2, b2, ratio=4):
        save = _needs_grad(x, w1, b1, w2, b2)
        args = (x, cu_seqlens, widths, w1, b1, w2, b2, ratio, save)
        if not save:
            return self.kernels.sliced_ffn_fwd(*args)[0]
        return self._run("sliced_ffn_fwd", *args)[0]

    def sliced_add_layernorm(self, x, residual, cu_seqlens, widths, weight, bias,
                             eps=1e-5):
        args = (x, residual, cu_seqlens, widths, weight, bias, eps)
        if not _needs_grad(x, residual, weight, bias):
            return self.kernels.sliced_add_layernorm_fwd(*args)[0]
        return self._run("sliced_add_layernorm_fwd", *args)[0]


# --------------------------------------------------------------- backends --
# CUDA tensors: a CUDA C++ kernel where csrc/cuda has one, Triton for the rest;
# CANET_BACKEND=triton routes every op on CUDA tensors to Triton.

def _register_triton():
    if not torch.cuda.is_available():
        return
    try:
        from .triton import register
    except ImportError:  # triton missing: `python -m canet_kernels.info` says so
        return
    register(force=os.environ.get("CANET_BACKEND", "") == "triton")


_register_triton()


def shared_plans():
    """A scope (context manager) in which the Triton kernels build each tile
    plan of a route layout once and share it between ops and layers
    (canet_kernels.triton.shared_plans); open it around one forward. A no-op
    where the Triton kernels are not loaded and while torch.compile traces
    (the compiled code launches the ops later, outside it)."""
    mod = sys.modules.get("canet_kernels.triton")
    if mod is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return mod.shared_plans()


# ------------------------------------------------------- routed scoring ----
# sliced_linear_cross_entropy(_fwd/_backward) and sliced_linear_topk: rows
# h [N, D] at widths [N] scored against the item table without the [N, V]
# logits (schemas and contract in csrc/registration.cpp).

def _check_rows(h, widths, name="h"):
    torch._check(h.dim() == 2, lambda: f"{name} must be rows [N, features], got {h.dim()}-D")
    torch._check(widths.dim() == 1, lambda: "widths must be 1-D (one width per row)")
    torch._check(widths.shape[0] == h.shape[0],
                 lambda: "widths needs one entry per row of h")


@torch.library.register_fake("canet::sliced_linear_cross_entropy_fwd")
def _(h, widths, weight, bias, targets, ignore_index=-100, chunk_size=4096):
    _check_rows(h, widths)
    torch._check(targets.shape == h.shape[:1], lambda: "targets needs one entry per row of h")
    st = _stat_dtype(h)
    return h.new_empty((), dtype=st), h.new_empty(h.shape[0], dtype=st)


@torch.library.register_fake("canet::sliced_linear_cross_entropy_backward")
def _(grad_loss, h, widths, weight, bias, targets, lse, ignore_index, chunk_size):
    return (h.new_empty(h.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


@torch.library.register_fake("canet::sliced_linear_topk")
def _(h, widths, weight, bias, k, chunk_size=4096, exclude=None):
    _check_rows(h, widths)
    return h.new_empty(h.shape[0], k), h.new_empty(h.shape[0], k, dtype=torch.int64)


def _lce_setup(ctx, inputs, output):
    h, widths, weight, bias, targets, ignore_index, chunk_size = inputs
    ctx.save_for_backward(h, widths, weight, bias, targets, output[1])
    ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, grad_loss, _grad_lse):
    h, widths, weight, bias, targets, lse = ctx.saved_tensors
    gh, gw, gb = _kernels(ctx).sliced_linear_cross_entropy_backward(
        grad_loss, h, widths, weight, bias, targets, lse, ctx.ignore_index,
        ctx.chunk_size)
    return _keep(ctx, (gh, None, gw, gb if bias is not None else None, None, None, None))


torch.library.register_autograd("canet::sliced_linear_cross_entropy_fwd", _lce_backward,
                                setup_context=_lce_setup)


def _topk_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _topk_backward(ctx, _gv, _gi):
    return (None,) * 7


# top-k values carry no gradient: inputs that require one are fine
torch.library.register_autograd("canet::sliced_linear_topk", _topk_backward,
                                setup_context=_topk_setup)

_FORMULAS["sliced_linear_cross_entropy_fwd"] = (_lce_setup, _lce_backward)


def _kernel_ops_cross_entropy(self, h, widths, weight, bias, targets, ignore_index=-100,
                              chunk_size=4096):
    args = (h, widths, weight, bias, targets, ignore_index, chunk_size)
    if not _needs_grad(h, weight, bias):
        return self.kernels.sliced_linear_cross_entropy_fwd(*args)[0]
    return self._run("sliced_linear_cross_entropy_fwd", *args)[0]


def _kernel_ops_topk(self, h, widths, weight, bias, k, chunk_size=4096, exclude=None):
    with torch.no_grad():
        return self.kernels.sliced_linear_topk(h, widths, weight, bias, k, chunk_size,
                                               exclude)


KernelOps.sliced_linear_cross_entropy = _kernel_ops_cross_entropy
KernelOps.sliced_linear_topk = _kernel_ops_topk
