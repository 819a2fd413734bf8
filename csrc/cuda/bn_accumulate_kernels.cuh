// CUDA kernels of fastdarts::bn_accumulate / bn_accumulate_backward (math in
// fastdarts/kernels/bn_accumulate.py). Raw pointers and a cudaStream_t only, no
// torch headers, so check_compile.sh can compile them with a bare nvcc.
// Element types: float, double, __half, __nv_bfloat16; arithmetic in float
// (double for double). z is contiguous [N, C, S], S = Π spatial, M = N·S.
// Reductions are deterministic: fixed per-block partials, then a fixed-order
// second pass; no floating-point atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdarts::cuda {

template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;
// Caps the elementwise grids (grid-stride loops cover the rest): a few waves on
// an H100/H200.
constexpr int64_t kMaxElementwiseBlocks = 8192;
// The backward reduction splits each channel into chunks until there are about
// this many blocks. Depends on sizes only, so results are bit-identical on any GPU.
constexpr int64_t kTargetReductionBlocks = 1024;
constexpr int64_t kMinChunkElements = 16 * kThreads;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return static_cast<unsigned>(blocks < kMaxElementwiseBlocks ? blocks : kMaxElementwiseBlocks);
}

// --- forward: out = acc + w·(z − mean_c)·invstd_c ---------------------------
// Index is uint32_t when the tensor allows it: the channel of an element needs a
// division, and 32-bit division is several times cheaper than 64-bit.
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    bn_accumulate_forward_kernel(const acc_t<T>* __restrict__ acc, const T* __restrict__ z,
                                 const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
                                 const acc_t<T>* __restrict__ weight, acc_t<T>* __restrict__ out, Index total,
                                 Index C, Index S) {
  using A = acc_t<T>;
  const A w = *weight;
  const Index stride = static_cast<Index>(blockDim.x) * gridDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index c = (i / S) % C;
    const A xhat = (to_acc(z[i]) - mean[c]) * invstd[c];
    out[i] = acc[i] + w * xhat;
  }
}

template <typename T>
void launch_bn_accumulate_forward(const acc_t<T>* acc, const T* z, const acc_t<T>* mean, const acc_t<T>* invstd,
                                  const acc_t<T>* weight, acc_t<T>* out, int64_t N, int64_t C, int64_t S,
                                  cudaStream_t stream) {
  const int64_t total = N * C * S;
  if (total == 0) return;
  // Keeps i + stride below 2^32 in the 32-bit variant.
  if (total + int64_t(kMaxElementwiseBlocks) * kThreads < (int64_t(1) << 32)) {
    bn_accumulate_forward_kernel<T, uint32_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        acc, z, mean, invstd, weight, out, uint32_t(total), uint32_t(C), uint32_t(S));
  } else {
    bn_accumulate_forward_kernel<T, int64_t>
        <<<elementwise_blocks(total), kThreads, 0, stream>>>(acc, z, mean, invstd, weight, out, total, C, S);
  }
}

// --- backward --------------------------------------------------------------

// Sum over the block in a fixed tree (warp shuffles, then warp 0 over the
// warps' results): deterministic for a fixed blockDim. Result in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared /* kThreads / 32 */) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();  // shared may be reused by the next call
  return v;
}

// How many chunks each channel's M elements are split into (gridDim.y of the
// partials kernel).
inline int64_t backward_chunks(int64_t C, int64_t M) {
  if (C == 0 || M == 0) return 0;
  int64_t chunks = ceil_div(kTargetReductionBlocks, C);
  const int64_t by_size = ceil_div(M, kMinChunkElements);
  if (chunks > by_size) chunks = by_size;
  if (chunks > 65535) chunks = 65535;
  return chunks;
}

// Workspace of launch_bn_accumulate_backward, in accumulator elements:
// per-block partials of Σdy and Σdy·x̂ (2·C·chunks), then mean_c(dy) and
// mean_c(dy·x̂) (2·C).
inline int64_t bn_accumulate_backward_workspace_elements(int64_t C, int64_t M) {
  return 2 * C * backward_chunks(C, M) + 2 * C;
}

// Block (c, chunk) sums dy and dy·x̂ over the elements m ∈ [chunk·len, ...) of
// channel c, m = n·S + s. Consecutive threads read consecutive s (coalesced);
// (n, s) and the offset advance without a division per element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_backward_partials_kernel(const T* __restrict__ dy, const T* __restrict__ z,
                                const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
                                acc_t<T>* __restrict__ partial_dy, acc_t<T>* __restrict__ partial_dy_xhat,
                                int64_t C, int64_t S, int64_t M, int64_t chunk_len) {
  using A = acc_t<T>;
  __shared__ A shared[kThreads / 32];
  const int64_t c = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < M ? begin + chunk_len : M;
  const A m = mean[c], istd = invstd[c];
  const int64_t CS = C * S;
  const int64_t step_n = kThreads / S, step_s = kThreads % S;

  A sum_dy = 0, sum_dy_xhat = 0;
  int64_t i = begin + threadIdx.x;
  if (i < end) {
    int64_t n = i / S, s = i - n * S;
    int64_t offset = n * CS + c * S + s;
    for (; i < end; i += kThreads) {
      const A g = to_acc(dy[offset]);
      const A xhat = (to_acc(z[offset]) - m) * istd;
      sum_dy += g;
      sum_dy_xhat += g * xhat;
      s += step_s;
      offset += step_n * CS + step_s;
      if (s >= S) {
        s -= S;
        offset += CS - S;
      }
    }
  }
  sum_dy = block_sum(sum_dy, shared);
  sum_dy_xhat = block_sum(sum_dy_xhat, shared);
  if (threadIdx.x == 0) {
    partial_dy[c * chunks + chunk] = sum_dy;
    partial_dy_xhat[c * chunks + chunk] = sum_dy_xhat;
  }
}

// One block: each channel's partials in chunk order → mean_c(dy), mean_c(dy·x̂);
// dweight = Σ_c Σdy·x̂ over a fixed channel-to-thread map and a fixed tree.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    bn_backward_finalize_kernel(const A* __restrict__ partial_dy, const A* __restrict__ partial_dy_xhat,
                                A* __restrict__ mean_dy, A* __restrict__ mean_dy_xhat, A* __restrict__ dweight,
                                int64_t C, int64_t chunks, int64_t M) {
  __shared__ A shared[kThreads / 32];
  A thread_dweight = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    A a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += partial_dy[c * chunks + k];
      b += partial_dy_xhat[c * chunks + k];
    }
    mean_dy[c] = a / static_cast<A>(M);
    mean_dy_xhat[c] = b / static_cast<A>(M);
    thread_dweight += b;
  }
  thread_dweight = block_sum(thread_dweight, shared);
  if (threadIdx.x == 0) *dweight = thread_dweight;
}

// dz = w·invstd_c·(dy − mean_c(dy) − x̂·mean_c(dy·x̂)).
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    bn_backward_dz_kernel(const T* __restrict__ dy, const T* __restrict__ z, const acc_t<T>* __restrict__ mean,
                          const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ weight,
                          const acc_t<T>* __restrict__ mean_dy, const acc_t<T>* __restrict__ mean_dy_xhat,
                          T* __restrict__ dz, Index total, Index C, Index S) {
  using A = acc_t<T>;
  const A w = *weight;
  const Index stride = static_cast<Index>(blockDim.x) * gridDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index c = (i / S) % C;
    const A istd = invstd[c];
    const A xhat = (to_acc(z[i]) - mean[c]) * istd;
    dz[i] = from_acc<T>(w * istd * (to_acc(dy[i]) - mean_dy[c] - xhat * mean_dy_xhat[c]));
  }
}

// Errors (launch or memset) are left for the caller's cudaGetLastError.
// dz may be nullptr (only dweight wanted). workspace holds
// bn_accumulate_backward_workspace_elements(C, N·S) accumulator elements.
// dweight (one element) is always written, 0 when there is nothing to sum.
template <typename T>
void launch_bn_accumulate_backward(const T* dy, const T* z, const acc_t<T>* mean, const acc_t<T>* invstd,
                                   const acc_t<T>* weight, T* dz, acc_t<T>* dweight, acc_t<T>* workspace, int64_t N,
                                   int64_t C, int64_t S, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t M = N * S;
  const int64_t chunks = backward_chunks(C, M);
  if (chunks == 0) {
    // All-zero bits are +0.0. A failure is left for cudaGetLastError, like a launch error.
    (void)cudaMemsetAsync(dweight, 0, sizeof(A), stream);
    return;
  }
  A* partial_dy = workspace;
  A* partial_dy_xhat = partial_dy + C * chunks;
  A* mean_dy = partial_dy_xhat + C * chunks;
  A* mean_dy_xhat = mean_dy + C;

  const int64_t chunk_len = ceil_div(M, chunks);
  bn_backward_partials_kernel<T><<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(chunks)), kThreads, 0,
                                   stream>>>(dy, z, mean, invstd, partial_dy, partial_dy_xhat, C, S, M, chunk_len);
  bn_backward_finalize_kernel<A>
      <<<1, kThreads, 0, stream>>>(partial_dy, partial_dy_xhat, mean_dy, mean_dy_xhat, dweight, C, chunks, M);
  if (dz == nullptr) return;
  const int64_t total = C * M;
  if (total + int64_t(kMaxElementwiseBlocks) * kThreads < (int64_t(1) << 32)) {
    bn_backward_dz_kernel<T, uint32_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        dy, z, mean, invstd, weight, mean_dy, mean_dy_xhat, dz, uint32_t(total), uint32_t(C), uint32_t(S));
  } else {
    bn_backward_dz_kernel<T, int64_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        dy, z, mean, invstd, weight, mean_dy, mean_dy_xhat, dz, total, C, S);
  }
}

}  // namespace fastdarts::cuda
