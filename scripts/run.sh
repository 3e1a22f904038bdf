#!/usr/bin/env bash
# The main job: sets up (scripts/setup.sh, quick when already done), then
#   bash scripts/run.sh          trains CANet on the embedded synthetic data
#                                and prints accuracy, route distribution, FLOP
#                                ratio and routed vs dense inference time
#   bash scripts/run.sh bench    the backbone benchmark: canet CPU ops vs the
#                                dense max-size model vs the masked formulation
# Extra arguments go to the command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if [[ "${CANET_NO_VENV:-0}" != 1 ]]; then
  # shellcheck disable=SC1091
  . "${CANET_VENV:-$ROOT/.venv}/bin/activate"
fi
if [[ "${1:-}" == bench ]]; then
  shift
  exec python benchmarks/bench_model.py "$@"
fi
exec python -m canet_kernels.cli demo --compare-dense "$@"
