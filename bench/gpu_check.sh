#!/usr/bin/env bash
# The GPU check of the CUDA build (issue 26), for one machine with a GPU and no package registry (docs/gpu.md):
# one command, a few minutes, well inside 10. Needs .gpu-bundle/dsd-gpu.tar.xz beside the tree, made here by
# `.venv-gpu/bin/python bench/gpu_bundle.py`; the machine's own CUDA driver, runtime, cuBLAS, cuRAND and NCCL.
# Prints, each GPU figure beside the CPU's from the same run:
#   1. `caffe device_query -gpu 0`
#   2. Caffe's own GPU gtest cases of the layers SqueezeNet uses (build.GTEST_GPU_CASES)
#   3. 500 iterations of the small net's dense phase, `caffe train --gpu 0` against the CPU (time per iteration)
#   4. `caffe test --gpu 0` of the small net against the CPU's, same weights: accuracy equal to 1e-4, and times
#   5. `caffe time` of SqueezeNet v1.0 at batch 50 (random weights): forward and backward, GPU against CPU
#   6. pycaffe on the GPU: the mask layer keeps pruned weights exactly 0.0 over 100 steps with momentum and weight
#      decay, and its share of a step (bench/mask_overhead.py --gpu 0)
#   7. the libraries each program loaded from outside the bundle (they must be the machine's glibc and CUDA)
# --cpu: the same with a bundle of the CPU build (gpu_bundle.py --cpu), without a GPU: a dry run on any machine.
# Environment: DSD_GPU_CHECK_ITERS (default 500) training iterations, DSD_GPU_CHECK_MASK_ITERS (default 100) mask
# layer steps, DSD_GPU_CHECK_DIR (default /tmp/dsd-gpu-check) its work folder; a dry run on 2 cores wants small ones.
set -uo pipefail
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
REPO=$(cd "$(dirname "$0")/.." && pwd)
ARCHIVE=$REPO/.gpu-bundle/dsd-gpu.tar.xz
WORK=${DSD_GPU_CHECK_DIR:-/tmp/dsd-gpu-check}
ITERS=${DSD_GPU_CHECK_ITERS:-500}
MASK_ITERS=${DSD_GPU_CHECK_MASK_ITERS:-100}
NPROC=$(nproc)
FAILED=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*"; FAILED=1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

[ -f "$ARCHIVE" ] || { echo "gpu_check: $ARCHIVE is missing: make it with bench/gpu_bundle.py"; exit 2; }
rm -rf "$WORK" && mkdir -p "$WORK" || exit 2
t0=$(now)
tar -xJf "$ARCHIVE" -C "$WORK" || { echo "gpu_check: cannot unpack $ARCHIVE"; exit 2; }
B=$WORK/dsd-gpu
read -r BUILT PREFIX < "$B/BUILD"
[ "$BUILT" = "$MODE" ] || { echo "gpu_check: the bundle holds the $BUILT build, this is a $MODE check"; exit 2; }
# the machine's CUDA libraries: CUDA's own folder and its Python's NVIDIA wheels
CUDA_DIRS=$(find /usr/local /opt /usr/lib \( -name libcudart.so.13 -o -name libcublas.so.13 -o -name libcurand.so.10 \
              -o -name libnccl.so.2 \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=$B/lib:$CUDA_DIRS${LD_LIBRARY_PATH:-}
export PYTHONHOME=$B/python PYTHONPATH=$REPO PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
export GLOG_logtostderr=1 OMP_NUM_THREADS=$NPROC OPENBLAS_NUM_THREADS=$NPROC
CAFFE=$B/bin/caffe
PY=$(ls "$B"/python/bin/python3.*)
GPU=(); [ "$MODE" = gpu ] && GPU=(-gpu 0)
echo "gpu_check ($MODE build $PREFIX), unpacked in $(secs "$t0" "$(now)") s; $NPROC cores; $(uname -m)"
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "machine's CUDA libraries: ${CUDA_DIRS:-none found}"

step "1. caffe device_query -gpu 0"
"$PY" -c "
import sys
from dsd_caffe import info
from dsd_caffe.errors import UserError
try:
    for d in info.device_query(0, binary='$CAFFE'):
        print('  '.join(f'{k}: {v}' for k, v in d.items()))
except UserError as e:
    print(e)
    sys.exit(1)
" || { [ "$MODE" = cpu ] && echo "(expected without a GPU)" || fail "device_query"; }

step "2. Caffe's gtest cases of SqueezeNet's layers ($MODE)"
if [ "$MODE" = gpu ]; then
  FILTER=$("$PY" -c "from dsd_caffe import build; print(':'.join(build.GTEST_GPU_CASES.values()))")
else
  FILTER="ConcatLayerTest/*"  # the dry run's few (gpu_bundle.CPU_GTEST)
fi
t=$(now)
(cd "$WORK" && timeout 300 "$B/bin/caffe-gtest" --gtest_filter="$FILTER" 0) > "$WORK/gtest.log" 2>&1
RC=$?
grep -E "^\[ *(PASSED|FAILED) *\]|^\[==========\]|tests? ran|Current device" "$WORK/gtest.log"
[ $RC = 0 ] || { tail -20 "$WORK/gtest.log"; fail "gtest (exit $RC), log: $WORK/gtest.log"; }
echo "gtest: $(secs "$t" "$(now)") s"

step "3. $ITERS iterations of the small net's dense phase: caffe train ${GPU[*]:-} against the CPU"
mkdir -p "$WORK/tree/solvers/check" && ln -sfn "$REPO/models" "$WORK/tree/models" && ln -sfn "$B/data" "$WORK/tree/data"
train() {  # $1: gpu|cpu -> SPI: seconds per iteration, start-up included; log in $WORK/train-$1.log
  sed -e "s/^max_iter: .*/max_iter: $ITERS/" -e "s/^snapshot: .*/snapshot: $ITERS/" \
      -e "s/^snapshot_prefix: .*/snapshot_prefix: \"$1\"/" -e "s/^test_interval: .*/test_interval: 1000000/" \
      -e "s/^display: .*/display: $ITERS/" "$REPO/solvers/small_squeezenet/dense_solver.prototxt" \
      > "$WORK/tree/solvers/check/$1_solver.prototxt"
  local args=(); [ "$1" = gpu ] && args=(-gpu 0)
  local t; t=$(now)
  (cd "$WORK/tree/solvers/check" && timeout 240 "$CAFFE" train --solver="$1_solver.prototxt" "${args[@]}") \
    > "$WORK/train-$1.log" 2>&1 || { fail "caffe train ($1), log: $WORK/train-$1.log"; tail -3 "$WORK/train-$1.log"; }
  SPI=$(awk -v a="$t" -v b="$(now)" -v n="$ITERS" 'BEGIN { printf "%.5f", (b - a) / n }')
}
train "$MODE"; TRAIN_DEV=$SPI; train cpu; TRAIN_CPU=$SPI
echo "s/iteration (start-up included): $MODE $TRAIN_DEV, CPU ($NPROC threads) $TRAIN_CPU," \
     "CPU/$MODE $(awk -v a="$TRAIN_CPU" -v b="$TRAIN_DEV" 'BEGIN { printf "%.2f", a / b }')x"
grep -h "Iteration $ITERS, loss" "$WORK"/train-*.log

step "4. caffe test ${GPU[*]:-} of the small net against the CPU, the same weights (${MODE}_iter_$ITERS)"
ctest() {  # $1: gpu|cpu -> ACC and SECS
  local args=(); [ "$1" = gpu ] && args=(-gpu 0)
  local t; t=$(now)
  (cd "$WORK/tree/solvers/check" && timeout 120 "$CAFFE" test --model=../../models/small_squeezenet/trainval.prototxt \
     --weights="${MODE}_iter_$ITERS.caffemodel" --iterations=50 "${args[@]}") > "$WORK/test-$1.log" 2>&1 \
     || { fail "caffe test ($1), log: $WORK/test-$1.log"; tail -3 "$WORK/test-$1.log"; }
  ACC=$(grep -o 'accuracy_top1 = [0-9.e-]*' "$WORK/test-$1.log" | tail -1 | cut -d' ' -f3)
  SECS=$(secs "$t" "$(now)")
}
ctest "$MODE"; ACC_DEV=$ACC; T_DEV=$SECS; ctest cpu; ACC_CPU=$ACC; T_CPU=$SECS
echo "top-1 accuracy $MODE ${ACC_DEV:-none} ($T_DEV s), CPU ${ACC_CPU:-none} ($T_CPU s), 5,000 images"
awk -v a="$ACC_DEV" -v b="$ACC_CPU" 'BEGIN { ok = a != "" && b != ""; d = a - b; if (d < 0) d = -d;
  printf "|difference| %.2g: %s\n", d, (ok && d <= 1e-4) ? "equal to 1e-4" : "NOT EQUAL"; exit !(ok && d <= 1e-4) }' \
  || fail "accuracies differ"

step "5. caffe time: SqueezeNet v1.0 at batch 50, random weights, ${GPU[*]:-} against the CPU"
sed '0,/dim: 1$/s//dim: 50/' "$REPO/models/squeezenet_v1.0/deploy_han.prototxt" > "$WORK/squeezenet50.prototxt"
ctime() {  # $1: gpu|cpu, $2: iterations
  local args=(); [ "$1" = gpu ] && args=(-gpu 0)
  timeout 180 "$CAFFE" time --model="$WORK/squeezenet50.prototxt" --iterations="$2" "${args[@]}" 2>&1 \
    | grep -E "Average (Forward|Backward|Forward-Backward)" | sed -e 's/^.*\] /  /' -e "s/^/$1 /"
}
[ "$MODE" = gpu ] && ctime gpu 20; ctime cpu 2

step "6. pycaffe: the mask layer on the $MODE, $MASK_ITERS steps with momentum and weight decay, and its share of a step"
(cd "$WORK" && timeout 240 "$PY" "$REPO/bench/mask_overhead.py" --iters "$MASK_ITERS" --batch 32 "${GPU[@]/-gpu/--gpu}") \
  || fail "mask layer"

step "7. libraries loaded from outside the bundle (must be the machine's glibc and CUDA only)"
outside() {  # the libraries a command loads from outside $B
  { LD_DEBUG=libs "$@" > /dev/null 2> "$WORK/ld-debug.txt"; } 2> /dev/null
  sed -n 's/.*calling init: //p' "$WORK/ld-debug.txt" | grep -v "^$B/" | sort -u
}
{ outside "$CAFFE" device_query -gpu 0; outside "$PY" -c "import caffe, numpy"; } | sort -u | tee "$WORK/outside.txt"
grep -v -E '/(ld-linux[^/]*|libnvidia-[^/]*|lib(c|m|dl|rt|pthread|util|resolv|stdc\+\+|gcc_s|cuda|cudart|cublas|cublasLt|curand|nccl)\.so[^/]*)$' \
  "$WORK/outside.txt" && fail "the libraries above came from outside the bundle"

printf '\n== gpu_check (%s): %s in %s s\n' "$MODE" "$([ $FAILED = 0 ] && echo "all passed" || echo "SOME FAILED")" \
  "$(secs "$t0" "$(now)")"
exit $FAILED
