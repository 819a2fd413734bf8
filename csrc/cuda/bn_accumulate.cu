// CUDA implementations of fastdarts::bn_accumulate / bn_accumulate_backward
// (schemas and CPU kernels in ../bn_accumulate.cpp): argument checks, contiguous
// copies, output allocation, then the launchers of bn_accumulate_kernels.cuh
// on the current stream of z's device.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers, which this code does not need (and which a
// bare toolkit, as used by check_compile.sh, does not have).
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../bn_accumulate.h"
#include "bn_accumulate_kernels.cuh"

namespace fastdarts {
namespace {

// at::Half / at::BFloat16 have the bit layout of __half / __nv_bfloat16.
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

at::Tensor bn_accumulate_cuda(const at::Tensor& acc_in, const at::Tensor& z_in, const at::Tensor& mean_in,
                              const at::Tensor& invstd_in, const at::Tensor& weight_in) {
  const BnLayout L =
      check_bn_accumulate_args("bn_accumulate", z_in, mean_in, invstd_in, weight_in, "acc", acc_in);
  TORCH_CHECK(z_in.is_cuda(), "bn_accumulate: z is on ", z_in.device(), " but the CUDA kernel was called");
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor acc = acc_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty(z.sizes(), acc.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_accumulate_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    cuda::launch_bn_accumulate_forward<T>(acc.const_data_ptr<A>(),
                                          reinterpret_cast<const T*>(z.const_data_ptr<scalar_t>()),
                                          mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                                          weight.const_data_ptr<A>(), out.mutable_data_ptr<A>(), L.N, L.C, L.S,
                                          stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_accumulate_backward_cuda(const at::Tensor& dy_in, const at::Tensor& z_in,
                                                               const at::Tensor& mean_in,
                                                               const at::Tensor& invstd_in,
                                                               const at::Tensor& weight_in, bool compute_dz) {
  const BnLayout L =
      check_bn_accumulate_args("bn_accumulate_backward", z_in, mean_in, invstd_in, weight_in, "dy", dy_in);
  TORCH_CHECK(z_in.is_cuda(), "bn_accumulate_backward: z is on ", z_in.device(), " but the CUDA kernel was called");
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor dy = dy_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor dz = compute_dz ? at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::empty({0}, z.options());
  at::Tensor dweight = at::empty({}, mean.options());
  // From the caching allocator: no synchronisation, reused across calls.
  at::Tensor workspace =
      at::empty({cuda::bn_accumulate_backward_workspace_elements(L.C, L.per_channel())}, mean.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_accumulate_backward_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using A = cuda::acc_t<T>;
    cuda::launch_bn_accumulate_backward<T>(
        reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()),
        reinterpret_cast<const T*>(z.const_data_ptr<scalar_t>()), mean.const_data_ptr<A>(),
        invstd.const_data_ptr<A>(), weight.const_data_ptr<A>(),
        compute_dz ? reinterpret_cast<T*>(dz.mutable_data_ptr<scalar_t>()) : nullptr,
        dweight.mutable_data_ptr<A>(), workspace.mutable_data_ptr<A>(), L.N, L.C, L.S, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CUDA, m) {
  m.impl("bn_accumulate", &bn_accumulate_cuda);
  m.impl("bn_accumulate_backward", &bn_accumulate_backward_cuda);
}

}  // namespace fastdarts
