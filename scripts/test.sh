#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh, quick when already done), then
# runs the Python test suite. Extra arguments go to pytest:
#   bash scripts/test.sh -k layernorm -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if [[ "${CANET_NO_VENV:-0}" != 1 ]]; then
  # shellcheck disable=SC1091
  . "${CANET_VENV:-$ROOT/.venv}/bin/activate"
fi
exec python -m pytest tests -q "$@"
