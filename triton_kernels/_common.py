"""Argument checks and small helpers shared by the Triton launchers.

Checks look at shapes, dtypes and devices only: reading a route value would
synchronise with the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def next_pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(int(n), 1)))


def acc_type(dtype):
    """Accumulator type inside kernels: fp32, fp64 for fp64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def index_type(*tensors):
    """Row offsets in 32-bit unless a tensor is too large for them."""
    return tl.int64 if any(t.numel() >= 2 ** 31 for t in tensors) else tl.int32


def stat_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


# Tile shapes of the compiled (GPU) kernels: one table, per kernel and dtype
# class ("half": bf16/fp16 on tensor cores; "full": fp32/fp64, whose dots
# run on CUDA cores and want smaller tiles). benchmarks/tune_triton.py
# times alternatives by overriding entries. mm/dw: grouped GEMM and weight
# gradient (BM rows, BN columns, BK reduction); ffn: BM rows, BH-wide
# chunks of the r*w intermediate, BK reduction (XRES=True: no K loop, the
# row tile's x held for all chunks); attn: BM queries, BN keys. Defaults
# from benchmarks/tune_triton.py on an H100 (bf16, the 1024 x 200 batch).
BLOCKS = {
    ("mm", "half"): dict(BM=64, BN=128, BK=32, warps=4, stages=3),
    ("mm", "full"): dict(BM=64, BN=64, BK=32, warps=4, stages=3),
    ("dw", "half"): dict(BM=64, BN=64, BK=64, warps=4, stages=3),
    ("dw", "full"): dict(BM=64, BN=64, BK=64, warps=4, stages=3),
    ("ffn", "half"): dict(BM=128, BH=64, BK=32, warps=8, stages=3, XRES=True),
    ("ffn", "full"): dict(BM=32, BH=32, BK=32, warps=8, stages=3),
    ("attn", "half"): dict(BM=64, BN=32, warps=4, stages=3),
    ("attn", "full"): dict(BM=32, BN=32, warps=4, stages=3),
}


# the interpreter's FFN forward takes the K-loop path unless a test flips this
INTERPRETER_FFN_XRES = False


def blocks(kind: str, dtype) -> dict:
    return BLOCKS[(kind, "half" if dtype in HALF else "full")]


def small_blocks(t: torch.Tensor) -> bool:
    """CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1), which
    runs programs one by one: small tiles there, so short test batches still
    span several tiles per run."""
    return t.device.type == "cpu"


class Checker:
    """Validates the arguments of one op against `x` with errors naming them."""

    def __init__(self, op: str, x: torch.Tensor):
        self.op = f"canet.{op} (triton)"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.op}: x must be a tensor, got {type(x).__name__}")
        if x.dtype not in FLOATS:
            raise TypeError(f"{self.op}: x must be a floating tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{self.op}: x must be packed tokens [T, features], "
                             f"got shape {list(x.shape)}")
        self.x = x

    def tensor(self, t, name, shape=None, dtype=None):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.op}: {name} must be a tensor, got {type(t).__name__}")
        want = self.x.dtype if dtype is None else dtype
        if t.dtype != want:
            raise TypeError(f"{self.op}: {name} has dtype {t.dtype} but must be {want}")
        if t.device != self.x.device:
            raise ValueError(f"{self.op}: {name} is on {t.device} but x is on "
                             f"{self.x.device}")
        if shape is not None and list(t.shape) != list(shape):
            raise ValueError(f"{self.op}: {name} must have shape {list(shape)}, "
                             f"got {list(t.shape)}")
        return t.contiguous()

    def ints(self, t, name, length):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self.op}: {name} must be an int32 or int64 tensor, "
                            f"got {t.dtype}")
        if t.device != self.x.device:
            raise ValueError(f"{self.op}: {name} is on {t.device} but x is on "
                             f"{self.x.device}")
        if t.dim() != 1 or (length is not None and t.shape[0] != length):
            want = "1-D" if length is None else f"shape [{length}]"
            raise ValueError(f"{self.op}: {name} must be {want} (one entry per "
                             f"sample, cu_seqlens has B + 1), got {list(t.shape)}")
        return t.contiguous()

    def routes(self, cu_seqlens, *widths):
        """(cu_seqlens, widths...) contiguous; widths given as (tensor, name)."""
        cu = self.ints(cu_seqlens, "cu_seqlens", None)
        if cu.shape[0] < 1:
            raise ValueError(f"{self.op}: cu_seqlens needs B + 1 >= 1 entries")
        return (cu,) + tuple(self.ints(w, n, cu.shape[0] - 1) for w, n in widths)

    def positive(self, value, name):
        if int(value) < 1:
            raise ValueError(f"{self.op}: {name} must be >= 1, got {value}")
        return int(value)


def num_splits(slots: int, blocks: int, target: int = 512) -> int:
    """Row splits of a weight-gradient reduction: enough programs to fill the
    GPU, never more splits than tile slots."""
    return max(1, min(slots, triton.cdiv(target, max(blocks, 1))))


@triton.jit
def gelu(h):
    # exact erf GELU (F.gelu default)
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
