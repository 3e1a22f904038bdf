"""Loads the compiled op library and says which backends can run, and why not."""
from __future__ import annotations

import os

import torch

_error: str | None = None
_loaded = False


def load() -> None:
    """Import the compiled library (registers torch.ops.canet.*); raises a
    clear error when it was not built."""
    global _error, _loaded
    if _loaded:
        return
    try:
        from . import _C  # noqa: F401  (registers the ops on import)
    except ImportError as exc:
        _error = (f"canet's compiled op library is not importable ({exc}); "
                  "build it with `pip install -e . --no-build-isolation`")
        raise ImportError(_error) from exc
    _loaded = True


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"canet::{op}", key)


_CPP_SUFFIXES = (".cpp", ".cu", ".cc", ".cxx")


def has_cpp_kernel(op: str, key: str) -> bool:
    """True when the kernel for `key` comes from the compiled library, not
    from a Python registration (the Triton backend also registers CUDA
    kernels). Falls back to has_kernel when the dispatcher's dump has no
    source location."""
    if not has_kernel(op, key):
        return False
    for line in torch._C._dispatch_dump(f"canet::{op}").splitlines():
        if line.startswith(f"{key}: registered at "):
            where = line[len(f"{key}: registered at "):].split(" ", 1)[0]
            return where.rsplit(":", 1)[0].endswith(_CPP_SUFFIXES)
    return True


def cuda_cpp_built() -> bool:
    """True when csrc/cuda was compiled into the library."""
    return _loaded and has_cpp_kernel("sliced_add_layernorm_fwd", "CUDA")


def triton_status() -> tuple[bool, str]:
    """(usable, reason) for the Triton backend."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def load_error() -> str | None:
    return _error
