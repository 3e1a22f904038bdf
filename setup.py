"""Builds canet's op library (canet_kernels._C).

Switches (environment variables):
  CANET_NO_CUDA=1         skip csrc/cuda even when a CUDA toolkit and a CUDA
                          build of torch are present
  CANET_CUDA_ARCHS="9.0"  CUDA archs to compile for (default: TORCH_CUDA_ARCH_LIST
                          when set, else "8.0;9.0+PTX")
  CANET_NATIVE=0          do not tune the CPU kernels for this machine's CPU
                          (-march=native), for binaries that move elsewhere
  CANET_DEBUG=1           -O0 -g
  MAX_JOBS=N              parallel compile jobs (torch's switch)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper in /usr/local/bin
# makes that /usr/local. Prefer the real toolkit folder when there is one.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name, default="0"):
    return os.environ.get(name, default) == "1"


def cuda_reason():
    """None when csrc/cuda can be built, else why not."""
    if flag("CANET_NO_CUDA"):
        return "CANET_NO_CUDA=1"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    home = cpp_extension.CUDA_HOME
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def nvidia_wheel_includes():
    """CUDA library headers (cusparse.h, ...) shipped in torch's nvidia-* wheels."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")) +
                  glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))


def openmp_flags():
    """at::parallel_for is a header template: the CPU kernels run on several
    threads only when they are compiled with the OpenMP that torch uses
    (without it every parallel_for runs serially). The shared libgomp.so.1
    soname makes the loader reuse the copy torch already loaded."""
    if not torch.backends.openmp.is_available() or sys.platform == "darwin":
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def extensions():
    debug = flag("CANET_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    omp_cxx, omp_link = openmp_flags()
    cxx = opt + ["-fopenmp-simd"] + omp_cxx + ([] if debug else ["-g0"])
    if os.environ.get("CANET_NATIVE", "1") == "1" and not debug:
        cxx.append("-march=native")
    sources = ["csrc/registration.cpp", "csrc/python_module.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_compile_args={"cxx": cxx}, extra_link_args=omp_link)
    reason = cuda_reason()
    if reason is None:
        # CANET_CUDA_ARCHS wins, then TORCH_CUDA_ARCH_LIST, then the default
        # (torch reads the variable when it builds the nvcc command).
        archs = (os.environ.get("CANET_CUDA_ARCHS") or
                 os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += nvidia_wheel_includes()
        kwargs["extra_compile_args"]["nvcc"] = opt + ["-lineinfo"]
        kwargs["define_macros"] = [("CANET_WITH_CUDA", "1")]
        print(f"canet: building CPU + CUDA kernels for archs "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
        ext = cpp_extension.CUDAExtension
    else:
        print(f"canet: building CPU kernels only ({reason})", file=sys.stderr)
        ext = cpp_extension.CppExtension
    return [ext("canet_kernels._C", sources, **kwargs)]


def install_requires():
    """The runtime dependencies. torch is pinned to the release this build
    compiles against: the op library does not load into another torch (see
    pyproject.toml's [build-system]). The local label (+cu130) is left out so
    that the same release from another index still matches."""
    torch_release = torch.__version__.split("+")[0]
    return [f"torch=={torch_release}", "numpy", "safetensors", "tqdm"]


# The project's metadata (name, version, extras, the `canet` command) is in
# pyproject.toml; here only what needs code: the packages (triton_kernels is
# installed as canet_kernels.triton), the op library and the dependencies.
setup(
    packages=find_packages(include=["canet_kernels", "canet_kernels.*"]) +
    ["canet_kernels.triton"],
    package_dir={"canet_kernels.triton": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(
        use_ninja=shutil.which("ninja") is not None)},
    install_requires=install_requires(),
)
