// Shared by the CPU kernels (bn_accumulate.cpp) and the CUDA glue
// (cuda/bn_accumulate.cu): the argument checks, so both devices reject the same
// inputs with the same messages as check_args in fastdarts/kernels/bn_accumulate.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastdarts {

// z viewed as [N, C, S] with S = Π spatial; M = N·S elements per channel.
struct BnLayout {
  int64_t N;
  int64_t C;
  int64_t S;
  int64_t per_channel() const { return N * S; }
};

// Checks z, mean, invstd, weight and the tensor that must have z's shape
// (`acc` in the accumulator dtype, or `dy` in z's dtype), and that all of them
// are on z's device. Throws c10::Error (RuntimeError in Python) naming the
// offending argument.
BnLayout check_bn_accumulate_args(const char* op, const at::Tensor& z, const at::Tensor& mean,
                                  const at::Tensor& invstd, const at::Tensor& weight,
                                  const char* same_shape_name, const at::Tensor& same_shape);

// fp32 accumulation for fp32/fp16/bf16 inputs, fp64 for fp64.
inline at::ScalarType accumulator_dtype(at::ScalarType z_dtype) {
  return z_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastdarts
