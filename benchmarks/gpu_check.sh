#!/usr/bin/env bash
# `make gpu-check`: everything a GPU host must prove, in one command, under 8 minutes.
#
# Builds nothing (the venv must exist: `make setup TORCH_SPEC= EXTRAS=dev,cuda` on GPU
# hosts). Steps, each with its own time limit, results under benchmarks/results/gpu_*:
#   1. preflight: an NVIDIA GPU, torch with CUDA, cuda-python + NVRTC loadable
#   2. pytest -m gpu, where a skipped GPU test FAILS (tests/gpu_required.py)
#   3. lmcache-pd check kernels (NVRTC compile + GPU round trip, bit-exact)
#   4. lmcache-pd bench kernels --device cuda (gather/scatter, fused checksums)
#   5. lmcache-pd bench transfer --device cuda (VRAM buffers, NIXL over UCX cuda_ipc;
#      every chunk carries the kvsum64 digest of its VRAM slot and the receiver checks
#      each one on its CUDA tensors: the JSON must show them checked, none failed)
# Any failure stops the run with "GPU CHECK FAILED: <step>: <why>" and a non-zero exit;
# on a host without a GPU it fails at once (exit 2), it never skips.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
CLI="$VENV/bin/lmcache-pd"
OUT=${GPU_CHECK_OUT:-benchmarks/results}
SMI=${NVIDIA_SMI:-nvidia-smi}
LOG="$OUT/gpu_check.log"
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)

fail() { echo "GPU CHECK FAILED: $1" | tee -a "$LOG" >&2; exit "${2:-1}"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log, fail loudly
    local name=$1 limit=$2; shift 2
    local remain; remain=$(left)
    (( remain > 10 )) || fail "$name: no time left of the ${BUDGET_S}s budget"
    (( limit < remain )) || limit=$remain
    echo "== $name (limit ${limit}s, $(left)s of budget left): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    (( rc == 124 || rc == 137 )) && fail "$name: timed out after ${limit}s"
    (( rc == 0 )) || fail "$name: exit code $rc (see $LOG)"
}

mkdir -p "$OUT"
: > "$LOG"
[[ -x $PY && -x $CLI ]] || fail "preflight: $VENV not set up (make setup TORCH_SPEC= EXTRAS=dev,cuda)" 2
command -v "$SMI" >/dev/null 2>&1 || fail "preflight: no NVIDIA GPU on this host ($SMI not found)" 2
"$SMI" -L 2>&1 | tee -a "$LOG" | grep -q "^GPU " || fail "preflight: nvidia-smi lists no GPU" 2
step preflight 120 "$PY" - <<'PY'
import sys, torch
from lmcache_pd.kernels import checksum, cuda_kernels
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU wheel? reinstall torch with CUDA)")
why = cuda_kernels.unavailable_reason()
if why:
    sys.exit(f"CUDA kernels unavailable: {why}")
print("torch", torch.__version__, "device", torch.cuda.get_device_name(), "NVRTC", cuda_kernels.nvrtc_version())
print("CPU checksum path:", checksum.implementation())
PY

step "pytest -m gpu" 240 "$PY" -m pytest -q -m gpu -p tests.gpu_required -p no:cacheprovider \
    --junitxml="$OUT/gpu_pytest.xml" tests
step "check kernels" 90 "$CLI" check kernels
grep -q "ok   round trip" "$LOG" || fail "check kernels: no GPU round trip ran"
step "bench kernels" 120 "$CLI" bench kernels --device cuda --budget-s 2 \
    --json "$OUT/gpu_kernels.json" --png "$OUT/gpu_kernels.png"
"$PY" - "$OUT/gpu_kernels.json" <<'PY' || fail "bench kernels: did not run the CUDA kernels"
import json, sys
doc = json.load(open(sys.argv[1]))
sys.exit(0 if doc["device"] == "cuda" and doc["backend"] == "cuda" else f"backend {doc['backend']}")
PY
step "bench transfer" 200 "$CLI" bench transfer --device cuda --quick --latency-reps 50 \
    --json "$OUT/gpu_transfer.json" --png "$OUT/gpu_transfer.png"
"$PY" - "$OUT/gpu_transfer.json" <<'PY' || fail "bench transfer: VRAM chunks without checked digests"
import json, sys
doc = json.load(open(sys.argv[1]))
unchecked = [r["chunks"] for r in doc["rows"] if not r.get("digests_checked")]
if doc["device"] != "cuda" or unchecked:
    sys.exit(f"device {doc['device']}, rows without checked kvsum64 digests: {unchecked}")
PY
echo "GPU CHECK PASSED in $(( $(date +%s) - START ))s; results: $OUT/gpu_*" | tee -a "$LOG"
