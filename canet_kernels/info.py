"""What this installation of canet can run: `python -m canet_kernels.info`.

Prints the torch / CUDA / Triton versions, whether the compiled op library
loads, and for each backend (cpu C++, cuda C++, triton) whether it is built
and usable here, with the reason when not. Never raises: every probe reports
its own failure instead.
"""
from __future__ import annotations

import sys

BUILD_HINT = ("to build it, from the repository root: `pip install -e . "
              "--no-build-isolation`, or in place `python setup.py build_ext "
              "--inplace` (CANET_NO_CUDA=1 for CPU kernels only)")


def _probe(fn, default):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  the report must go on
        return default(exc)


def _torch_line():
    import torch
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"{torch.__version__} ({cuda})"


def _device_line():
    import torch
    if not torch.cuda.is_available():
        return False, "none (torch.cuda.is_available() is False)"
    n = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return True, f"{n} x {name} (sm {cap})"


def _triton_line():
    try:
        import triton
    except ImportError:
        return "not installed"
    return getattr(triton, "__version__", "installed (version unknown)")


def _library():
    """(loaded, text) for the compiled library."""
    from . import _library
    try:
        _library.load()
    except ImportError:
        return False, f"not built: {_library.load_error()}"
    from . import _C
    return True, f"built ({getattr(_C, '__file__', '?')})"


def _op_names():
    import torch
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("canet::"))


def _kernel_ops(key):
    """Ops with a compiled (C++/CUDA) kernel for a dispatch key, and the ops
    that are backend kernels' business (not composites over other ops)."""
    from . import _library
    ops = [op for op in _op_names()
           if not _library.has_kernel(op, "CompositeImplicitAutograd")]
    have = [op for op in ops if _library.has_cpp_kernel(op, key)]
    return have, [op for op in ops if op not in have]


def _cpu_threads():
    import torch
    from . import _C
    if _C.cpu_parallel():
        return f"parallel ({torch.get_num_threads()} threads)"
    return "one thread (built without torch's parallel backend, e.g. OpenMP)"


def _cpp_backend(key, loaded, device_ok, device_reason):
    if not loaded:
        return "no", "no", "the compiled library is not loaded (see above)"
    have, missing = _kernel_ops(key)
    if not have:
        why = ("the library was built without CUDA kernels (CANET_NO_CUDA=1, a "
               "CPU build of torch, or no nvcc at build time)"
               if key == "CUDA" else "no CPU kernels registered")
        return "no", "no", why
    notes = "kernels: " + ", ".join(have)
    if key == "CPU":
        notes = _cpu_threads() + "; " + notes
    if missing:
        notes += "; no kernel yet: " + ", ".join(missing)
    if not device_ok:
        return "yes", "no", f"{device_reason}; {notes}"
    return "yes", "yes", notes


def _triton_backend():
    from . import _library
    usable, reason = _library.triton_status()
    try:
        import triton  # noqa: F401
        installed = "yes"
    except ImportError:
        installed = "no"
    # The Triton backend registers Python kernels for CUDA (see ops.py).
    if usable and _library._loaded:
        ops = [op for op in _op_names() if _library.has_kernel(op, "CUDA")
               and not _library.has_cpp_kernel(op, "CUDA")]
        if ops:
            reason += "; kernels: " + ", ".join(ops)
    return installed, "yes" if usable else "no", reason


def report() -> str:
    import canet_kernels
    lines = [f"canet {getattr(canet_kernels, '__version__', '?')}"]

    def fail(exc):
        return f"unavailable ({type(exc).__name__}: {exc})"

    lines.append(f"torch         {_probe(_torch_line, fail)}")
    device_ok, device = _probe(_device_line, lambda e: (False, fail(e)))
    lines.append(f"CUDA device   {device}")
    lines.append(f"triton        {_probe(_triton_line, fail)}")
    loaded, lib = _probe(_library, lambda e: (False, fail(e)))
    lines.append(f"C++ library   {lib}")
    if not loaded:
        lines.append(f"              {BUILD_HINT}")

    no_device = "no CUDA device"
    rows = [
        ("cpu (C++)", _probe(lambda: _cpp_backend("CPU", loaded, True, ""),
                             lambda e: ("?", "no", fail(e)))),
        ("cuda (C++)", _probe(lambda: _cpp_backend("CUDA", loaded, device_ok,
                                                   no_device),
                              lambda e: ("?", "no", fail(e)))),
        ("triton", _probe(_triton_backend, lambda e: ("?", "no", fail(e)))),
    ]
    lines.append("")
    lines.append(f"{'backend':<12} {'built':<6} {'usable':<7} notes")
    for name, (built, usable, notes) in rows:
        lines.append(f"{name:<12} {built:<6} {usable:<7} {notes}")
    return "\n".join(lines)


def main() -> int:
    try:
        print(report())
    except Exception as exc:  # noqa: BLE001  last resort: still exit 0
        print(f"canet info: could not complete the report "
              f"({type(exc).__name__}: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
