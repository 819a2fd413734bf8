#!/usr/bin/env bash
# Compile-only check of the CUDA sources with this machine's nvcc, no GPU and
# no CUDA torch needed (CI runs it; the CPU-only build never compiles .cu files):
#   1. the device code: nvcc_check.cu instantiates every launcher/kernel of
#      bn_accumulate_kernels.cuh for float, double, __half, __nv_bfloat16;
#   2. the torch glue bn_accumulate.cu against the installed (CPU) torch's
#      headers, with the flags torch's CUDAExtension uses.
# The CPU wheel lacks one generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h;
# a stub with its one line stands in for it. Nothing is linked.
# Usage: [PYTHON=python] [NVCC=nvcc] [ARCH=sm_90] csrc/cuda/check_compile.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
NVCC=${NVCC:-nvcc}
ARCH=${ARCH:-sm_90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "check_compile: $($NVCC --version | tail -n 1)"
echo "check_compile: [1/2] device code csrc/cuda/nvcc_check.cu (all launchers x 4 dtypes), -arch=$ARCH"
"$NVCC" -arch="$ARCH" -std=c++17 -c csrc/cuda/nvcc_check.cu -o "$work/nvcc_check.o"

echo "check_compile: [2/2] torch glue csrc/cuda/bn_accumulate.cu against $("$PYTHON" -c 'import torch; print("torch", torch.__version__)') headers"
mapfile -t torch_includes < <("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
abi=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
mkdir -p "$work/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
include_flags=()
for dir in "${torch_includes[@]}"; do include_flags+=("-I$dir"); done
# Torch's own header if it has one (a CUDA wheel); the stub only fills the gap.
include_flags+=("-I$work/stub")
# C++20: what torch's BuildExtension passes for torch >= 2.10, and valid for older headers too.
"$NVCC" -arch="$ARCH" -std=c++20 -c csrc/cuda/bn_accumulate.cu -o "$work/bn_accumulate.o" \
  "${include_flags[@]}" -D_GLIBCXX_USE_CXX11_ABI="$abi" -DFASTDARTS_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr

echo "check_compile: OK (device code and torch glue compile for $ARCH)"
