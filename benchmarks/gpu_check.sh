#!/usr/bin/env bash
# One prepared run on a GPU machine (no internet needed):
#   1. build fastdarts._C with its CUDA kernels against the installed CUDA torch;
#   2. the CUDA tests: compiled kernels, Triton kernels (real GPU, not the
#      interpreter), fused vs reference on CUDA;
#   3. the kernel micro-benchmarks (benchmarks/test_kernels.py), if pytest-benchmark is installed;
#   4. the search-step benchmark at the paper's setting (C=16, 8 layers,
#      batch 64, 32x32, 8 ops), first and second order, every backend, each
#      in a fresh process, eager and replayed as a CUDA graph (--cuda-graph);
#   5. the largest batch each backend fits (second order, up to 1024) and its images/s.
# Each part runs under a time limit (120+100+30+30+140+60 s) so that the whole stays within 8 minutes;
# the op counts (aten_ops_per_step) are the CPU runs' (they do not depend on the device).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/{build.log,gpu_tests.log,gpu_kernels.{json,log},gpu_search_step.json,gpu_max_batch.json}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/fastdarts-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1

echo "== build (CUDA kernels if nvcc is found)"
if MAX_JOBS=${MAX_JOBS:-16} timeout 120 python3 setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -n 2 "$out/build.log"
else
  tail -n 30 "$out/build.log"; status=1
fi
# The build falls back to CPU kernels rather than fail (setup.py): here that is a failure.
grep "fastdarts: WARNING" "$out/build.log" && status=1
python3 -c "import fastdarts as fd, torch; from fastdarts.kernels import extension as e; from fastdarts.kernels.backend import kernel_backend; print('available:', fd.available_backends(), '| extension:', e.HAS_EXTENSION, 'cuda kernels:', e.HAS_CUDA_KERNELS, e.EXTENSION_ERROR or '', '| chosen on cuda:', kernel_backend(torch.device('cuda'))); assert e.HAS_CUDA_KERNELS" || status=1

echo "== CUDA tests"
timeout 100 python3 -m pytest -q tests/test_kernels_cpp.py tests/test_kernels_triton.py tests/test_fused_mixed_op.py \
  tests/test_mixed_op.py tests/test_architect.py tests/test_cuda_graph.py 2>&1 | tee "$out/gpu_tests.log" | tail -n 8
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== fused with the compiled CUDA kernels instead of Triton"
FASTDARTS_BACKEND=cuda timeout 30 python3 -m pytest -q tests/test_fused_mixed_op.py -k "cuda" 2>&1 | tail -n 3
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== kernel micro-benchmarks (CPU and GPU; needs pytest-benchmark, the 'bench' extra)"
if python3 -c "import pytest_benchmark" 2>/dev/null; then
  timeout 30 python3 -m pytest benchmarks --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.2 -p no:cacheprovider \
    --benchmark-json "$out/gpu_kernels.json" 2>&1 | tee "$out/gpu_kernels.log" \
    | awk '/kernel median \/ ref median/{on=1} /benchmark .*: [0-9]+ tests/{on=0} on; END{print}' || status=1
else
  echo "pytest-benchmark is not installed: skipped"
fi

echo "== search step at the paper's setting, eager and as a CUDA graph"
timeout 140 python3 benchmarks/search_step.py --device cuda --order both --channels 16 --layers 8 --batch-size 64 \
  --warmup 1 --repeat 5 --cuda-graph --no-op-count --json "$out/gpu_search_step.json" || status=1

echo "== largest batch per backend (second order)"
# No op count here: it is the search-step run's (aten_ops_per_step), and each
# of these many workers would count again on a CPU copy.
timeout 60 python3 benchmarks/search_step.py --device cuda --order second --channels 16 --layers 8 --batch-size 64 \
  --warmup 0 --repeat 1 --find-max-batch --max-batch-cap 1024 --no-op-count --json "$out/gpu_max_batch.json" || status=1
exit $status
