// fastdarts::bn_accumulate / bn_accumulate_backward: operator schemas, argument
// checks and CPU kernels, plus the stub that makes this library importable as
// `fastdarts._C` (importing it runs the TORCH_LIBRARY registrations).
// The math and its plain-PyTorch twins are in fastdarts/kernels/bn_accumulate.py;
// the CUDA kernels register themselves from cuda/bn_accumulate.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bn_accumulate.h"

namespace fastdarts {

BnLayout check_bn_accumulate_args(const char* op, const at::Tensor& z, const at::Tensor& mean,
                                  const at::Tensor& invstd, const at::Tensor& weight,
                                  const char* same_shape_name, const at::Tensor& same_shape) {
  TORCH_CHECK(z.dim() >= 2, op, ": z must be a tensor [N, C, ...], got shape ", z.sizes());
  const auto z_dtype = z.scalar_type();
  TORCH_CHECK(z_dtype == at::kFloat || z_dtype == at::kDouble || z_dtype == at::kHalf ||
                  z_dtype == at::kBFloat16,
              op, ": z has dtype ", z_dtype, "; supported: float32, float64, float16, bfloat16");
  const auto acc_dtype = accumulator_dtype(z_dtype);
  const int64_t C = z.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"invstd", invstd}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C,
                ",) (one value per channel of z), got ", t.sizes());
  }
  TORCH_CHECK(weight.numel() == 1, op, ": weight must hold one value, got shape ", weight.sizes());
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"invstd", invstd}, {"weight", weight}}) {
    TORCH_CHECK(t.scalar_type() == acc_dtype, op, ": ", name, " must be ", acc_dtype, " for z of dtype ",
                z_dtype, ", got ", t.scalar_type());
  }
  TORCH_CHECK(same_shape.sizes() == z.sizes(), op, ": ", same_shape_name, " must have z's shape ", z.sizes(),
              ", got ", same_shape.sizes());
  const bool is_accumulator = std::string(same_shape_name) == "acc";
  const auto want = is_accumulator ? acc_dtype : z_dtype;
  TORCH_CHECK(same_shape.scalar_type() == want, op, ": ", same_shape_name, " must be ", want,
              " for z of dtype ", z_dtype, ", got ", same_shape.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                                {"invstd", invstd},
                                {"weight", weight},
                                {same_shape_name, same_shape}}) {
    TORCH_CHECK(t.device() == z.device(), op, ": ", name, " is on ", t.device(), " but z is on ", z.device(),
                "; all arguments must be on one device");
  }
  int64_t S = 1;
  for (int64_t d = 2; d < z.dim(); ++d) S *= z.size(d);
  return BnLayout{z.size(0), C, S};
}

namespace {

// Enough elements per task that at::parallel_for's overhead stays small.
constexpr int64_t kElementsPerTask = 32768;

int64_t planes_per_task(int64_t S) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(S, 1)); }

// One (n, c) plane of z is S contiguous elements; all loops below walk planes.
template <typename scalar_t, typename acc_t>
void forward_cpu(const acc_t* acc, const scalar_t* z, const acc_t* mean, const acc_t* invstd, acc_t w,
                 acc_t* out, const BnLayout& L) {
  at::parallel_for(0, L.N * L.C, planes_per_task(L.S), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % L.C;
      const acc_t m = mean[c], istd = invstd[c];
      const int64_t base = plane * L.S;
      for (int64_t s = 0; s < L.S; ++s) {
        // Same operation order as bn_accumulate_ref, so fp32 results agree to rounding.
        const acc_t xhat = (static_cast<acc_t>(z[base + s]) - m) * istd;
        out[base + s] = acc[base + s] + w * xhat;
      }
    }
  });
}

// Per-plane Σdy and Σdy·x̂ in double. A fixed number of independent lanes lets
// the compiler vectorise without reassociating (the sum order is fixed, so the
// result does not depend on the thread count or the ISA).
template <typename scalar_t, typename acc_t>
void plane_sums(const scalar_t* dy, const scalar_t* z, acc_t m, acc_t istd, int64_t S, double& sum_dy,
                double& sum_dy_xhat) {
  constexpr int kLanes = 8;
  double lane_dy[kLanes] = {};
  double lane_dy_xhat[kLanes] = {};
  int64_t s = 0;
  for (; s + kLanes <= S; s += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t g = static_cast<acc_t>(dy[s + k]);
      const acc_t xhat = (static_cast<acc_t>(z[s + k]) - m) * istd;
      lane_dy[k] += static_cast<double>(g);
      lane_dy_xhat[k] += static_cast<double>(g) * static_cast<double>(xhat);
    }
  }
  for (int k = 0; s < S; ++s, ++k) {
    const acc_t g = static_cast<acc_t>(dy[s]);
    const acc_t xhat = (static_cast<acc_t>(z[s]) - m) * istd;
    lane_dy[k] += static_cast<double>(g);
    lane_dy_xhat[k] += static_cast<double>(g) * static_cast<double>(xhat);
  }
  sum_dy = 0;
  sum_dy_xhat = 0;
  for (int k = 0; k < kLanes; ++k) {
    sum_dy += lane_dy[k];
    sum_dy_xhat += lane_dy_xhat[k];
  }
}

template <typename scalar_t, typename acc_t>
acc_t backward_cpu(const scalar_t* dy, const scalar_t* z, const acc_t* mean, const acc_t* invstd, acc_t w,
                   scalar_t* dz /* nullptr: only dweight */, const BnLayout& L) {
  const int64_t N = L.N, C = L.C, S = L.S, M = L.per_channel();
  if (M == 0 || C == 0) return acc_t(0);

  // Pass 1: partial sums per (n, c) plane, in parallel over planes.
  std::vector<double> plane_dy(N * C), plane_dy_xhat(N * C);
  at::parallel_for(0, N * C, planes_per_task(S), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      plane_sums(dy + plane * S, z + plane * S, mean[c], invstd[c], S, plane_dy[plane], plane_dy_xhat[plane]);
    }
  });

  // Pass 2: per channel, the planes in n order; then dweight over channels in c order.
  std::vector<double> sum_dy(C), sum_dy_xhat(C);
  at::parallel_for(0, C, std::max<int64_t>(1, kElementsPerTask / N), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double a = 0, b = 0;
      for (int64_t n = 0; n < N; ++n) {
        a += plane_dy[n * C + c];
        b += plane_dy_xhat[n * C + c];
      }
      sum_dy[c] = a;
      sum_dy_xhat[c] = b;
    }
  });
  double dweight = 0;
  for (int64_t c = 0; c < C; ++c) dweight += sum_dy_xhat[c];
  if (dz == nullptr) return static_cast<acc_t>(dweight);

  // Pass 3: dz = w·invstd_c·(dy − mean_c(dy) − x̂·mean_c(dy·x̂)).
  std::vector<acc_t> mean_dy(C), mean_dy_xhat(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_dy[c] = static_cast<acc_t>(sum_dy[c] / static_cast<double>(M));
    mean_dy_xhat[c] = static_cast<acc_t>(sum_dy_xhat[c] / static_cast<double>(M));
  }
  at::parallel_for(0, N * C, planes_per_task(S), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const acc_t m = mean[c], istd = invstd[c], coef = w * istd;
      const acc_t a = mean_dy[c], b = mean_dy_xhat[c];
      const int64_t base = plane * S;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t g = static_cast<acc_t>(dy[base + s]);
        const acc_t xhat = (static_cast<acc_t>(z[base + s]) - m) * istd;
        dz[base + s] = static_cast<scalar_t>(coef * (g - a - xhat * b));
      }
    }
  });
  return static_cast<acc_t>(dweight);
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor bn_accumulate_cpu(const at::Tensor& acc_in, const at::Tensor& z_in, const at::Tensor& mean_in,
                             const at::Tensor& invstd_in, const at::Tensor& weight) {
  const BnLayout L = check_bn_accumulate_args("bn_accumulate", z_in, mean_in, invstd_in, weight, "acc", acc_in);
  TORCH_CHECK(z_in.device().is_cpu(), "bn_accumulate: the CPU kernel got z on ", z_in.device());
  const at::Tensor acc = acc_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor out = at::empty(z.sizes(), acc.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_accumulate_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_cpu<scalar_t, acc_t>(acc.const_data_ptr<acc_t>(), z.const_data_ptr<scalar_t>(),
                                 mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                 *weight.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), L);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_accumulate_backward_cpu(const at::Tensor& dy_in, const at::Tensor& z_in,
                                                              const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                              const at::Tensor& weight, bool compute_dz) {
  const BnLayout L =
      check_bn_accumulate_args("bn_accumulate_backward", z_in, mean_in, invstd_in, weight, "dy", dy_in);
  TORCH_CHECK(z_in.device().is_cpu(), "bn_accumulate_backward: the CPU kernel got z on ", z_in.device());
  const at::Tensor dy = dy_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor dz = compute_dz ? at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::empty({0}, z.options());
  at::Tensor dweight = at::empty({}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_accumulate_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    *dweight.mutable_data_ptr<acc_t>() = backward_cpu<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(), *weight.const_data_ptr<acc_t>(),
        compute_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr, L);
  });
  return {dz, dweight};
}

}  // namespace

// Fake (meta) implementations and the autograd formula are registered from
// Python, in fastdarts/kernels/extension.py, the one place that imports fastdarts._C.
TORCH_LIBRARY(fastdarts, m) {
  m.def("bn_accumulate(Tensor acc, Tensor z, Tensor mean, Tensor invstd, Tensor weight) -> Tensor");
  m.def(
      "bn_accumulate_backward(Tensor dy, Tensor z, Tensor mean, Tensor invstd, Tensor weight, bool compute_dz)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("bn_accumulate", &bn_accumulate_cpu);
  m.impl("bn_accumulate_backward", &bn_accumulate_backward_cpu);
}

}  // namespace fastdarts

// `import fastdarts._C` only needs a module object: loading the shared library
// is what registers the operators. No pybind11, so the library stays small.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FASTDARTS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // Lets Python tell "built without CUDA" from "CUDA kernels failed to register".
  if (module != nullptr && PyModule_AddIntConstant(module, "built_with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
