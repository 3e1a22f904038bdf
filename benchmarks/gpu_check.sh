#!/usr/bin/env bash
# GPU check of canet on a bare CUDA machine (torch + triton installed, no
# network), in about 10 minutes (BUDGET below):
#   1. build the package (CUDA sources too when nvcc is present)
#   2. the tests that run on the GPU (tests/test_triton_gpu.py, test_info.py);
#      the CPU suite is CI's job
#   3. benchmarks/tune_triton.py: tile shapes of each kernel family timed on
#      the target batch -> OUTDIR/tune.json, fastest in OUTDIR/blocks.json
#   4. benchmarks/bench_triton.py with those tile shapes -> OUTDIR/triton.json:
#      routed against the fastest dense variant (eager, torch.compile in the
#      mode measured fastest, each also in CUDA graphs) and the compiled
#      bucket alternative, forward and training step, with a per-kernel
#      profile; torch.compile's first compiles take most of this step (the
#      JSON is rewritten after each scenario, so a timeout keeps the finished
#      ones)
#   5. the benchmark suite (benchmarks/run.py --device cuda), with what is left
# GPU_CHECK_SKIP="tune bench_suite" skips steps by name; BENCH_TRITON_ARGS adds
# arguments to step 4 (e.g. "--compile-modes default --skip bucket-compile-graphs").
# Each step has its own time limit inside one overall budget; a failing step
# does not stop the later ones. Logs go to OUTDIR/<step>.log and a summary to
# OUTDIR/summary.json.
#
# usage: benchmarks/gpu_check.sh OUTDIR
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

export CANET_CUDA_ARCHS="${CANET_CUDA_ARCHS:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
# images that hold torch often have only python3
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET=600          # seconds for all steps; kills and the summary need a few more
START=$(date +%s)
STEPS=""

# step NAME MAX_SECONDS COMMAND...: runs COMMAND with min(MAX, time left).
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    local t0 rc
    t0=$(date +%s)
    case " ${GPU_CHECK_SKIP:-} " in
        *" $name "*) echo "== $name: skipped (GPU_CHECK_SKIP)"; return 0 ;;
    esac
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, out of time" | tee "$OUT/$name.log"
        rc=124
    else
        echo "== $name (limit ${limit}s): $*"
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
        rc=$?
        tail -n 5 "$OUT/$name.log"
    fi
    local secs=$(( $(date +%s) - t0 ))
    echo "== $name: exit $rc after ${secs}s"
    STEPS="$STEPS$name $rc $secs $limit
"
    return 0
}

# --use-pep517: an old pip would run `setup.py develop`, which re-invokes pip
# with build isolation (no network here)
step build 200 "$PY" -m pip install -e . --no-build-isolation --no-deps --use-pep517
step info 30 "$PY" -m canet_kernels.info
step tests 150 "$PY" -m pytest tests/test_triton_gpu.py tests/test_info.py -q -rs
step tune 150 "$PY" benchmarks/tune_triton.py --json "$OUT/tune.json" \
    --write-blocks "$OUT/blocks.json"
BLOCKS=()
if [ -s "$OUT/blocks.json" ]; then BLOCKS=(--blocks "$OUT/blocks.json"); fi
# shellcheck disable=SC2086  # BENCH_TRITON_ARGS is a list of words
step bench_triton 330 "$PY" benchmarks/bench_triton.py --profile ${BLOCKS[@]+"${BLOCKS[@]}"} \
    ${BENCH_TRITON_ARGS:-} --json "$OUT/triton.json"
step bench_suite 120 "$PY" -m benchmarks.run --device cuda --out "$OUT"

STEPS="$STEPS" OUT="$OUT" "$PY" - <<'EOF'
import json, os, subprocess

steps = []
for line in os.environ["STEPS"].strip().splitlines():
    name, rc, secs, limit = line.split()
    steps.append(dict(step=name, exit_code=int(rc), seconds=int(secs), limit_s=int(limit),
                      timed_out=int(rc) in (124, 137), log=f"{name}.log"))
summary = dict(ok=all(s["exit_code"] == 0 for s in steps), steps=steps)
try:
    import torch
    summary["torch"] = torch.__version__
    summary["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        summary["device"] = torch.cuda.get_device_name()
    import triton
    summary["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    summary["env_error"] = repr(exc)
try:
    summary["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    pass
tests_log = os.path.join(os.environ["OUT"], "tests.log")
if os.path.exists(tests_log):
    lines = [l for l in open(tests_log).read().splitlines() if l.strip()]
    summary["tests_tail"] = lines[-3:]
bench = os.path.join(os.environ["OUT"], "triton.json")
if os.path.exists(bench):
    doc = json.load(open(bench))
    res = doc.get("results", {})
    summary["compile_mode"] = doc.get("meta", {}).get("compile_mode")
    summary["triton_bench"] = {}
    for k, v in res.items():
        if k == "profile":
            continue
        row = {m: v[m] for m in ("routed_flop_ratio", "routed_over_dense",
                                 "graph_routed_over_dense", "routed_over_best_dense",
                                 "over_flop_ratio", "target", "target_routed",
                                 "target_value", "meets_target") if m in v}
        row["fastest_dense"] = v.get("best_dense")
        row["fastest_routed"] = v.get("best_routed")
        if v.get("errors"):
            row["errors"] = v["errors"]
        summary["triton_bench"][k] = row
tune = os.path.join(os.environ["OUT"], "tune.json")
if os.path.exists(tune):
    t = json.load(open(tune))
    summary["tune_best"] = t.get("best")
    summary["tune_ms"] = {fam: dict(dense=r["dense_ms"], default=r["variants"][0]["ms"],
                                    best=min((v["ms"] for v in r["variants"]
                                              if v["error"] is None), default=None))
                          for fam, r in t.get("results", {}).items()}
with open(os.path.join(os.environ["OUT"], "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
EOF
