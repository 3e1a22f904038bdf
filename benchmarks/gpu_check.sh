#!/usr/bin/env bash
# GPU check of canet on a bare CUDA machine (torch + triton installed, no
# network), in at most 8 minutes (BUDGET below):
#   1. build the package (CUDA sources too when nvcc is present)
#   2. the tests that run on the GPU (tests/test_triton_gpu.py, test_info.py);
#      the CPU suite is CI's job
#   3. benchmarks/bench_triton.py --profile -> OUTDIR/triton.json: routed
#      against the fastest dense variant (eager, torch.compile in the mode
#      measured fastest, each also in CUDA graphs), routed compiled, and the
#      compiled bucket alternative, forward and training step; the GPU's
#      measured peaks and each kernel family's achieved TFLOP/s and TB/s.
#      torch.compile's first compiles take most of this step; its --deadline
#      skips the compiled variants not built in time, and the JSON is
#      rewritten after each scenario
#   4. benchmarks/bench_scoring.py --device cuda: the chunked scoring ops
#      (fused Triton kernels, and canet_kernels.scoring_gemm's cuBLAS chunks)
#      against plain PyTorch at 12k, 100k and 1M items, bf16
#   5. compute-sanitizer --tool memcheck over the GPU tests' small mixed-route
#      cases of every kernel, forward and backward: once with every op on
#      Triton (CANET_BACKEND=triton), once on the CUDA C++ kernels; the
#      caching allocator is off so that each tensor is its own allocation.
#      Where the machine's runtime refuses the tool, the log says so
#   6. with what is left: benchmarks/tune_triton.py (tile shapes) and the
#      benchmark suite (benchmarks/run.py --device cuda)
# GPU_CHECK_SKIP="tune bench_suite" skips steps by name; BENCH_TRITON_ARGS adds
# arguments to step 3 (e.g. "--compile-modes default --skip bucket-compile-graphs").
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
BUDGET=480          # seconds for all steps; kills and the summary need a few more
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
    if [ "$limit" -lt 20 ]; then
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
step build 150 "$PY" -m pip install -e . --no-build-isolation --no-deps --use-pep517
step info 20 "$PY" -m canet_kernels.info
# several workers compile the Triton kernels in parallel (pytest-xdist, where
# the image has it); the later steps find them in Triton's cache
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
step tests 120 "$PY" -m pytest tests/test_triton_gpu.py tests/test_info.py -q -rs ${XDIST[@]+"${XDIST[@]}"}

# bench_triton gets what is left but 110 s (scoring, the sanitizer, the
# summary); its deadline leaves the last scenario's timing and the profile
# 60 s more. Measured on an H200: build 34 s, tests 43 s, bench_triton 209 s
# (+ about 20 s profile and 30 s training_stream since), scoring 20 s,
# sanitizer 19 + 9 s with the Triton cache warm (79 s cold)
LEFT=$(( BUDGET - ($(date +%s) - START) - 110 ))
# shellcheck disable=SC2086  # BENCH_TRITON_ARGS is a list of words
step bench_triton "$LEFT" "$PY" benchmarks/bench_triton.py --profile \
    --deadline $(( LEFT > 120 ? LEFT - 60 : LEFT / 2 )) \
    ${BENCH_TRITON_ARGS:-} --json "$OUT/triton.json"
step bench_scoring 90 "$PY" benchmarks/bench_scoring.py --device cuda --tag gpu \
    --providers fused,gemm,plain --out "$OUT" --deadline 70 --mem-limit-gb 100

SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
# the 200k-item memory test and the whole-model test add minutes under the
# tool and no kernel the other cases miss; CUDA-graph capture needs the
# caching allocator that the tool's run turns off
if [ -n "$SAN" ]; then
    step sanitize_triton 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 CANET_BACKEND=triton \
        "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" -m pytest \
        tests/test_triton_gpu.py -q -k "not keeps_no_logits and not model_routed and not cuda_graph"
    step sanitize_cuda 20 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" -m pytest \
        tests/test_triton_gpu.py -q -x -k "add_layernorm"
else
    echo "== sanitize: compute-sanitizer not found on this machine" | tee "$OUT/sanitize_triton.log"
    STEPS="${STEPS}sanitize_triton 127 0 0
"
fi
step tune 150 "$PY" benchmarks/tune_triton.py --json "$OUT/tune.json" \
    --write-blocks "$OUT/blocks.json"
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
for name in ("sanitize_triton", "sanitize_cuda"):
    path = os.path.join(os.environ["OUT"], name + ".log")
    if os.path.exists(path):
        text = open(path, errors="replace").read()
        lines = [l for l in text.splitlines()
                 if "ERROR SUMMARY" in l or "passed" in l or "failed" in l
                 or "not supported" in l.lower() or "not found" in l]
        summary[name] = lines[-4:]
if os.path.exists(bench):
    doc = json.load(open(bench))
    summary["peaks"] = doc.get("meta", {}).get("peaks")
    prof = doc.get("results", {}).get("profile", {})
    for part in ("forward", "training_step"):
        for name, p in prof.get(part, {}).items():
            summary.setdefault("profile", {})[f"{part}/{name}"] = dict(
                kernel_ms=round(p["kernel_ms"], 3), launches=p["launches"],
                families={f: {k: round(v, 3) for k, v in row.items()
                              if k in ("ms", "calls", "tflop_s", "tb_s")}
                          for f, row in p["families"].items()})
scoring = [f for f in os.listdir(os.environ["OUT"]) if f.startswith("bench_scoring") and f.endswith(".json")]
if scoring:
    summary["scoring_json"] = sorted(scoring)
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
print(json.dumps(summary, indent=1))
EOF
