#!/usr/bin/env bash
# One GPU run, under 10 minutes: the GPU tests; compute-sanitizer (memcheck, racecheck, initcheck)
# over every conv kernel configuration on small problems, float32 and tensor-core ones of every
# precision (gpu_sanitize.py), and the determinism of VGG-19's stage-4 layer; VGG-19 parity with
# the tuner off and on (gpu_parity.py); the training step, ours in float32 and bf16 against
# PyTorch float32 and AMP (gpu_train.py); the convolutions against cuDNN in float32 (TF32 off and
# on, NCHW and channels_last) and, ours on the tensor cores, in tf32, bf16 and fp16 against cuDNN
# in the same precision (gpu_conv.py --precision); LeNet-5 and a 1-channel ResNet-20 trained on
# MNIST-5k in float32 and bf16 (cnnc train --precision). Full logs go to $LOG_DIR (default benchmarks/results/gpu-logs-<date>); a summary
# with the device name and date is saved as $RESULTS_DIR/gpu-<device>-<date>.txt (default
# benchmarks/results) and printed as it goes.
# Usage: bash benchmarks/gpu_all.sh  (from anywhere; STEPS="sanitize parity_vgg19" runs a subset;
# DRY_RUN=1 prints each step's command and time limit instead of running it, no GPU needed)
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
stamp=$(date -u +%Y-%m-%d)
results="${RESULTS_DIR:-benchmarks/results}"
logs="${LOG_DIR:-$results/gpu-logs-$stamp}"
mkdir -p "$results" "$logs"
out="$results/gpu-${device:-unknown}-${stamp}.txt"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
dry="${DRY_RUN:-0}"
# the test files that hold GPU tests; xdist (when installed) spreads the NVRTC compiles over cores
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 14"
all_steps="tests_conv tests_ops sanitize parity_vgg19 gpu_train gpu_conv gpu_conv_mixed mnist_bf16"
steps="${STEPS:-$all_steps}"
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null \
            || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
step() {  # step NAME SECONDS CMD...: run with a time limit, full log to $logs/NAME.log
  local name=$1 limit=$2; shift 2
  case " $steps " in *" ${name%%:*} "*) ;; *) return 0 ;; esac
  if [ "$dry" = 1 ]; then echo "## $name (limit $limit s): $*"; return 0; fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/${name//:/-}.log" 2>&1
  local rc=$?
  echo "## $name: exit $rc in $((SECONDS - t0)) s"
}
show() {  # show NAME FILTER...: lines of a step's log (nothing in a dry run)
  local log="$logs/${1//:/-}.log"; shift
  [ "$dry" = 1 ] || [ ! -f "$log" ] || "$@" "$log"
}
{
  echo "# gpu_all.sh on ${device:-no GPU}, ${stamp} (git $(git rev-parse --short HEAD 2>/dev/null))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  # 1. tests (about 3 min): conv kernels (tensor-core ones of every precision too), then every op
  # and zoo network (parallel workers)
  step tests_conv 45 "$PY" -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider tests/backends/test_cuda_conv.py
  show tests_conv tail -4
  step tests_ops 120 "$PY" -m pytest -m gpu -v -rfE --tb=short -p no:cacheprovider $xdist \
    tests/backends/test_cuda_ops.py tests/backends/test_cuda_networks.py tests/backends/test_cuda_precision.py
  show tests_ops grep -E "(FAILED|ERROR) "; show tests_ops tail -2
  # 2. sanitizers (about 2.5 min): each tool over every configuration of every conv kernel on small
  # problems; then VGG-19's stage-4 layer under initcheck and 20 runs of each configuration bitwise equal
  # (the kernels are compiled first, outside the sanitizers)
  step sanitize:build 25 "$PY" benchmarks/gpu_sanitize.py --build-only
  step sanitize:build-vgg19 15 "$PY" benchmarks/gpu_sanitize.py --build-only --problems vgg19
  if [ -n "$sanitizer" ] || [ "$dry" = 1 ]; then
    for tool in memcheck:25 racecheck:40 initcheck:25; do
      step sanitize:${tool%%:*} ${tool##*:} "${sanitizer:-compute-sanitizer}" --tool "${tool%%:*}" --error-exitcode 99 \
        "$PY" benchmarks/gpu_sanitize.py
      show sanitize:${tool%%:*} grep -E "WRONG|ERROR SUMMARY|cases right|Error"
    done
    step sanitize:initcheck-vgg19 20 "${sanitizer:-compute-sanitizer}" --tool initcheck --error-exitcode 99 \
      "$PY" benchmarks/gpu_sanitize.py --problems vgg19
    show sanitize:initcheck-vgg19 grep -E "WRONG|ERROR SUMMARY|cases right"
  else
    echo "## sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
  fi
  step sanitize:repeat-vgg19 15 "$PY" benchmarks/gpu_sanitize.py --problems vgg19 --repeat 20
  show sanitize:repeat-vgg19 grep -E "WRONG|cases right"
  # 3. VGG-19 parity at 64x64 (about 40 s): whole network and layer by layer, tuner off and on, tuning
  # afresh (predicted: whole-network flags stage4.conv3, a ReLU kink; layer by layer agrees)
  step parity_vgg19 45 "$PY" benchmarks/gpu_parity.py examples/vgg19.cnn --size 64x64 --runs 1 --modes off,fast --compare whole,layer
  show parity_vgg19 grep -E "tuner (off|fast|full) run|first over|agree"
  # 4. training steps (about 75 s): ours float32 and bf16, PyTorch float32 and AMP (bf16 autocast + channels_last)
  step gpu_train 80 "$PY" benchmarks/gpu_train.py --steps 6
  show gpu_train tail -8
  # 5. convolutions against cuDNN (about 45 s)
  step gpu_conv 45 "$PY" benchmarks/gpu_conv.py --repeats 6 --warmup 2
  show gpu_conv tail -24
  # 6. ours on the tensor cores, every pass, against cuDNN in the same precision (about 45 s)
  step gpu_conv_mixed 50 bash -c 'for p in tf32 bf16 fp16; do "$0" benchmarks/gpu_conv.py --precision $p \
    --layers r50_l1_3x3,r50_l2_3x3,r50_l3_3x3,r50_l4_1x1,vgg16_conv3 --repeats 5 --warmup 2 || exit $?; done' "$PY"
  show gpu_conv_mixed grep -E "geometric mean|WRONG"
  # 7. accuracy in bf16 (about 45 s): LeNet-5 and a 1-channel ResNet-20 (resnet20_cifar.cnn at 1x32x32 with
  # LeNet-5's train section, 6 epochs) on MNIST-5k, float32 then bf16; goal: bf16 within 0.5 points
  step mnist_bf16 45 bash -c 'set -e; d=$1; sed -n "/^train:/,\$p" examples/lenet5.cnn | sed "s/epochs 15/epochs 6/" > "$d/t"
    sed -e "s/^input image: 3x32x32/input image: 1x32x32/" -e "/^train:/,\$d" examples/resnet20_cifar.cnn > "$d/r20_mnist.cnn"
    cat "$d/t" >> "$d/r20_mnist.cnn"
    for net in examples/lenet5.cnn "$d/r20_mnist.cnn"; do for p in fp32 bf16; do
      echo "== $net $p"; "$0" -m cnnc train "$net" --backend cuda --precision $p -o "$d/run-$(basename $net .cnn)-$p" 2>&1 | tail -3
    done; done' "$PY" "$logs"
  show mnist_bf16 grep -E "^==|accuracy|error"
} 2>&1 | tee "$( [ "$dry" = 1 ] && echo /dev/null || echo "$out")"
[ "$dry" = 1 ] || echo "saved $out (logs in $logs)"
