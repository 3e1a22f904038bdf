#!/usr/bin/env bash
# Shared set-up step: a virtual environment in .venv with canet's dependencies,
# and canet installed editable (which compiles the op library). Idempotent:
# each step is skipped when it is already done, so a second run takes seconds.
#
#   bash scripts/setup.sh            # then: . .venv/bin/activate
#
# Environment:
#   PYTHON=python3.11      interpreter that creates the venv (default python3)
#   CANET_VENV=path        venv location (default .venv in the repository)
#   CANET_NO_VENV=1        use the current python as it is: no venv, no pip;
#                          only (re)build the op library in place (machines
#                          without network that already have torch)
#   CANET_FORCE_BUILD=1    rebuild the op library even when it looks current
#   CANET_NO_CUDA, CANET_CUDA_ARCHS, CANET_NATIVE, CANET_DEBUG, MAX_JOBS:
#                          build switches, see setup.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MAX_JOBS="${MAX_JOBS:-2}"

DEPS=(torch==2.14.1 triton==3.8.0 numpy pytest pytest-benchmark safetensors tqdm
      matplotlib ninja "setuptools>=70" wheel)

log() { echo "[setup] $*" >&2; }

if [[ "${CANET_NO_VENV:-0}" != 1 ]]; then
  VENV="${CANET_VENV:-$ROOT/.venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"

  # Installed versions checked without importing anything heavy.
  if ! python - "${DEPS[@]}" <<'PY'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, rest = spec.partition("==")
    name = name.split(">=")[0]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if rest and have.split("+")[0] != rest:
        sys.exit(1)
    if name == "setuptools" and int(have.split(".")[0]) < 70:
        sys.exit(1)
PY
  then
    log "installing dependencies: ${DEPS[*]}"
    python -m pip install -q "${DEPS[@]}"
  fi
fi

# Rebuild when a source or the build switches changed since the last build.
so="$(ls canet_kernels/_C*.so 2>/dev/null | head -n1 || true)"
switches="NO_CUDA=${CANET_NO_CUDA:-} ARCHS=${CANET_CUDA_ARCHS:-} NATIVE=${CANET_NATIVE:-} DEBUG=${CANET_DEBUG:-} PY=$(command -v python)"
stamp="canet_kernels/.build-switches"
need_build=0
if [[ -z "$so" || "${CANET_FORCE_BUILD:-0}" == 1 ]]; then
  need_build=1
elif [[ ! -f "$stamp" || "$(cat "$stamp")" != "$switches" ]]; then
  need_build=1
elif [[ -n "$(find csrc setup.py -newer "$so" -type f -print -quit)" ]]; then
  need_build=1
elif [[ "${CANET_NO_VENV:-0}" != 1 ]] && ! (cd / && python -c '
import importlib.util, os, sys
spec = importlib.util.find_spec("canet_kernels")
sys.exit(spec is None or not spec.origin.startswith(sys.argv[1]))' "$ROOT/"); then
  need_build=1  # built in place, but not installed in this environment
fi

if [[ $need_build == 1 ]]; then
  t0=$SECONDS
  if [[ "${CANET_NO_VENV:-0}" == 1 ]]; then
    log "building the op library in place"
    python setup.py -q build_ext --inplace
  else
    log "installing canet editable (compiles the op library)"
    # --use-pep517: an old pip (a fresh venv's) would otherwise run the
    # legacy `setup.py develop`, which re-invokes pip with build isolation.
    python -m pip install -q -e . --no-build-isolation --use-pep517
  fi
  echo "$switches" >"$stamp"
  log "built in $((SECONDS - t0)) s"
else
  log "op library is current ($so)"
fi
