#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA extension, run the whole test
# suite (CUDA cases included), profile the kernels and run the GPU benchmarks.
# Everything is written under the folder given as $1 (default bench-out/gpu).
#   bash benchmarks/gpu_run.sh [OUT_DIR] [tests|bench|all]
# BENCH_PARTS (default abcd) picks the parts of bench_engine.py to run;
# GPU_STREAMING_ARGS adds options to benchmarks/gpu_streaming.py (e.g. "--size 8").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out/gpu}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# C++ exceptions thrown from the library (bad-input errors) must unwind
# through the C++ runtime torch itself loads: build with the system compiler,
# even where the environment names another toolchain (an /opt g++ 13.3 whose
# runtime differs made every TORCH_CHECK failure a segfault on one CUDA image).
if [[ -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi

if ! python3 -c "import ccsmerge, sys; sys.exit(0 if ccsmerge.build_info()['cuda_ext'] else 1)" 2>/dev/null; then
  echo "== build"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import ccsmerge, torch; print(ccsmerge.build_info()); print(torch.cuda.get_device_name())"
} | tee "$out/machine.txt"

if [[ $what == all || $what == tests ]]; then
  echo "== tests"
  python3 -m pytest -q -rs tests 2>&1 | tee "$out/tests.txt" | tail -25
fi
if [[ $what == all || $what == bench ]]; then
  echo "== mean kernel under Nsight Compute"
  ncu --clock-control none -k regex:mean_kernel \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    python3 benchmarks/profile_mean.py > "$out/ncu_mean.txt" 2>&1
  grep -E "mean_kernel|duration|bytes|throughput" "$out/ncu_mean.txt" | head -40
  echo "== CART stage profile"
  python3 benchmarks/profile_cart.py > "$out/profile_cart.txt" 2>&1
  grep -v Warn "$out/profile_cart.txt" | head -24
  echo "== engine benchmarks"
  python3 benchmarks/bench_engine.py --device cuda --preset quick --parts "${BENCH_PARTS:-abcd}" --out "$out" 2>&1 | tee "$out/bench_engine.log" | tail -60
  echo "== streaming merges on the GPU (overlapped host-to-device copies on/off, GPU budget)"
  # shellcheck disable=SC2086  # GPU_STREAMING_ARGS holds several options
  python3 -m benchmarks.gpu_streaming --device cuda --out "$out" ${GPU_STREAMING_ARGS:-} 2>&1 | tee "$out/gpu_streaming.log" | tail -20
fi
