// fastdarts::pool3x3 / pool3x3_backward: the 3x3 max and average pools of the
// DARTS search space (padding 1, stride 1 or 2, average without the padding),
// CPU kernels. Their plain-PyTorch twins are in fastdarts/kernels/pool3x3.py.
//
// Why our own: the fused mixed op recomputes each pool in backward, and ATen's
// CPU max pool with indices is several times slower than the pool itself needs
// to be. The backward here needs no stored indices: it finds each window's
// maximum again in x, with ATen's tie rule (first maximum in row-major window
// order; NaN wins), so gradients equal the reference's exactly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fastdarts {
namespace {

struct PoolShape {
  int64_t planes, H, W, Ho, Wo, stride;
};

PoolShape check_pool_args(const char* op, const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x has an empty spatial size ", x.sizes());
  const int64_t H = x.size(2), W = x.size(3);
  // kernel 3, padding 1: Ho = floor((H + 2 - 3) / stride) + 1
  return {x.size(0) * x.size(1), H, W, (H - 1) / stride + 1, (W - 1) / stride + 1, stride};
}

// Window rows [h0, h1) and columns [w0, w1) of output (oh, ow), clipped to x.
inline void window(const PoolShape& P, int64_t oh, int64_t ow, int64_t& h0, int64_t& h1, int64_t& w0,
                   int64_t& w1) {
  h0 = std::max<int64_t>(oh * P.stride - 1, 0);
  h1 = std::min<int64_t>(oh * P.stride + 2, P.H);
  w0 = std::max<int64_t>(ow * P.stride - 1, 0);
  w1 = std::min<int64_t>(ow * P.stride + 2, P.W);
}

// NaN-propagating max; on equal values keeps a (the earlier in window order).
template <typename T>
inline T max_keep_first(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Stride 1: the 3x3 maximum is a row maximum of column maxima; two passes of
// contiguous loads that the compiler vectorises (the window scan does not).
template <typename scalar_t>
void max_forward_plane_stride1(const scalar_t* x, scalar_t* y, const PoolShape& P,
                               std::vector<at::opmath_type<scalar_t>>& rows) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = P.H, W = P.W;
  rows.resize(H * W);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* in = x + h * W;
    opmath_t* r = rows.data() + h * W;
    if (W == 1) {
      r[0] = static_cast<opmath_t>(in[0]);
      continue;
    }
    r[0] = max_keep_first(static_cast<opmath_t>(in[0]), static_cast<opmath_t>(in[1]));
    for (int64_t w = 1; w < W - 1; ++w) {
      r[w] = max_keep_first(max_keep_first(static_cast<opmath_t>(in[w - 1]), static_cast<opmath_t>(in[w])),
                            static_cast<opmath_t>(in[w + 1]));
    }
    r[W - 1] = max_keep_first(static_cast<opmath_t>(in[W - 2]), static_cast<opmath_t>(in[W - 1]));
  }
  for (int64_t h = 0; h < H; ++h) {
    const opmath_t* mid = rows.data() + h * W;
    const opmath_t* up = h > 0 ? mid - W : mid;
    const opmath_t* down = h + 1 < H ? mid + W : mid;
    scalar_t* out = y + h * W;
    for (int64_t w = 0; w < W; ++w) out[w] = static_cast<scalar_t>(max_keep_first(max_keep_first(up[w], mid[w]), down[w]));
  }
}

// out[h][w] = Σ of in over the 3x3 window around (h, w) inside the plane,
// added in row-major window order starting from 0, which is the order of
// ATen's window loop, so sums are bit-identical to it. The loop runs across w
// for each window element in turn: contiguous, vectorisable, same order.
template <typename opmath_t>
void box_sum3x3(const opmath_t* in, opmath_t* out, int64_t H, int64_t W) {
  for (int64_t h = 0; h < H; ++h) {
    opmath_t* o = out + h * W;
    for (int64_t w = 0; w < W; ++w) o[w] = opmath_t(0);
    for (int64_t r = std::max<int64_t>(h - 1, 0); r < std::min<int64_t>(h + 2, H); ++r) {
      const opmath_t* a = in + r * W;
      if (W == 1) {
        o[0] = o[0] + a[0];
        continue;
      }
      o[0] = (o[0] + a[0]) + a[1];
      for (int64_t w = 1; w < W - 1; ++w) o[w] = ((o[w] + a[w - 1]) + a[w]) + a[w + 1];
      o[W - 1] = (o[W - 1] + a[W - 2]) + a[W - 1];
    }
  }
}

// Elements of the 3x3 window at (h, w) that lie inside an H x W plane
// (stride 1, padding 1): count_include_pad=False divides by this.
inline int64_t window_count(int64_t h, int64_t w, int64_t H, int64_t W) {
  const int64_t rows = std::min<int64_t>(h + 2, H) - std::max<int64_t>(h - 1, 0);
  const int64_t cols = std::min<int64_t>(w + 2, W) - std::max<int64_t>(w - 1, 0);
  return rows * cols;
}

// Stride 1 average pool: window sum / window count, as ATen computes it.
template <typename scalar_t>
void avg_forward_plane_stride1(const scalar_t* x, scalar_t* y, const PoolShape& P,
                               std::vector<at::opmath_type<scalar_t>>& in,
                               std::vector<at::opmath_type<scalar_t>>& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = P.H, W = P.W;
  in.resize(H * W);
  sums.resize(H * W);
  for (int64_t i = 0; i < H * W; ++i) in[i] = static_cast<opmath_t>(x[i]);
  box_sum3x3(in.data(), sums.data(), H, W);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w)
      y[h * W + w] = static_cast<scalar_t>(sums[h * W + w] / static_cast<opmath_t>(window_count(h, w, H, W)));
}

// Its backward: each input gets dy/count of every window it is in, which is the
// window sum of dy/count (the windows are symmetric); ATen scatters those
// shares output by output, which adds them to each input in the same order.
template <typename scalar_t>
void avg_backward_plane_stride1(const scalar_t* dy, scalar_t* dx, const PoolShape& P,
                                std::vector<at::opmath_type<scalar_t>>& share,
                                std::vector<at::opmath_type<scalar_t>>& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = P.H, W = P.W;
  share.resize(H * W);
  sums.resize(H * W);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w)
      share[h * W + w] = static_cast<opmath_t>(dy[h * W + w]) / static_cast<opmath_t>(window_count(h, w, H, W));
  box_sum3x3(share.data(), sums.data(), H, W);
  for (int64_t i = 0; i < H * W; ++i) dx[i] = static_cast<scalar_t>(sums[i]);
}

// Pools x's plane into y (Ho x Wo). A stride-2 window at (oh, ow) is the
// stride-1 window at (2·oh, 2·ow), clipped the same way, so stride 2 takes the
// vectorised stride-1 result at every other position.
template <typename scalar_t>
void pool_plane(const scalar_t* x, scalar_t* y, const PoolShape& P, bool is_max, std::vector<scalar_t>& full,
                std::vector<at::opmath_type<scalar_t>>& rows, std::vector<at::opmath_type<scalar_t>>& in,
                std::vector<at::opmath_type<scalar_t>>& sums) {
  scalar_t* dst = y;
  if (P.stride != 1) {
    full.resize(P.H * P.W);
    dst = full.data();
  }
  if (is_max)
    max_forward_plane_stride1(x, dst, P, rows);
  else
    avg_forward_plane_stride1(x, dst, P, in, sums);
  if (P.stride != 1) {
    for (int64_t oh = 0; oh < P.Ho; ++oh)
      for (int64_t ow = 0; ow < P.Wo; ++ow) y[oh * P.Wo + ow] = full[oh * P.stride * P.W + ow * P.stride];
  }
}

// The input index ATen's max pool picks for a window whose maximum is `best`:
// the first element equal to it in row-major order, or the last NaN if the
// maximum is NaN (ATen's rule "v > best || isnan(v)" updates on every NaN).
template <typename scalar_t>
inline int64_t argmax_in_window(const scalar_t* x, int64_t W, int64_t h0, int64_t h1, int64_t w0, int64_t w1,
                                scalar_t best) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t m = static_cast<opmath_t>(best);
  int64_t index = h0 * W + w0;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const opmath_t v = static_cast<opmath_t>(x[h * W + w]);
      if (m != m) {
        if (v != v) index = h * W + w;
      } else if (v == m) {
        return h * W + w;
      }
    }
  }
  return index;
}

template <typename scalar_t>
void backward_plane(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const PoolShape& P, bool is_max,
                    std::vector<at::opmath_type<scalar_t>>& acc, std::vector<at::opmath_type<scalar_t>>& rows,
                    std::vector<scalar_t>& pooled) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (is_max) {
    // The window maxima again (fast, vectorised), so that finding each
    // argmax is a short scan that stops at the first match.
    pooled.resize(P.Ho * P.Wo);
    std::vector<opmath_t> unused_in, unused_sums;
    std::vector<scalar_t> full;
    pool_plane(x, pooled.data(), P, true, full, rows, unused_in, unused_sums);
  }
  // Accumulate in opmath, in output order (ATen's order), then store once.
  acc.assign(P.H * P.W, opmath_t(0));
  for (int64_t oh = 0; oh < P.Ho; ++oh) {
    for (int64_t ow = 0; ow < P.Wo; ++ow) {
      int64_t h0, h1, w0, w1;
      window(P, oh, ow, h0, h1, w0, w1);
      const opmath_t g = static_cast<opmath_t>(dy[oh * P.Wo + ow]);
      if (is_max) {
        acc[argmax_in_window(x, P.W, h0, h1, w0, w1, pooled[oh * P.Wo + ow])] += g;
      } else {
        const opmath_t share = g / static_cast<opmath_t>((h1 - h0) * (w1 - w0));
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) acc[h * P.W + w] += share;
      }
    }
  }
  for (int64_t i = 0; i < P.H * P.W; ++i) dx[i] = static_cast<scalar_t>(acc[i]);
}

int64_t planes_per_task(const PoolShape& P) { return std::max<int64_t>(1, 16384 / (P.H * P.W)); }

at::Tensor pool3x3_cpu(const at::Tensor& x_in, int64_t stride, bool is_max) {
  const PoolShape P = check_pool_args("pool3x3", x_in, stride);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({x.size(0), x.size(1), P.Ho, P.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool3x3_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P.planes, planes_per_task(P), [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> rows, in, sums;
      std::vector<scalar_t> full;
      for (int64_t p = begin; p < end; ++p)
        pool_plane(xp + p * P.H * P.W, yp + p * P.Ho * P.Wo, P, is_max, full, rows, in, sums);
    });
  });
  return y;
}

at::Tensor pool3x3_backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, int64_t stride, bool is_max) {
  const PoolShape P = check_pool_args("pool3x3_backward", x_in, stride);
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.size(0) == x_in.size(0) && dy_in.size(1) == x_in.size(1) &&
                  dy_in.size(2) == P.Ho && dy_in.size(3) == P.Wo,
              "pool3x3_backward: dy must have the pooled shape [", x_in.size(0), ", ", x_in.size(1), ", ", P.Ho,
              ", ", P.Wo, "], got ", dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), "pool3x3_backward: dy has dtype ", dy_in.scalar_type(),
              " but x has ", x_in.scalar_type());
  TORCH_CHECK(dy_in.device() == x_in.device(), "pool3x3_backward: dy is on ", dy_in.device(), " but x is on ",
              x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool3x3_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P.planes, planes_per_task(P), [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> acc, rows, sums;
      std::vector<scalar_t> pooled;
      for (int64_t p = begin; p < end; ++p)
        if (!is_max && P.stride == 1)
          avg_backward_plane_stride1(dyp + p * P.Ho * P.Wo, dxp + p * P.H * P.W, P, acc, sums);
        else
          backward_plane(dyp + p * P.Ho * P.Wo, xp + p * P.H * P.W, dxp + p * P.H * P.W, P, is_max, acc, rows,
                       pooled);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdarts, m) {
  m.def("pool3x3(Tensor x, int stride, bool is_max) -> Tensor");
  m.def("pool3x3_backward(Tensor dy, Tensor x, int stride, bool is_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("pool3x3", &pool3x3_cpu);
  m.impl("pool3x3_backward", &pool3x3_backward_cpu);
}

}  // namespace fastdarts
