// Python bindings of the CUDA extension: argument checks, allocation, dtype dispatch and error
// reporting around the launchers of correspondence_warp.h and contextual_loss.h (the only file
// with torch headers).
// The torch.library ops live in cocos_kernels/ops; cocos_kernels/cuda.py calls these.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <string>
#include <tuple>

#include "contextual_loss.h"
#include "correspondence_warp.h"

namespace cocos_kernels {
namespace bindings {
namespace {

using cuda::WarpShape;

void check_tensor(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

int checked_int(int64_t x, const char* name) {
  TORCH_CHECK(x <= std::numeric_limits<int>::max(), name, " = ", x, " is too large for the CUDA kernels");
  return static_cast<int>(x);
}

// (B, Nq, D) q, (B, Nk, D) k, (B, Cv, Nk) v: the shape every kernel takes, checked.
WarpShape warp_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tensor(q, "q", 3);
  check_tensor(k, "k", 3);
  check_tensor(v, "v", 3);
  check_same(k, q, "k");
  check_same(v, q, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(2) == k.size(1),
              "expected q (B, Nq, D), k (B, Nk, D), v (B, Cv, Nk), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  return WarpShape{q.size(0), q.size(1), k.size(1), checked_int(q.size(2), "D"), checked_int(v.size(1), "Cv")};
}

const uint8_t* mask_pointer(const c10::optional<at::Tensor>& key_mask, const WarpShape& s, const at::Tensor& q) {
  if (!key_mask.has_value()) return nullptr;
  const at::Tensor& m = *key_mask;
  check_tensor(m, "key_mask", 2);
  TORCH_CHECK(m.scalar_type() == at::kBool, "key_mask must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "key_mask must be on ", q.device(), ", got ", m.device());
  TORCH_CHECK(m.size(0) == s.batch && m.size(1) == s.nk, "key_mask must be (B, Nk) = (", s.batch, ", ", s.nk,
              "), got ", m.sizes());
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

// The CUDA type of a tensor's elements, for the launcher templates.
template <class T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <class T>
const typename CudaType<T>::type* ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.data_ptr<T>());
}

template <class T>
typename CudaType<T>::type* mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.data_ptr<T>());
}

float* float_ptr_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Runs body<scalar_t>() for the kernels' dtypes (float32, float16, bfloat16).
#define COCOS_KERNELS_DISPATCH(dtype, name, ...)                                         \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)   \
                                      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                          AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor> correspondence_warp_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, double scale,
                                                               const c10::optional<at::Tensor>& key_mask) {
  const WarpShape s = warp_shape(q, k, v);
  const uint8_t* mask = mask_pointer(key_mask, s, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.batch, s.cv, s.nq}, v.options());
  at::Tensor lse = at::empty({s.batch, s.nq}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  COCOS_KERNELS_DISPATCH(q.scalar_type(), "correspondence_warp_forward", [&] {
    C10_CUDA_CHECK((cuda::correspondence_warp_forward(ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), mask,
                                                      mutable_ptr<scalar_t>(out), lse.data_ptr<float>(), s,
                                                      static_cast<float>(scale), stream)));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correspondence_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool need_dq, bool need_dk, bool need_dv,
    const c10::optional<at::Tensor>& key_mask) {
  const WarpShape s = warp_shape(q, k, v);
  const uint8_t* mask = mask_pointer(key_mask, s, q);
  check_tensor(grad_out, "grad_out", 3);
  check_tensor(out, "out", 3);
  check_tensor(lse, "lse", 2);
  check_same(grad_out, q, "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == s.batch && out.size(1) == s.cv &&
                  out.size(2) == s.nq,
              "grad_out and out must be (B, Cv, Nq) = (", s.batch, ", ", s.cv, ", ", s.nq, "), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.size(0) == s.batch && lse.size(1) == s.nq,
              "lse must be float32 (B, Nq), got ", lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  // Every gradient is written whole by its kernel, except where there is nothing to sum over.
  const bool empty = s.nq == 0 || s.nk == 0;
  auto alloc = [&](bool need, at::IntArrayRef shape) {
    return need ? (empty ? at::zeros(shape, f32) : at::empty(shape, f32)) : at::Tensor();
  };
  at::Tensor dq = alloc(need_dq, {s.batch, s.nq, s.d});
  at::Tensor dk = alloc(need_dk, {s.batch, s.nk, s.d});
  at::Tensor dv = alloc(need_dv, {s.batch, s.cv, s.nk});
  if (empty) return {dq, dk, dv};
  const at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(1);  // (B, Nq)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  COCOS_KERNELS_DISPATCH(q.scalar_type(), "correspondence_warp_backward", [&] {
    C10_CUDA_CHECK((cuda::correspondence_warp_backward(
        ptr<scalar_t>(grad_out), ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), mask, lse.data_ptr<float>(),
        delta.data_ptr<float>(), float_ptr_or_null(dq), float_ptr_or_null(dk), float_ptr_or_null(dv), s,
        static_cast<float>(scale), stream)));
  });
  return {dq, dk, dv};
}

// x (B, C, N) float32 -> rows (B, N, C), written into `rows` (float32, float16 or bfloat16).
void prepare_features(const at::Tensor& x, at::Tensor& rows, bool center, bool normalize, double eps) {
  check_tensor(x, "x", 3);
  check_tensor(rows, "rows", 3);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(rows.device() == x.device() && rows.size(0) == x.size(0) && rows.size(1) == x.size(2) &&
                  rows.size(2) == x.size(1),
              "rows must be (B, N, C) on ", x.device(), " for x (B, C, N) ", x.sizes(), ", got ", rows.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  COCOS_KERNELS_DISPATCH(rows.scalar_type(), "prepare_features", [&] {
    C10_CUDA_CHECK((cuda::prepare_features(x.data_ptr<float>(), mutable_ptr<scalar_t>(rows), x.size(0), x.size(1),
                                           x.size(2), center, normalize, static_cast<float>(eps), stream)));
  });
}

// grad_rows (B, N, C) float32, x (B, C, N) float32 -> dx (B, C, N) float32.
at::Tensor prepare_features_backward(const at::Tensor& grad_rows, const at::Tensor& x, bool center, bool normalize,
                                     double eps) {
  check_tensor(x, "x", 3);
  check_tensor(grad_rows, "grad_rows", 3);
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad_rows.scalar_type() == at::kFloat,
              "x and grad_rows must be float32, got ", x.scalar_type(), " and ", grad_rows.scalar_type());
  TORCH_CHECK(grad_rows.size(0) == x.size(0) && grad_rows.size(1) == x.size(2) && grad_rows.size(2) == x.size(1),
              "grad_rows must be (B, N, C) for x (B, C, N) ", x.sizes(), ", got ", grad_rows.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  C10_CUDA_CHECK(cuda::prepare_features_backward(grad_rows.data_ptr<float>(), x.data_ptr<float>(),
                                                 dx.data_ptr<float>(), x.size(0), x.size(1), x.size(2), center,
                                                 normalize, static_cast<float>(eps),
                                                 c10::cuda::getCurrentCUDAStream()));
  return dx;
}

// x (B, Nx, C), y (B, Ny, C) float32 rows on one device: the shape the contextual_loss kernels take.
cuda::ContextualShape contextual_shape(const at::Tensor& x, const at::Tensor& y) {
  check_tensor(x, "x", 3);
  check_tensor(y, "y", 3);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "contextual_loss (cuda): x must be float32, got ", x.scalar_type());
  check_same(y, x, "y");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(2) == x.size(2),
              "contextual_loss (cuda): expected x (B, Nx, C), y (B, Ny, C), got ", x.sizes(), " and ", y.sizes());
  return cuda::ContextualShape{x.size(0), x.size(1), y.size(1), checked_int(x.size(2), "C")};
}

// Per-row statistics: (B, Nx) contiguous, on x's device, of `dtype`.
void check_row_stat(const at::Tensor& v, const char* name, const cuda::ContextualShape& s, const at::Tensor& x,
                    at::ScalarType dtype) {
  check_tensor(v, name, 2);
  TORCH_CHECK(v.device() == x.device(), name, " must be on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == dtype, name, " must be ", dtype, ", got ", v.scalar_type());
  TORCH_CHECK(v.size(0) == s.batch && v.size(1) == s.nx, name, " must be (B, Nx) = (", s.batch, ", ", s.nx,
              "), got ", v.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contextual_loss_forward(const at::Tensor& x,
                                                                                   const at::Tensor& y,
                                                                                   double bandwidth, double dist_eps) {
  const cuda::ContextualShape s = contextual_shape(x, y);
  TORCH_CHECK(s.ny > 0, "contextual_loss (cuda): y has no rows");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor m = at::empty({s.batch, s.nx}, x.options());
  at::Tensor argmin = at::empty({s.batch, s.nx}, x.options().dtype(at::kLong));
  at::Tensor sum = at::empty({s.batch, s.nx}, x.options());
  at::Tensor dsum = at::empty({s.batch, s.nx}, x.options());
  C10_CUDA_CHECK(cuda::contextual_loss_forward(x.data_ptr<float>(), y.data_ptr<float>(), m.data_ptr<float>(),
                                               argmin.data_ptr<int64_t>(), sum.data_ptr<float>(),
                                               dsum.data_ptr<float>(), s, static_cast<float>(bandwidth),
                                               static_cast<float>(dist_eps), c10::cuda::getCurrentCUDAStream()));
  return {m, argmin, sum, dsum};
}

std::tuple<at::Tensor, at::Tensor> contextual_loss_backward(const at::Tensor& grad_s, const at::Tensor& x,
                                                            const at::Tensor& y, const at::Tensor& m,
                                                            const at::Tensor& argmin, const at::Tensor& sum,
                                                            const at::Tensor& dsum, double bandwidth,
                                                            double dist_eps, bool need_dx, bool need_dy) {
  const cuda::ContextualShape s = contextual_shape(x, y);
  check_row_stat(grad_s, "grad_s", s, x, at::kFloat);
  check_row_stat(m, "m", s, x, at::kFloat);
  check_row_stat(argmin, "argmin", s, x, at::kLong);
  check_row_stat(sum, "s", s, x, at::kFloat);
  check_row_stat(dsum, "t", s, x, at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());
  // Each requested gradient is written whole by its kernel, except where there is nothing to sum over.
  const bool empty = s.nx == 0 || s.ny == 0;
  auto alloc = [&](bool need, const at::Tensor& like) {
    return need ? (empty ? at::zeros_like(like) : at::empty_like(like)) : at::Tensor();
  };
  at::Tensor dx = alloc(need_dx, x);
  at::Tensor dy = alloc(need_dy, y);
  if (empty || (!need_dx && !need_dy)) return {dx, dy};
  C10_CUDA_CHECK(cuda::contextual_loss_backward(
      grad_s.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), m.data_ptr<float>(),
      argmin.data_ptr<int64_t>(), sum.data_ptr<float>(), dsum.data_ptr<float>(), float_ptr_or_null(dx),
      float_ptr_or_null(dy), s, static_cast<float>(bandwidth), static_cast<float>(dist_eps),
      c10::cuda::getCurrentCUDAStream()));
  return {dx, dy};
}

}  // namespace
}  // namespace bindings
}  // namespace cocos_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  namespace ck = cocos_kernels::bindings;
  m.def("correspondence_warp_forward", &ck::correspondence_warp_forward,
        "fused correspondence warp forward (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
        py::arg("key_mask") = py::none());
  m.def("correspondence_warp_backward", &ck::correspondence_warp_backward,
        "fused correspondence warp backward (dq, dk, dv)", py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("need_dq"), py::arg("need_dk"),
        py::arg("need_dv"), py::arg("key_mask") = py::none());
  m.def("prepare_features", &ck::prepare_features, "centred/normalised rows (B, N, C) of x (B, C, N), into rows",
        py::arg("x"), py::arg("rows"), py::arg("center"), py::arg("normalize"), py::arg("eps"));
  m.def("prepare_features_backward", &ck::prepare_features_backward, "gradient w.r.t. x of prepare_features",
        py::arg("grad_rows"), py::arg("x"), py::arg("center"), py::arg("normalize"), py::arg("eps"));
  m.def("contextual_loss_forward", &ck::contextual_loss_forward,
        "fused contextual loss forward: per-row (m, argmin, s, t) of float32 rows x (B, Nx, C), y (B, Ny, C)",
        py::arg("x"), py::arg("y"), py::arg("bandwidth"), py::arg("dist_eps"));
  m.def("contextual_loss_backward", &ck::contextual_loss_backward,
        "fused contextual loss backward: (dx, dy) w.r.t. the rows, None where not requested", py::arg("grad_s"),
        py::arg("x"), py::arg("y"), py::arg("m"), py::arg("argmin"), py::arg("s"), py::arg("t"),
        py::arg("bandwidth"), py::arg("dist_eps"), py::arg("need_dx"), py::arg("need_dy"));
}
