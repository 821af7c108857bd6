#!/usr/bin/env bash
# The whole GPU check in one command, for a lent H100/H200 (torch with CUDA, nvcc, ninja, pytest preinstalled,
# no network): build kdfast with CUDA in place, run the test suite (CUDA joins the device grid), run
# compute-sanitizer memcheck and racecheck over the CUDA tests, run the GPU benchmarks and write the report.
#   bash benchmarks/gpu_check.sh OUTDIR        (make gpu-check OUT=OUTDIR)
# Every step's log lands in OUTDIR; the benchmark results also in benchmarks/results/. The script keeps going
# after a failed step and exits non-zero if any failed.
set -uo pipefail
OUT=$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; else echo "   FAILED ($((SECONDS - t0)) s), see $name.log"; tail -25 "$OUT/$name.log"; status=1; fi
}

nvidia-smi >"$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
GPU=$(python3 -c "import torch; n=torch.cuda.get_device_name().upper(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
ARCH=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")

step build env KDFAST_CUDA=1 KDFAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" python3 setup.py build_ext --inplace
step cmake make cuda-compile JOBS="$(nproc)" VERBOSE=1
python3 -c "import kdfast; b = kdfast.backends(); print(b); assert b['cuda'], 'no CUDA kernels'" | tee -a "$OUT/gpu.txt" || status=1
step tests python3 -m pytest tests -q -x -p no:cacheprovider
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest tests -q -x -k cuda -p no:cacheprovider
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest tests -q -x -k cuda -p no:cacheprovider
step bench make bench-run NAME="$GPU" PY=python3
cp benchmarks/results/"$GPU".* "$OUT"/ 2>/dev/null
exit $status
