#!/usr/bin/env bash
# One GPU run: the GPU tests, then the convolution and training benchmarks, within 8 minutes.
# Everything printed is also saved under benchmarks/results/ with the device name and date;
# a short table comes last. Usage: bash benchmarks/gpu_all.sh  (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
stamp=$(date -u +%Y-%m-%d)
out="benchmarks/results/gpu-${device:-unknown}-${stamp}.txt"
mkdir -p benchmarks/results
{
  echo "# gpu_all.sh on ${device:-no GPU}, ${stamp}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  echo "## GPU tests"
  timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -25
  echo "## convolutions against cuDNN"
  timeout 150 python benchmarks/gpu_conv.py 2>&1 | tail -40
  echo "## training steps against PyTorch"
  timeout 60 python benchmarks/gpu_train.py --steps 8 2>&1 | tail -8
} 2>&1 | tee "$out"
echo "saved $out"
