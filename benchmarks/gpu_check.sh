#!/usr/bin/env bash
# One prepared run on a GPU machine: the CUDA tests, then the search-step
# benchmark at the paper's setting (C=16, 8 layers, batch 64, 32x32, 8 ops),
# first and second order, every backend, each in a fresh process.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/gpu_search_step.json and prints the table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/fastdarts-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1

echo "== CUDA tests"
python3 -m pytest -q -x tests/test_mixed_op.py tests/test_data.py tests/test_search.py tests/test_architect.py \
  2>&1 | tee "$out/gpu_tests.log" | tail -5 || status=1

echo "== search step at the paper's setting"
python3 benchmarks/search_step.py --device cuda --order both --channels 16 --layers 8 --batch-size 64 \
  --warmup 2 --repeat 10 --json "$out/gpu_search_step.json" || status=1
exit $status
