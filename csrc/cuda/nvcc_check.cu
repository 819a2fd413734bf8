// Compile-only check of the device code (csrc/cuda/check_compile.sh): every
// launcher, and through it every kernel, instantiated for the four element
// types, so template errors show up without torch or a GPU. Not part of the
// extension build.
#include "bn_accumulate_kernels.cuh"

namespace fastdarts::cuda {

#define FASTDARTS_INSTANTIATE(T)                                                                              \
  template void launch_bn_accumulate_forward<T>(const acc_t<T>*, const T*, const acc_t<T>*, const acc_t<T>*,    \
                                                const acc_t<T>*, acc_t<T>*, int64_t, int64_t, int64_t,          \
                                                cudaStream_t);                                                  \
  template void launch_bn_accumulate_backward<T>(const T*, const T*, const acc_t<T>*, const acc_t<T>*,         \
                                                 const acc_t<T>*, T*, acc_t<T>*, acc_t<T>*, int64_t, int64_t,    \
                                                 int64_t, cudaStream_t);

FASTDARTS_INSTANTIATE(float)
FASTDARTS_INSTANTIATE(double)
FASTDARTS_INSTANTIATE(__half)
FASTDARTS_INSTANTIATE(__nv_bfloat16)

#undef FASTDARTS_INSTANTIATE

}  // namespace fastdarts::cuda
