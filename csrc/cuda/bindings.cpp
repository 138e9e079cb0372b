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
#include <utility>

#include "contextual_loss.h"
#include "correspondence_warp.h"

namespace cocos_kernels {
namespace bindings {
namespace {

using cuda::Precision;
using cuda::WarpGeometry;
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

// precision= as the Triton backend spells it.
Precision parse_precision(const std::string& precision) {
  if (precision == "ieee") return Precision::kIeee;
  if (precision == "tf32x3") return Precision::kTf32x3;
  if (precision == "tf32") return Precision::kTf32;
  TORCH_CHECK(false, "precision must be one of ('ieee', 'tf32x3', 'tf32'), got '", precision, "'");
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

// The forward on checked arguments: out (B, Cv, Nq) in v's dtype, lse (B, Nq) float32.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const uint8_t* mask, const WarpShape& s, const WarpGeometry& g,
                                               double scale, Precision precision) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.batch, s.cv, s.nq}, v.options());
  at::Tensor lse = at::empty({s.batch, s.nq}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  COCOS_KERNELS_DISPATCH(q.scalar_type(), "correspondence_warp_forward", [&] {
    C10_CUDA_CHECK((cuda::correspondence_warp_forward(ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), mask,
                                                      mutable_ptr<scalar_t>(out), lse.data_ptr<float>(), s, g,
                                                      static_cast<float>(scale), precision, stream)));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> correspondence_warp_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, double scale,
                                                               const c10::optional<at::Tensor>& key_mask,
                                                               const std::string& precision) {
  const Precision p = parse_precision(precision);
  const WarpShape s = warp_shape(q, k, v);
  return run_forward(q, k, v, mask_pointer(key_mask, s, q), s, cuda::prepared_rows(s), scale, p);
}

// grad_out, out (B, Cv, Nq) in q's dtype and lse (B, Nq) float32, checked.
void check_saved(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, const WarpShape& s,
                 const at::Tensor& q) {
  check_tensor(grad_out, "grad_out", 3);
  check_tensor(out, "out", 3);
  check_tensor(lse, "lse", 2);
  check_same(grad_out, q, "grad_out");
  TORCH_CHECK(out.device() == q.device() && lse.device() == q.device(), "out and lse must be on ", q.device());
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == s.batch && out.size(1) == s.cv &&
                  out.size(2) == s.nq,
              "grad_out and out must be (B, Cv, Nq) = (", s.batch, ", ", s.cv, ", ", s.nq, "), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.size(0) == s.batch && lse.size(1) == s.nq,
              "lse must be float32 (B, Nq), got ", lse.scalar_type(), " ", lse.sizes());
}

// Gradients of one backward: dq, dk, dv (undefined where not requested) and, for windows, the
// per-centre sums that go with dq (sums_q) and dk (sums_k).
struct Grads {
  at::Tensor dq, dk, dv, sums_q, sums_k;
};

// The backward on checked arguments, into `g`'s tensors (allocated by the caller, each written
// whole by its kernel unless there is nothing to sum over: then they must come zeroed).
void run_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const uint8_t* mask, const WarpShape& s,
                  const WarpGeometry& geometry, double scale, Precision precision, Grads& g) {
  if (s.nq == 0 || s.nk == 0) return;
  const at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(1);  // (B, Nq)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  COCOS_KERNELS_DISPATCH(q.scalar_type(), "correspondence_warp_backward", [&] {
    C10_CUDA_CHECK((cuda::correspondence_warp_backward(
        ptr<scalar_t>(grad_out), ptr<scalar_t>(q), ptr<scalar_t>(k), ptr<scalar_t>(v), mask, lse.data_ptr<float>(),
        delta.data_ptr<float>(), float_ptr_or_null(g.dq), float_ptr_or_null(g.dk), float_ptr_or_null(g.dv),
        float_ptr_or_null(g.sums_q), float_ptr_or_null(g.sums_k), s, geometry, static_cast<float>(scale),
        precision, stream)));
  });
}

// Float32 outputs on q's device: empty, or zeros where nothing is summed into them.
auto allocator(const at::Tensor& q, const WarpShape& s) {
  const auto f32 = q.options().dtype(at::kFloat);
  const bool empty = s.nq == 0 || s.nk == 0;
  return [f32, empty](bool need, at::IntArrayRef shape) {
    return need ? (empty ? at::zeros(shape, f32) : at::empty(shape, f32)) : at::Tensor();
  };
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correspondence_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool need_dq, bool need_dk, bool need_dv,
    const c10::optional<at::Tensor>& key_mask, const std::string& precision) {
  const Precision p = parse_precision(precision);
  const WarpShape s = warp_shape(q, k, v);
  const uint8_t* mask = mask_pointer(key_mask, s, q);
  check_saved(grad_out, out, lse, s, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto alloc = allocator(q, s);
  Grads g{alloc(need_dq, {s.batch, s.nq, s.d}), alloc(need_dk, {s.batch, s.nk, s.d}),
          alloc(need_dv, {s.batch, s.cv, s.nk}), at::Tensor(), at::Tensor()};
  run_backward(grad_out, q, k, v, out, lse, mask, s, cuda::prepared_rows(s), scale, p, g);
  return {g.dq, g.dk, g.dv};
}

// k x k windows: xq (B, Lq, C), xk (B, Lk, C) padded grids of rows of width width_q / width_k;
// mq, aq (B, Nq) and mk, ak (B, Nk) float32 per-centre window means and score factors; v (B, Cv, Nk)
// on the key centres. The shape (d = C, Nq / Nk centres) and geometry the kernels take, checked:
// every tap of every centre must lie on its grid.
std::pair<WarpShape, WarpGeometry> window_shape(const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq,
                                                const at::Tensor& xk, const at::Tensor& mk, const at::Tensor& ak,
                                                const at::Tensor& v, int64_t patch, int64_t width_q,
                                                int64_t width_k) {
  check_tensor(xq, "xq", 3);
  check_tensor(xk, "xk", 3);
  check_tensor(v, "v", 3);
  check_same(xk, xq, "xk");
  check_same(v, xq, "v");
  const std::pair<const at::Tensor*, const char*> factors[] = {{&mq, "mq"}, {&aq, "aq"}, {&mk, "mk"}, {&ak, "ak"}};
  for (const auto& [f, name] : factors) {
    check_tensor(*f, name, 2);
    TORCH_CHECK(f->scalar_type() == at::kFloat, name, " must be float32, got ", f->scalar_type());
    TORCH_CHECK(f->device() == xq.device(), name, " must be on ", xq.device(), ", got ", f->device());
  }
  const int64_t B = xq.size(0), Nq = mq.size(1), Nk = mk.size(1);
  TORCH_CHECK(xk.size(0) == B && xk.size(2) == xq.size(2) && mq.size(0) == B && aq.sizes() == mq.sizes() &&
                  mk.size(0) == B && ak.sizes() == mk.sizes() && v.size(0) == B && v.size(2) == Nk,
              "expected xq (B, Lq, C), xk (B, Lk, C), mq and aq (B, Nq), mk and ak (B, Nk), v (B, Cv, Nk), got ",
              xq.sizes(), ", ", xk.sizes(), ", ", mq.sizes(), ", ", aq.sizes(), ", ", mk.sizes(), ", ", ak.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(patch >= 1 && patch % 2 == 1 && patch <= 255, "patch must be odd, in [1, 255], got ", patch);
  const int64_t r = patch / 2;
  for (const auto& [len, width, n, name] : {std::tuple{xq.size(1), width_q, Nq, "query"},
                                            std::tuple{xk.size(1), width_k, Nk, "key"}}) {
    TORCH_CHECK(width >= patch && n + 2 * (r * width + r) <= len, "the ", name, " windows (", n,
                " centres, row width ", width, ", patch ", patch, ") do not fit the grid of ", len, " rows");
  }
  const WarpShape s{B, Nq, Nk, checked_int(xq.size(2), "C"), checked_int(v.size(1), "Cv")};
  return {s, cuda::window_geometry(s, static_cast<int>(patch), xq.size(1), width_q, xk.size(1), width_k,
                                   mq.data_ptr<float>(), aq.data_ptr<float>(), mk.data_ptr<float>(),
                                   ak.data_ptr<float>())};
}

std::tuple<at::Tensor, at::Tensor> correspondence_warp_windows_forward(
    const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq, const at::Tensor& xk, const at::Tensor& mk,
    const at::Tensor& ak, const at::Tensor& v, int64_t patch, int64_t width_q, int64_t width_k, double scale,
    const c10::optional<at::Tensor>& key_mask, const std::string& precision) {
  const Precision p = parse_precision(precision);
  const auto [s, g] = window_shape(xq, mq, aq, xk, mk, ak, v, patch, width_q, width_k);
  return run_forward(xq, xk, v, mask_pointer(key_mask, s, xq), s, g, scale, p);
}

// Returns (planes_q (k*k, B, Nq, C), planes_k (k*k, B, Nk, C), dv (B, Cv, Nk), rows (2, B, Nq),
// cols (2, B, Nk)), float32, undefined where not requested (rows with planes_q, cols with planes_k).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> correspondence_warp_windows_backward(
    const at::Tensor& grad_out, const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq,
    const at::Tensor& xk, const at::Tensor& mk, const at::Tensor& ak, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t patch, int64_t width_q, int64_t width_k, double scale, bool need_dq,
    bool need_dk, bool need_dv, const c10::optional<at::Tensor>& key_mask, const std::string& precision) {
  const Precision p = parse_precision(precision);
  const auto [s, geometry] = window_shape(xq, mq, aq, xk, mk, ak, v, patch, width_q, width_k);
  const uint8_t* mask = mask_pointer(key_mask, s, xq);
  check_saved(grad_out, out, lse, s, xq);
  const c10::cuda::CUDAGuard guard(xq.device());
  const auto alloc = allocator(xq, s);
  const int64_t taps = patch * patch;
  Grads g{alloc(need_dq, {taps, s.batch, s.nq, s.d}), alloc(need_dk, {taps, s.batch, s.nk, s.d}),
          alloc(need_dv, {s.batch, s.cv, s.nk}), alloc(need_dq, {2, s.batch, s.nq}),
          alloc(need_dk, {2, s.batch, s.nk})};
  run_backward(grad_out, xq, xk, v, out, lse, mask, s, geometry, scale, p, g);
  return {g.dq, g.dk, g.dv, g.sums_q, g.sums_k};
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
        py::arg("key_mask") = py::none(), py::arg("precision") = "ieee");
  m.def("correspondence_warp_backward", &ck::correspondence_warp_backward,
        "fused correspondence warp backward (dq, dk, dv)", py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("need_dq"), py::arg("need_dk"),
        py::arg("need_dv"), py::arg("key_mask") = py::none(), py::arg("precision") = "ieee");
  m.def("correspondence_warp_windows_forward", &ck::correspondence_warp_windows_forward,
        "fused correspondence warp forward on k x k windows of padded grids of rows (out, lse)", py::arg("xq"),
        py::arg("mq"), py::arg("aq"), py::arg("xk"), py::arg("mk"), py::arg("ak"), py::arg("v"), py::arg("patch"),
        py::arg("width_q"), py::arg("width_k"), py::arg("scale"), py::arg("key_mask") = py::none(),
        py::arg("precision") = "ieee");
  m.def("correspondence_warp_windows_backward", &ck::correspondence_warp_windows_backward,
        "fused correspondence warp backward on k x k windows (planes_q, planes_k, dv, rows, cols)",
        py::arg("grad_out"), py::arg("xq"), py::arg("mq"), py::arg("aq"), py::arg("xk"), py::arg("mk"),
        py::arg("ak"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("patch"), py::arg("width_q"),
        py::arg("width_k"), py::arg("scale"), py::arg("need_dq"), py::arg("need_dk"), py::arg("need_dv"),
        py::arg("key_mask") = py::none(), py::arg("precision") = "ieee");
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
