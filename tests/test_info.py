"""`python -m canet_kernels.info` runs, exits 0 and reports every backend,
also when the compiled library cannot be loaded."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("cpu (C++)", "cuda (C++)", "triton")


def _run(code):
    # cwd = repository root, so the checkout's package is the one imported.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _check(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("torch", "CUDA device", "triton", "C++ library") + BACKENDS:
        assert key in proc.stdout, f"{key!r} missing from:\n{proc.stdout}"


def test_info_runs():
    proc = subprocess.run([sys.executable, "-m", "canet_kernels.info"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    _check(proc)


def test_info_without_library():
    # A None entry in sys.modules makes `from . import _C` raise ImportError,
    # as when the library was never built.
    proc = _run("import sys, runpy; sys.modules['canet_kernels._C'] = None; "
                "runpy.run_module('canet_kernels.info', run_name='__main__')")
    _check(proc)
    assert "not built" in proc.stdout and "setup.py build_ext" in proc.stdout, \
        proc.stdout


def test_cpu_kernels_are_built_parallel():
    # at::parallel_for compiled without torch's OpenMP runs serially.
    import torch
    import canet_kernels  # noqa: F401
    from canet_kernels import _C
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert _C.cpu_parallel()
