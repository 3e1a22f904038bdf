#!/usr/bin/env bash
# Configures, builds and runs the CMake build of the op library and its C++
# smoke test in a temporary build dir. CPU kernels only unless
# CANET_WITH_CUDA=ON. Uses the python (and torch) on PATH.
# Optional: CANET_CMAKE_BUILD_DIR (a kept build dir), CANET_BUILD_EXAMPLES=ON.
set -euo pipefail
cd "$(dirname "$0")/.."

with_cuda="${CANET_WITH_CUDA:-OFF}"
jobs="${MAX_JOBS:-2}"
# CANET_CMAKE_BUILD_DIR=DIR: build in DIR and keep it (later runs are
# incremental; tests/test_cpp_serving.py reuses it for the serving example).
if [[ -n "${CANET_CMAKE_BUILD_DIR:-}" ]]; then
  build="$CANET_CMAKE_BUILD_DIR"
  mkdir -p "$build"
else
  build="$(mktemp -d "${TMPDIR:-/tmp}/canet-cmake.XXXXXX")"
  trap 'rm -rf "$build"' EXIT
fi

prefix="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
args=(-S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
      -DCANET_WITH_CUDA="$with_cuda")
[[ -n "${CANET_CUDA_ARCHS:-}" ]] && args+=(-DCANET_CUDA_ARCHS="$CANET_CUDA_ARCHS")
# CANET_BUILD_EXAMPLES=ON: also build examples/cpp_serving (canet_serve).
[[ -n "${CANET_BUILD_EXAMPLES:-}" ]] && args+=(-DCANET_BUILD_EXAMPLES="$CANET_BUILD_EXAMPLES")
command -v ninja >/dev/null && args+=(-G Ninja)

# A CUDA build of torch makes find_package(Torch) look for a CUDA toolkit even
# for a CPU-only build of canet: point it at the toolkit and at the nvrtc that
# ships with torch's nvidia wheels (the toolkit here may not have one).
if python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  cuda_home="${CUDA_HOME:-/usr/local/cuda}"
  [[ -x "$cuda_home/bin/nvcc" ]] || {
    echo "cmake_check: torch is a CUDA build but no nvcc under $cuda_home; set CUDA_HOME" >&2
    exit 1
  }
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  nvrtc="$(python - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")) +
              glob.glob(os.path.join(site, "nvidia", "*", "*", "lib", "libnvrtc.so*")))
hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
print(hits[0] if hits else "")
PY
)"
  [[ -z "$nvrtc" && -e "$cuda_home/lib64/libnvrtc.so" ]] && nvrtc="$cuda_home/lib64/libnvrtc.so"
  [[ -n "$nvrtc" ]] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi

echo "cmake_check: configuring in $build (CANET_WITH_CUDA=$with_cuda)"
cmake "${args[@]}" >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure
