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
#                          build switches, see setup.py. A switch set to a new
#                          value triggers a rebuild; an unset one keeps the
#                          value of the last build (so CANET_NO_CUDA=0 undoes
#                          an earlier CANET_NO_CUDA=1)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MAX_JOBS="${MAX_JOBS:-2}"

# torch: the same release as pyproject.toml's [build-system] pin.
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
    # No wheel cache: torch's CUDA build is several GB, and a cached copy
    # doubles what a small disk has to hold.
    python -m pip install -q --no-cache-dir "${DEPS[@]}"
  fi
fi

# Rebuild when a source changed since the last build, or when a build switch
# that is set now differs from the one the library was built with (an unset
# switch keeps what was built: `bash scripts/test.sh` after CI does not
# rebuild for another arch list).
SWITCHES=(CANET_NO_CUDA CANET_CUDA_ARCHS CANET_NATIVE CANET_DEBUG)
stamp="canet_kernels/.build-switches"
so="$(ls canet_kernels/_C*.so 2>/dev/null | head -n1 || true)"

switches_changed() {
  [[ -f "$stamp" ]] || return 0
  [[ "$(sed -n 's/^PYTHON=//p' "$stamp")" == "$(command -v python)" ]] || return 0
  local name
  for name in "${SWITCHES[@]}"; do
    if [[ -n "${!name:-}" && "$(sed -n "s/^$name=//p" "$stamp")" != "${!name}" ]]; then
      return 0
    fi
  done
  return 1
}

# The torch release the library was built against: it loads into no other,
# and the editable install's metadata pins it (setup.py).
torch_release() {
  python -c 'from importlib.metadata import version
print(version("torch").split("+")[0])' 2>/dev/null || true
}

torch_changed() {
  [[ -f "$stamp" ]] || return 1
  local built
  built="$(sed -n 's/^TORCH=//p' "$stamp")"
  [[ -n "$built" && "$built" != "$(torch_release)" ]]
}

write_stamp() {
  local name
  {
    echo "PYTHON=$(command -v python)"
    echo "TORCH=$(torch_release)"
    for name in "${SWITCHES[@]}"; do echo "$name=${!name:-}"; done
  } >"$stamp.new"
  mv "$stamp.new" "$stamp"
}

# canet importable from this checkout outside it (editable install), or not.
installed_here() {
  (cd / && python -c '
import importlib.util, sys
spec = importlib.util.find_spec("canet_kernels")
sys.exit(spec is None or not (spec.origin or "").startswith(sys.argv[1]))' "$ROOT/")
}

reason=""
if [[ "${CANET_NO_VENV:-0}" != 1 ]] && ! installed_here; then
  reason="canet is not installed in this environment"
elif [[ -z "$so" ]]; then
  reason="the op library is not built"
elif [[ "${CANET_FORCE_BUILD:-0}" == 1 ]]; then
  reason="CANET_FORCE_BUILD=1"
elif torch_changed; then
  reason="torch changed since the last build"
elif switches_changed; then
  reason="build switches or python changed"
elif [[ -n "$(find csrc setup.py -newer "$so" -type f -print -quit)" ]]; then
  reason="sources changed"
fi

if [[ -n "$reason" ]]; then
  t0=$SECONDS
  # Unset switches keep the values of the last build.
  if [[ -f "$stamp" ]]; then
    for name in "${SWITCHES[@]}"; do
      old="$(sed -n "s/^$name=//p" "$stamp")"
      if [[ -z "${!name:-}" && -n "$old" ]]; then export "$name=$old"; fi
    done
  fi
  if [[ "${CANET_NO_VENV:-0}" != 1 ]] && { ! installed_here || torch_changed; }; then
    log "installing canet editable, which compiles the op library ($reason)"
    # --no-build-isolation: build against the torch installed above (no
    # second torch in a throw-away build environment). pyproject.toml makes
    # every pip (a fresh venv's 23.x included) take the PEP 517/660 editable
    # path, so no --use-pep517 (current pip hides it as a no-op).
    python -m pip install -q --no-cache-dir -e . --no-build-isolation
  else
    # The editable install maps the package to this folder: an in-place
    # build is enough, and incremental (objects kept in build/).
    log "building the op library in place ($reason); log: build/setup.log"
    mkdir -p build
    if ! python setup.py build_ext --inplace >build/setup.log 2>&1; then
      tail -n 60 build/setup.log >&2
      log "build failed; full log: build/setup.log"
      exit 1
    fi
  fi
  write_stamp
  log "built in $((SECONDS - t0)) s"
else
  log "op library is current ($so)"
fi
