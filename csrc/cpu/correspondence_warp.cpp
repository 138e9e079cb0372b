// Fused correspondence warp on the CPU: out = softmax(scale * Q K^T) V, blockwise with an
// online softmax, never holding more than a BQ x BK tile of scores per thread.
//
// Layouts (all contiguous): q (B, Nq, D), k (B, Nk, D) -- normalised features, one row per
// position, so every tile product is one BLAS call on strided views; v (B, Cv, Nk) and
// out / grad_out (B, Cv, Nq) -- the caller's channel-first layout, read through BLAS
// transposes instead of copies.
#include "correspondence_warp.h"
#include "tile_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cocos_kernels {
namespace {

// 128 x 128 tiles: a Q/K block at C=256 is 128 KiB, the score tile 64 KiB -- L2-resident.
constexpr int64_t BQ = 128;
constexpr int64_t BK = 128;

// row[j] = exp(row[j] - shift), returns the row sum.
template <typename T>
inline T exp_shifted_sum(T* row, int64_t n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_fast(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
inline T row_max(const T* row, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// Up to this many value channels, plain loops beat a BLAS call per tile: BLAS handles
// matrices 3 columns wide poorly, and the value products are a few percent of the work.
constexpr int64_t kSmallCv = 16;

// acc (bq x Cv) += P (bq x bk) @ V^T, V the (Cv x bk) value slice with row stride ldv.
template <typename T>
void accumulate_pv(const T* p, int64_t bq, int64_t bk, const T* vb, int64_t ldv, int64_t Cv,
                   T* acc) {
  if (Cv > kSmallCv) {
    gemm<T>(false, true, bq, Cv, bk, T(1), p, bk, vb, ldv, T(1), acc, Cv);
    return;
  }
  for (int64_t r = 0; r < bq; ++r) {
    const T* pr = p + r * bk;
    for (int64_t c = 0; c < Cv; ++c) {
      const T* vc = vb + c * ldv;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < bk; ++j) sum += pr[j] * vc[j];
      acc[r * Cv + c] += sum;
    }
  }
}

// dp (bq x bk) = dO_i (bq x Cv) @ V (Cv x bk); dO_i is stored as (Cv x bq), row stride ldo.
template <typename T>
void grad_scores(const T* dob, int64_t ldo, const T* vb, int64_t ldv, int64_t bq, int64_t bk,
                 int64_t Cv, T* dp) {
  if (Cv > kSmallCv) {
    gemm<T>(true, false, bq, bk, Cv, T(1), dob, ldo, vb, ldv, T(0), dp, bk);
    return;
  }
  for (int64_t r = 0; r < bq; ++r) {
    T* row = dp + r * bk;
    std::fill(row, row + bk, T(0));
    for (int64_t c = 0; c < Cv; ++c) {
      const T a = dob[c * ldo + r];
      const T* vc = vb + c * ldv;
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) row[j] += a * vc[j];
    }
  }
}

// dv (Cv x bk, row stride ldv) += dO_i^T (Cv x bq, row stride ldo) @ P (bq x bk).
template <typename T>
void accumulate_dv(const T* dob, int64_t ldo, const T* p, int64_t bq, int64_t bk, int64_t Cv,
                   T* dv, int64_t ldv) {
  if (Cv > kSmallCv) {
    gemm<T>(false, false, Cv, bk, bq, T(1), dob, ldo, p, bk, T(1), dv, ldv);
    return;
  }
  for (int64_t c = 0; c < Cv; ++c) {
    T* dvc = dv + c * ldv;
    for (int64_t r = 0; r < bq; ++r) {
      const T a = dob[c * ldo + r];
      const T* pr = p + r * bk;
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) dvc[j] += a * pr[j];
    }
  }
}

// Scores of masked-out keys (key_mask[j] false) become -inf: they get softmax weight 0.
template <typename T>
void mask_keys(T* s, int64_t bq, int64_t bk, const bool* key_mask) {
  for (int64_t j = 0; j < bk; ++j) {
    if (key_mask[j]) continue;
    for (int64_t r = 0; r < bq; ++r) s[r * bk + j] = -std::numeric_limits<T>::infinity();
  }
}

template <typename T>
void forward_impl(const T* q, const T* k, const T* v, const bool* key_mask, T* out, T* lse,
                  int64_t B, int64_t Nq, int64_t Nk, int64_t D, int64_t Cv, T scale) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t nqb = (Nq + BQ - 1) / BQ;
  at::parallel_for(0, B * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(BQ * BK), acc(BQ * Cv), m(BQ), l(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nqb, i0 = (task % nqb) * BQ, bq = std::min(BQ, Nq - i0);
      const T* qb = q + (b * Nq + i0) * D;
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < Nk; j0 += BK) {
        const int64_t bk = std::min(BK, Nk - j0);
        gemm<T>(false, true, bq, bk, D, scale, qb, D, k + (b * Nk + j0) * D, D, T(0), s.data(), bk);
        if (key_mask) mask_keys(s.data(), bq, bk, key_mask + b * Nk + j0);
        for (int64_t r = 0; r < bq; ++r) {
          T* row = s.data() + r * bk;
          const T m_new = std::max(m[r], row_max(row, bk));
          // -inf while every key so far is masked: shift by 0 so the exps are 0, not NaN.
          const T shift = m_new == kNegInf ? T(0) : m_new;
          const T rescale = exp_fast(m[r] - shift);  // 0 on the first block (m = -inf)
          l[r] = l[r] * rescale + exp_shifted_sum(row, bk, shift);
          m[r] = m_new;
          if (rescale != T(1)) {
            T* a = acc.data() + r * Cv;
            for (int64_t c = 0; c < Cv; ++c) a[c] *= rescale;
          }
        }
        accumulate_pv(s.data(), bq, bk, v + b * Cv * Nk + j0, Nk, Cv, acc.data());
      }
      T* ob = out + b * Cv * Nq + i0;
      for (int64_t r = 0; r < bq; ++r) {
        // l == 0 only where every key is masked: the row warps to zeros (lse = -inf).
        const T inv_l = l[r] == T(0) ? T(0) : T(1) / l[r];
        for (int64_t c = 0; c < Cv; ++c) ob[c * Nq + r] = acc[r * Cv + c] * inv_l;
        lse[b * Nq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

// One pass over key blocks (each thread owns its key blocks' dK and dV rows); thread t
// accumulates dQ into dq_buffers[t] (thread 0's is dQ itself), summed afterwards in thread
// order: deterministic for a given thread count without atomics, and each score tile is
// recomputed once, not twice as with separate dQ and dK/dV passes.
template <typename T>
void backward_impl(const T* q, const T* k, const T* v, const bool* key_mask, const T* dout, const T* lse,
                   const T* delta, T* const* dq_buffers, T* dk, T* dv, int64_t B, int64_t Nq,
                   int64_t Nk, int64_t D, int64_t Cv, T scale) {
  const int64_t nkb = (Nk + BK - 1) / BK;
  at::parallel_for(0, B * nkb, 1, [&](int64_t begin, int64_t end) {
    T* dq = dq_buffers ? dq_buffers[at::get_thread_num()] : nullptr;
    std::vector<T> p(BQ * BK), ds(BQ * BK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nkb, j0 = (task % nkb) * BK, bk = std::min(BK, Nk - j0);
      const T* kb = k + (b * Nk + j0) * D;
      const T* vb = v + b * Cv * Nk + j0;
      for (int64_t i0 = 0; i0 < Nq; i0 += BQ) {
        const int64_t bq = std::min(BQ, Nq - i0);
        const T* qb = q + (b * Nq + i0) * D;
        const T* dob = dout + b * Cv * Nq + i0;  // (Cv x bq), ld Nq
        gemm<T>(false, true, bq, bk, D, scale, qb, D, kb, D, T(0), p.data(), bk);
        if (key_mask) mask_keys(p.data(), bq, bk, key_mask + b * Nk + j0);
        for (int64_t r = 0; r < bq; ++r) {
          T* row = p.data() + r * bk;
          const T shift = lse[b * Nq + i0 + r];
          if (shift == -std::numeric_limits<T>::infinity()) {  // every key masked: P row is 0
            std::fill(row, row + bk, T(0));
            continue;
          }
#pragma omp simd
          for (int64_t j = 0; j < bk; ++j) row[j] = exp_fast(std::min(row[j] - shift, T(0)));
        }
        if (dv) accumulate_dv(dob, Nq, p.data(), bq, bk, Cv, dv + b * Cv * Nk + j0, Nk);
        if (!dq && !dk) continue;
        // dS = P * (dP - rowsum(dO * O)), dP = dO_i V_j.
        grad_scores(dob, Nq, vb, Nk, bq, bk, Cv, ds.data());
        for (int64_t r = 0; r < bq; ++r) {
          const T d = delta[b * Nq + i0 + r];
          T* dsr = ds.data() + r * bk;
          const T* pr = p.data() + r * bk;
#pragma omp simd
          for (int64_t j = 0; j < bk; ++j) dsr[j] = pr[j] * (dsr[j] - d);
        }
        if (dk) {  // dK_j (bk x D) += scale * dS^T @ Q_i
          gemm<T>(true, false, bk, D, bq, scale, ds.data(), bk, qb, D, T(1),
                  dk + (b * Nk + j0) * D, D);
        }
        if (dq) {  // dQ_i (bq x D) += scale * dS @ K_j
          gemm<T>(false, false, bq, D, bk, scale, ds.data(), bk, kb, D, T(1),
                  dq + (b * Nq + i0) * D, D);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "correspondence_warp (cpu): tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "correspondence_warp (cpu): expected q (B,Nq,D), k (B,Nk,D), v (B,Cv,Nk)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(0) == v.size(0) && q.size(2) == k.size(2) &&
                  v.size(2) == k.size(1),
              "correspondence_warp (cpu): inconsistent shapes q ", q.sizes(), " k ", k.sizes(),
              " v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "correspondence_warp (cpu): q, k, v must all be float32 or all float64");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "correspondence_warp (cpu): inputs must be contiguous");
}

// key_mask: undefined, or (B, Nk) bool, contiguous, on the CPU.
const bool* key_mask_ptr(const at::Tensor& key_mask, const at::Tensor& k) {
  if (!key_mask.defined()) return nullptr;
  TORCH_CHECK(key_mask.scalar_type() == at::kBool && key_mask.dim() == 2 &&
                  key_mask.size(0) == k.size(0) && key_mask.size(1) == k.size(1) &&
                  key_mask.is_contiguous() && key_mask.device().is_cpu(),
              "correspondence_warp (cpu): key_mask must be a contiguous (B, Nk) bool CPU tensor, got ",
              key_mask.sizes(), " ", key_mask.scalar_type());
  return key_mask.data_ptr<bool>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> correspondence_warp_forward(const at::Tensor& q,
                                                               const at::Tensor& k,
                                                               const at::Tensor& v, double scale,
                                                               const c10::optional<at::Tensor>& key_mask) {
  check_inputs(q, k, v);
  const bool* mask = key_mask_ptr(key_mask.value_or(at::Tensor()), k);
  const int64_t B = q.size(0), Nq = q.size(1), D = q.size(2), Nk = k.size(1), Cv = v.size(1);
  at::Tensor out = at::empty({B, Cv, Nq}, v.options());
  at::Tensor lse = at::empty({B, Nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "correspondence_warp_forward", [&] {
    forward_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                           v.data_ptr<scalar_t>(), mask, out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>(), B, Nq, Nk, D, Cv,
                           static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> correspondence_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool need_dq, bool need_dk,
    bool need_dv, const c10::optional<at::Tensor>& key_mask) {
  check_inputs(q, k, v);
  const bool* mask = key_mask_ptr(key_mask.value_or(at::Tensor()), k);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(1) == v.size(1) &&
                  out.size(2) == q.size(1) && grad_out.is_contiguous() && out.is_contiguous() &&
                  lse.is_contiguous() && grad_out.scalar_type() == q.scalar_type(),
              "correspondence_warp (cpu): bad grad_out/out/lse");
  const int64_t B = q.size(0), Nq = q.size(1), D = q.size(2), Nk = k.size(1), Cv = v.size(1);
  const at::Tensor delta = (grad_out * out).sum(1);  // (B, Nq): rowsum(dO * O)
  const int64_t threads = at::get_num_threads();
  at::Tensor dq = need_dq ? at::zeros_like(q) : at::Tensor();
  at::Tensor dq_extra = need_dq && threads > 1 ? at::zeros({threads - 1, B, Nq, D}, q.options())
                                               : at::Tensor();
  at::Tensor dk = need_dk ? at::zeros_like(k) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros_like(v) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "correspondence_warp_backward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    std::vector<scalar_t*> dq_buffers;
    if (need_dq) {
      dq_buffers.push_back(ptr(dq));
      for (int64_t t = 1; t < threads; ++t) dq_buffers.push_back(ptr(dq_extra) + (t - 1) * B * Nq * D);
    }
    backward_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), mask, grad_out.data_ptr<scalar_t>(),
                            lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                            need_dq ? dq_buffers.data() : nullptr, ptr(dk), ptr(dv), B, Nq, Nk, D,
                            Cv, static_cast<scalar_t>(scale));
  });
  for (int64_t t = 1; t < threads && need_dq; ++t) dq.add_(dq_extra[t - 1]);
  return {dq, dk, dv};
}

}  // namespace cocos_kernels
