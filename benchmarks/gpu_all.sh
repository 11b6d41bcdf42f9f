#!/usr/bin/env bash
# One GPU run: the GPU tests, ResNet-50 parity, then the convolution and training benchmarks,
# within about 9 minutes. Full logs go to $LOG_DIR (default benchmarks/results/); a summary with
# the device name and date is saved as benchmarks/results/gpu-<device>-<date>.txt and printed last.
# Usage: bash benchmarks/gpu_all.sh  (from the repository root; LOG_DIR=... to put the logs elsewhere)
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
stamp=$(date -u +%Y-%m-%d)
logs="${LOG_DIR:-benchmarks/results}"
mkdir -p benchmarks/results "$logs"
out="benchmarks/results/gpu-${device:-unknown}-${stamp}.txt"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the test files that hold GPU tests; xdist (when installed) spreads the NVRTC compiles over cores
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 14"
steps="${STEPS:-tests_conv tests_ops parity_resnet50 gpu_train gpu_conv}"  # STEPS=... runs a subset
step() {  # step NAME SECONDS CMD...: run with a time limit, full log to $logs/NAME.log
  local name=$1 limit=$2; shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "## $name: exit $rc in $((SECONDS - t0)) s"
}
{
  echo "# gpu_all.sh on ${device:-no GPU}, ${stamp}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  step tests_conv 60 "$PY" -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider tests/backends/test_cuda_conv.py
  tail -8 "$logs/tests_conv.log" 2>/dev/null
  step tests_ops 150 "$PY" -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider $xdist \
    tests/backends/test_cuda_ops.py tests/backends/test_cuda_networks.py
  grep -E "(FAILED|ERROR) " "$logs/tests_ops.log" 2>/dev/null | sort -u | tail -30; tail -3 "$logs/tests_ops.log" 2>/dev/null
  step parity_resnet50 60 "$PY" -m cnnc.cli parity examples/resnet50.cnn --backends numpy,cuda --size 64x64
  tail -3 "$logs/parity_resnet50.log" 2>/dev/null
  step gpu_train 120 "$PY" benchmarks/gpu_train.py --steps 8
  tail -8 "$logs/gpu_train.log" 2>/dev/null
  step gpu_conv 130 "$PY" benchmarks/gpu_conv.py --repeats 10
  tail -45 "$logs/gpu_conv.log" 2>/dev/null
} 2>&1 | tee "$out"
echo "saved $out"
