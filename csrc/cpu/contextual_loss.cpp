// Fused contextual loss on the CPU (CoCosNet's ContextualLoss_forward), in O(N * C) memory.
//
// max_j A_ij is reached at the row's minimum distance m_i, where it equals 1 / s_i with
// s_i = sum_j exp((m_i - d_ij) / (h (m_i + dist_eps))). The scale depends on m_i, so a partial
// sum cannot be rescaled online as a softmax's can: the forward makes two passes over the
// column tiles, the first for m_i (and its argmin), the second for s_i.
//
// Layouts (all contiguous): x (B, Nx, C), y (B, Ny, C) -- one row per position, so every tile
// product is one GEMM (tile_math.h) on strided views.
#include "contextual_loss.h"
#include "tile_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cocos_kernels {
namespace {

constexpr int64_t BX = 128;  // rows of x per tile
constexpr int64_t BY = 128;  // rows of y per tile

// tile (bx x by) = d = 1 - X_i Y_j^T. The product is taken with alpha = -1 and 1 added after,
// so each d is rounded exactly as the reference's `1 - x @ y` rounds it.
template <typename T>
inline void distance_tile(const T* xb, const TransposedRows<T>& y, int64_t b, int64_t j0, int64_t bx,
                          int64_t by, int64_t C, T* tile) {
  y.product(bx, by, T(-1), xb, C, b, j0, false, tile);
  const int64_t n = bx * by;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) tile[k] = T(1) + tile[k];
}

template <typename T>
void forward_impl(const T* x, const TransposedRows<T>& y, T* m_out, int64_t* arg_out, T* s_out,
                  T* t_out, int64_t B, int64_t Nx, int64_t Ny, int64_t C, T h, T dist_eps) {
  const int64_t nxb = (Nx + BX - 1) / BX;
  at::parallel_for(0, B * nxb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(BX * BY), m(BX), s(BX), t(BX);
    std::vector<int64_t> arg(BX);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nxb, i0 = (task % nxb) * BX, bx = std::min(BX, Nx - i0);
      const T* xb = x + (b * Nx + i0) * C;
      std::fill(m.begin(), m.end(), std::numeric_limits<T>::infinity());
      std::fill(arg.begin(), arg.end(), int64_t(0));
      // Pass 1: the row minimum. Ties go to the lowest j: strict < across tiles, the first
      // equal entry within one.
      for (int64_t j0 = 0; j0 < Ny; j0 += BY) {
        const int64_t by = std::min(BY, Ny - j0);
        distance_tile(xb, y, b, j0, bx, by, C, tile.data());
        for (int64_t r = 0; r < bx; ++r) {
          const T* row = tile.data() + r * by;
          T mn = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : mn)
          for (int64_t j = 0; j < by; ++j) mn = std::min(mn, row[j]);
          if (mn < m[r]) {
            m[r] = mn;
            arg[r] = j0 + (std::find(row, row + by, mn) - row);
          }
        }
      }
      // Pass 2: the row sums with the row's own scale.
      std::fill(s.begin(), s.end(), T(0));
      std::fill(t.begin(), t.end(), T(0));
      for (int64_t j0 = 0; j0 < Ny; j0 += BY) {
        const int64_t by = std::min(BY, Ny - j0);
        distance_tile(xb, y, b, j0, bx, by, C, tile.data());
        for (int64_t r = 0; r < bx; ++r) {
          const T* row = tile.data() + r * by;
          const T mi = m[r], inv_c = T(1) / (h * (mi + dist_eps));
          T sum = 0, dsum = 0;
#pragma omp simd reduction(+ : sum, dsum)
          for (int64_t j = 0; j < by; ++j) {
            const T e = exp_fast(std::min((mi - row[j]) * inv_c, T(0)));
            sum += e;
            dsum += e * row[j];
          }
          s[r] += sum;
          t[r] += dsum;
        }
      }
      const int64_t o = b * Nx + i0;
      std::copy(m.begin(), m.begin() + bx, m_out + o);
      std::copy(arg.begin(), arg.begin() + bx, arg_out + o);
      std::copy(s.begin(), s.begin() + bx, s_out + o);
      std::copy(t.begin(), t.begin() + bx, t_out + o);
    }
  });
}

// The sum's gradient, dense: P_ij = g_i e_ij / c_i, dX_i += P Y_j, dY_j += P^T X_i. One pass
// over column blocks (each thread owns its blocks' dY rows); thread k accumulates dX into
// dx_buffers[k] (thread 0's is dX itself), summed afterwards in thread order: deterministic
// for a given thread count without atomics, and each tile is recomputed once.
template <typename T>
void backward_sum_impl(const T* x, const T* y, const TransposedRows<T>& y_rows, const T* m, const T* g,
                       T* const* dx_buffers, T* dy, int64_t B, int64_t Nx, int64_t Ny, int64_t C, T h,
                       T dist_eps) {
  const int64_t nyb = (Ny + BY - 1) / BY;
  at::parallel_for(0, B * nyb, 1, [&](int64_t begin, int64_t end) {
    T* dx = dx_buffers ? dx_buffers[at::get_thread_num()] : nullptr;
    std::vector<T> p(BX * BY);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nyb, j0 = (task % nyb) * BY, by = std::min(BY, Ny - j0);
      const T* yb = y + (b * Ny + j0) * C;
      for (int64_t i0 = 0; i0 < Nx; i0 += BX) {
        const int64_t bx = std::min(BX, Nx - i0);
        const T* xb = x + (b * Nx + i0) * C;
        distance_tile(xb, y_rows, b, j0, bx, by, C, p.data());
        for (int64_t r = 0; r < bx; ++r) {
          T* row = p.data() + r * by;
          const T mi = m[b * Nx + i0 + r], inv_c = T(1) / (h * (mi + dist_eps));
          const T coef = g[b * Nx + i0 + r] * inv_c;
#pragma omp simd
          for (int64_t j = 0; j < by; ++j) row[j] = coef * exp_fast(std::min((mi - row[j]) * inv_c, T(0)));
        }
        if (dy) gemm<T>(true, false, by, C, bx, T(1), p.data(), by, xb, C, T(1), dy + (b * Ny + j0) * C, C);
        if (dx) gemm<T>(false, false, bx, C, by, T(1), p.data(), by, yb, C, T(1), dx + (b * Nx + i0) * C, C);
      }
    }
  });
}

// The minimum's gradient, sparse: m_i = d_{i,a_i} moves every term of s_i,
// ds_i/dm_i = (t_i + dist_eps s_i) / (c_i (m_i + dist_eps)); it reaches x_i and y_{a_i} only.
template <typename T>
void backward_min_impl(const T* x, const T* y, const T* m, const int64_t* arg, const T* s,
                       const T* t, const T* g, T* dx, T* dy, int64_t B, int64_t Nx, int64_t Ny,
                       int64_t C, T h, T dist_eps) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {  // a batch's dY rows: one thread
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < Nx; ++i) {
        const int64_t o = b * Nx + i, a = arg[o];
        const T me = m[o] + dist_eps;
        const T q = g[o] * (t[o] + dist_eps * s[o]) / (h * me * me);
        const T* xi = x + o * C;
        const T* ya = y + (b * Ny + a) * C;
        if (dx) {
          T* dxi = dx + o * C;
#pragma omp simd
          for (int64_t k = 0; k < C; ++k) dxi[k] -= q * ya[k];
        }
        if (dy) {
          T* dya = dy + (b * Ny + a) * C;
#pragma omp simd
          for (int64_t k = 0; k < C; ++k) dya[k] -= q * xi[k];
        }
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "contextual_loss (cpu): tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2),
              "contextual_loss (cpu): expected x (B,Nx,C), y (B,Ny,C), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "contextual_loss (cpu): x and y must both be float32 or both float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "contextual_loss (cpu): inputs must be contiguous");
}

void check_row_stats(const at::Tensor& x, std::initializer_list<at::Tensor> stats) {
  for (const at::Tensor& v : stats) {
    TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(1) && v.is_contiguous() &&
                    v.device().is_cpu(),
                "contextual_loss (cpu): per-row statistics must be contiguous (B, Nx) CPU tensors");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contextual_loss_forward(
    const at::Tensor& x, const at::Tensor& y, double bandwidth, double dist_eps) {
  check_rows(x, y);
  TORCH_CHECK(y.size(1) > 0, "contextual_loss (cpu): y has no rows");
  const int64_t B = x.size(0), Nx = x.size(1), Ny = y.size(1), C = x.size(2);
  at::Tensor m = at::empty({B, Nx}, x.options());
  at::Tensor arg = at::empty({B, Nx}, x.options().dtype(at::kLong));
  at::Tensor s = at::empty({B, Nx}, x.options());
  at::Tensor t = at::empty({B, Nx}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contextual_loss_forward", [&] {
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), TransposedRows<scalar_t>(y, true),
                           m.data_ptr<scalar_t>(), arg.data_ptr<int64_t>(), s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                           B, Nx, Ny, C, static_cast<scalar_t>(bandwidth),
                           static_cast<scalar_t>(dist_eps));
  });
  return {m, arg, s, t};
}

std::tuple<at::Tensor, at::Tensor> contextual_loss_backward(
    const at::Tensor& grad_s, const at::Tensor& x, const at::Tensor& y, const at::Tensor& m,
    const at::Tensor& argmin, const at::Tensor& s, const at::Tensor& t, double bandwidth,
    double dist_eps, bool need_dx, bool need_dy) {
  check_rows(x, y);
  check_row_stats(x, {grad_s, m, argmin, s, t});
  TORCH_CHECK(grad_s.scalar_type() == x.scalar_type() && m.scalar_type() == x.scalar_type() &&
                  s.scalar_type() == x.scalar_type() && t.scalar_type() == x.scalar_type() &&
                  argmin.scalar_type() == at::kLong,
              "contextual_loss (cpu): grad_s, m, s, t must have x's dtype and argmin int64");
  const int64_t B = x.size(0), Nx = x.size(1), Ny = y.size(1), C = x.size(2);
  const int64_t threads = at::get_num_threads();
  at::Tensor dx = need_dx ? at::zeros_like(x) : at::Tensor();
  at::Tensor dx_extra = need_dx && threads > 1 ? at::zeros({threads - 1, B, Nx, C}, x.options()) : at::Tensor();
  at::Tensor dy = need_dy ? at::zeros_like(y) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contextual_loss_backward", [&] {
    auto ptr = [](const at::Tensor& v) { return v.defined() ? v.data_ptr<scalar_t>() : nullptr; };
    const auto h = static_cast<scalar_t>(bandwidth), de = static_cast<scalar_t>(dist_eps);
    std::vector<scalar_t*> dx_buffers;
    if (need_dx) {
      dx_buffers.push_back(ptr(dx));
      for (int64_t k = 1; k < threads; ++k) dx_buffers.push_back(ptr(dx_extra) + (k - 1) * B * Nx * C);
    }
    backward_sum_impl<scalar_t>(ptr(x), ptr(y), TransposedRows<scalar_t>(y, true), ptr(m), ptr(grad_s),
                                need_dx ? dx_buffers.data() : nullptr, ptr(dy), B, Nx, Ny, C, h, de);
    for (int64_t k = 1; k < threads && need_dx; ++k) dx.add_(dx_extra[k - 1]);
    backward_min_impl<scalar_t>(ptr(x), ptr(y), ptr(m), argmin.data_ptr<int64_t>(), ptr(s), ptr(t),
                                ptr(grad_s), ptr(dx), ptr(dy), B, Nx, Ny, C, h, de);
  });
  return {dx, dy};
}

}  // namespace cocos_kernels
