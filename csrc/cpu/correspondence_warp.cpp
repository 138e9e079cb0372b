// Fused correspondence warp on the CPU: out = softmax(scale * Q K^T) V, blockwise with an
// online softmax, never holding more than a BQ x BK tile of scores per thread.
//
// Layouts (all contiguous): q (B, Nq, D), k (B, Nk, D) -- normalised features, one row per
// position, so every tile product is one GEMM (tile_math.h) on strided views; v (B, Cv, Nk) and
// out / grad_out (B, Cv, Nq) -- the caller's channel-first layout, read through GEMM
// transposes instead of copies.
#include "correspondence_warp.h"
#include "tile_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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
  if constexpr (avx512::kernels_for<T>) {
    if (have_avx512()) return avx512::exp_shifted_sum(row, n, shift);
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_fast(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  return sum;
}

// row[j] = exp(min(row[j] - shift, 0)): a probability from the row's logsumexp, never above 1.
template <typename T>
inline void exp_shifted_capped(T* row, int64_t n, T shift) {
  if constexpr (avx512::kernels_for<T>) {
    if (have_avx512()) return avx512::exp_shifted_capped(row, n, shift);
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = exp_fast(std::min(row[j] - shift, T(0)));
}

template <typename T>
inline T row_max(const T* row, int64_t n) {
  if constexpr (avx512::kernels_for<T>) {
    if (have_avx512()) return avx512::row_max(row, n);
  }
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

// The online softmax and the value products over score tiles that `score_tile(b, i0, bq, j0,
// bk, s)` writes (RowTiles or WindowTiles) (scaled logits, bq x bk, row-major): shared by the prepared-row scores and the
// k x k window scores.
template <typename T, typename ScoreTile>
void forward_impl(const ScoreTile& score_tile, const T* v, const bool* key_mask, T* out, T* lse,
                  int64_t B, int64_t Nq, int64_t Nk, int64_t Cv) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t nqb = (Nq + BQ - 1) / BQ;
  // Tasks are independent and each is computed the same way on any thread: threads take the
  // next one as they finish, balanced where the count does not divide or a thread is slowed.
  const int64_t tasks = B * nqb;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<T> s(BQ * BK), acc(BQ * Cv), m(BQ), l(BQ);
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t b = task / nqb, i0 = (task % nqb) * BQ, bq = std::min(BQ, Nq - i0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < Nk; j0 += BK) {
        const int64_t bk = std::min(BK, Nk - j0);
        score_tile(b, i0, bq, j0, bk, s.data());
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

// One pass over key blocks, each score tile recomputed once (not twice as with separate dQ and
// dK/dV passes); a thread owns its key blocks' dV columns. For each tile it hands
// `grad_tile(thread, b, i0, bq, j0, bk, ds, logits)` dS = P * (dP - rowsum(dO * O)) and, with
// keep_logits, the scaled logits before the exp; the feature gradients are grad_tile's, kept
// per thread where tiles of several threads meet and summed in thread order afterwards:
// deterministic for a given thread count, without atomics.
template <typename T, typename ScoreTile, typename GradTile>
void backward_impl(const ScoreTile& score_tile, const GradTile& grad_tile, bool need_features,
                   bool keep_logits, const T* v, const bool* key_mask, const T* dout, const T* lse,
                   const T* delta, T* dv, int64_t B, int64_t Nq, int64_t Nk, int64_t Cv) {
  const int64_t nkb = (Nk + BK - 1) / BK;
  at::parallel_for(0, B * nkb, 1, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    std::vector<T> p(BQ * BK), ds(BQ * BK), logits(keep_logits ? BQ * BK : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nkb, j0 = (task % nkb) * BK, bk = std::min(BK, Nk - j0);
      const T* vb = v + b * Cv * Nk + j0;
      for (int64_t i0 = 0; i0 < Nq; i0 += BQ) {
        const int64_t bq = std::min(BQ, Nq - i0);
        const T* dob = dout + b * Cv * Nq + i0;  // (Cv x bq), ld Nq
        score_tile(b, i0, bq, j0, bk, p.data());
        // Copied before masking: a masked key's dS is 0, and 0 * -inf would be NaN.
        if (keep_logits) std::copy(p.begin(), p.begin() + bq * bk, logits.begin());
        if (key_mask) mask_keys(p.data(), bq, bk, key_mask + b * Nk + j0);
        for (int64_t r = 0; r < bq; ++r) {
          T* row = p.data() + r * bk;
          const T shift = lse[b * Nq + i0 + r];
          if (shift == -std::numeric_limits<T>::infinity()) {  // every key masked: P row is 0
            std::fill(row, row + bk, T(0));
            continue;
          }
          exp_shifted_capped(row, bk, shift);
        }
        if (dv) accumulate_dv(dob, Nq, p.data(), bq, bk, Cv, dv + b * Cv * Nk + j0, Nk);
        if (!need_features) continue;
        // dS = P * (dP - rowsum(dO * O)), dP = dO_i V_j.
        grad_scores(dob, Nq, vb, Nk, bq, bk, Cv, ds.data());
        for (int64_t r = 0; r < bq; ++r) {
          const T d = delta[b * Nq + i0 + r];
          T* dsr = ds.data() + r * bk;
          const T* pr = p.data() + r * bk;
#pragma omp simd
          for (int64_t j = 0; j < bk; ++j) dsr[j] = pr[j] * (dsr[j] - d);
        }
        grad_tile(thread, b, i0, bq, j0, bk, ds.data(), keep_logits ? logits.data() : nullptr);
      }
    }
  });
}

// --- k x k window scores without the unfold -----------------------------------------------
// Each centre's feature is its k x k window of C-channel rows on a padded grid (row-major, row
// width W, so tap (dy, dx) is a fixed row offset dy * W + dx), centred by its mean m and scaled
// by a = 1 / (|window - m| + eps) (both per centre, computed by the caller):
//   s(u, v) = (sum_taps <x(u + t), y(v + t)> - D m_u m_v) a_u a_v,   D = k * k * C,
// k*k GEMMs of width C per tile instead of one of width D, and no D-wide copy of the features.
template <typename T>
struct Windows {
  const T* x;  // (B, L, C) padded grid rows
  const T* m;  // (B, N) per centre
  const T* a;  // (B, N)
  int64_t L, N, lo;  // centre i sits at row lo + i
  int64_t C;
  std::vector<int64_t> taps;  // row offset of each tap
  // Row of tap t of centre i (batch b): a BLAS operand of consecutive centres is a row range.
  const T* rows(int64_t b, int64_t i, size_t t) const { return x + (b * L + lo + i + taps[t]) * C; }
};

template <typename T>
Windows<T> windows(const at::Tensor& x, const at::Tensor& m, const at::Tensor& a, int64_t patch,
                   int64_t width) {
  const int64_t r = patch / 2;
  Windows<T> w{x.data_ptr<T>(), m.data_ptr<T>(), a.data_ptr<T>(), x.size(1), m.size(1), r * width + r, x.size(2), {}};
  for (int64_t dy = -r; dy <= r; ++dy)
    for (int64_t dx = -r; dx <= r; ++dx) w.taps.push_back(dy * width + dx);
  TORCH_CHECK(w.lo + w.N + r * width + r <= w.L,
              "correspondence_warp (cpu): the padded grid is too short for its centres");
  return w;
}

// Score tiles of prepared rows: s = scale * Q_i K_j^T, one GEMM of width D.
template <typename T>
struct RowTiles {
  const T* q;
  TransposedRows<T> k;
  int64_t Nq, D;
  T scale;
  void operator()(int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk, T* s) const {
    k.product(bq, bk, scale, q + (b * Nq + i0) * D, D, b, j0, false, s);
  }
};

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
    const RowTiles<scalar_t> tiles{q.data_ptr<scalar_t>(), TransposedRows<scalar_t>(k, true), Nq, D,
                                   static_cast<scalar_t>(scale)};
    forward_impl<scalar_t>(tiles, v.data_ptr<scalar_t>(), mask, out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>(), B, Nq, Nk, Cv);
  });
  return {out, lse};
}

namespace {

// (B, Nq) rowsum(dO * O), and the backward's shared checks.
at::Tensor delta_of(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                    int64_t Cv, int64_t Nq, at::ScalarType dtype) {
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(1) == Cv && out.size(2) == Nq &&
                  grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous() &&
                  grad_out.scalar_type() == dtype && out.scalar_type() == dtype,
              "correspondence_warp (cpu): bad grad_out/out/lse");
  return (grad_out * out).sum(1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> correspondence_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool need_dq, bool need_dk,
    bool need_dv, const c10::optional<at::Tensor>& key_mask) {
  check_inputs(q, k, v);
  const bool* mask = key_mask_ptr(key_mask.value_or(at::Tensor()), k);
  const int64_t B = q.size(0), Nq = q.size(1), D = q.size(2), Nk = k.size(1), Cv = v.size(1);
  const at::Tensor delta = delta_of(grad_out, out, lse, Cv, Nq, q.scalar_type());
  const int64_t threads = at::get_num_threads();
  // dQ rows are written by every thread: thread 0 into dq itself, the others into their own
  // buffers, summed afterwards. dK rows belong to the thread that owns the key block.
  at::Tensor dq = need_dq ? at::zeros_like(q) : at::Tensor();
  at::Tensor dq_extra = need_dq && threads > 1 ? at::zeros({threads - 1, B, Nq, D}, q.options())
                                               : at::Tensor();
  at::Tensor dk = need_dk ? at::zeros_like(k) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros_like(v) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "correspondence_warp_backward", [&] {
    using T = scalar_t;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
    T *dkp = data_or_null<T>(dk), *dqp = data_or_null<T>(dq), *dq_extra_p = data_or_null<T>(dq_extra);
    const auto sc = static_cast<T>(scale);
    const RowTiles<T> tiles{qp, TransposedRows<T>(k, true), Nq, D, sc};
    auto grad_tile = [&](int thread, int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                         const T* ds, const T*) {
      const T* qb = qp + (b * Nq + i0) * D;
      if (dkp) gemm<T>(true, false, bk, D, bq, sc, ds, bk, qb, D, T(1), dkp + (b * Nk + j0) * D, D);
      if (dqp) {
        T* dq_rows = thread == 0 ? dqp : dq_extra_p + (thread - 1) * B * Nq * D;
        gemm<T>(false, false, bq, D, bk, sc, ds, bk, kp + (b * Nk + j0) * D, D, T(1),
                dq_rows + (b * Nq + i0) * D, D);
      }
    };
    backward_impl<T>(tiles, grad_tile, need_dq || need_dk, false, v.data_ptr<T>(), mask,
                     grad_out.data_ptr<T>(), lse.data_ptr<T>(), delta.data_ptr<T>(),
                     data_or_null<T>(dv), B, Nq, Nk, Cv);
  });
  for (int64_t t = 1; t < threads && need_dq; ++t) dq.add_(dq_extra[t - 1]);
  return {dq, dk, dv};
}

namespace {

void check_windows(const at::Tensor& x, const at::Tensor& m, const at::Tensor& a, const char* name) {
  TORCH_CHECK(x.dim() == 3 && m.dim() == 2 && a.sizes() == m.sizes() && x.size(0) == m.size(0) &&
                  x.is_contiguous() && m.is_contiguous() && a.is_contiguous() && x.device().is_cpu() &&
                  m.scalar_type() == x.scalar_type() && a.scalar_type() == x.scalar_type(),
              "correspondence_warp (cpu): bad ", name, " windows: rows ", x.sizes(), ", means ",
              m.sizes(), ", scales ", a.sizes());
}

template <typename T>
struct WindowTiles {
  Windows<T> q, k;
  TransposedRows<T> k_rows;  // of k.x
  T D, scale;
  // s = scale * (sum_taps Xq_i Xk_j^T - D m_i m_j) a_i a_j
  void operator()(int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk, T* s) const {
    for (size_t t = 0; t < q.taps.size(); ++t) {
      k_rows.product(bq, bk, T(1), q.rows(b, i0, t), q.C, b, k.lo + j0 + k.taps[t], t > 0, s);
    }
    const T *mq = q.m + b * q.N + i0, *aq = q.a + b * q.N + i0;
    const T *mk = k.m + b * k.N + j0, *ak = k.a + b * k.N + j0;
    for (int64_t r = 0; r < bq; ++r) {
      T* row = s + r * bk;
      const T dm = D * mq[r], sa = scale * aq[r];
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) row[j] = (row[j] - dm * mk[j]) * sa * ak[j];
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> correspondence_warp_windows_forward(
    const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq, const at::Tensor& xk,
    const at::Tensor& mk, const at::Tensor& ak, const at::Tensor& v, int64_t patch, int64_t width_q,
    int64_t width_k, double scale, const c10::optional<at::Tensor>& key_mask) {
  check_windows(xq, mq, aq, "query");
  check_windows(xk, mk, ak, "key");
  const int64_t B = xq.size(0), Nq = mq.size(1), Nk = mk.size(1), Cv = v.size(1);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == B && v.size(2) == Nk && v.is_contiguous() &&
                  v.scalar_type() == xq.scalar_type() && xk.scalar_type() == xq.scalar_type() &&
                  xk.size(2) == xq.size(2) && (xq.scalar_type() == at::kFloat || xq.scalar_type() == at::kDouble),
              "correspondence_warp (cpu): bad windows value ", v.sizes());
  const bool* mask = key_mask_ptr(key_mask.value_or(at::Tensor()), mk.unsqueeze(2));
  at::Tensor out = at::empty({B, Cv, Nq}, v.options());
  at::Tensor lse = at::empty({B, Nq}, xq.options());
  AT_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "correspondence_warp_windows_forward", [&] {
    using T = scalar_t;
    const WindowTiles<T> tiles{windows<T>(xq, mq, aq, patch, width_q), windows<T>(xk, mk, ak, patch, width_k),
                               TransposedRows<T>(xk, false), static_cast<T>(patch * patch * xq.size(2)),
                               static_cast<T>(scale)};
    forward_impl<T>(tiles, v.data_ptr<T>(), mask, out.data_ptr<T>(), lse.data_ptr<T>(), B, Nq, Nk, Cv);
  });
  return {out, lse};
}

std::vector<at::Tensor> correspondence_warp_windows_backward(
    const at::Tensor& grad_out, const at::Tensor& xq, const at::Tensor& mq, const at::Tensor& aq,
    const at::Tensor& xk, const at::Tensor& mk, const at::Tensor& ak, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t patch, int64_t width_q, int64_t width_k,
    double scale, bool need_dq, bool need_dk, bool need_dv, const c10::optional<at::Tensor>& key_mask) {
  check_windows(xq, mq, aq, "query");
  check_windows(xk, mk, ak, "key");
  const int64_t B = xq.size(0), Nq = mq.size(1), Nk = mk.size(1), Cv = v.size(1), C = xq.size(2);
  const bool* mask = key_mask_ptr(key_mask.value_or(at::Tensor()), mk.unsqueeze(2));
  const at::Tensor delta = delta_of(grad_out, out, lse, Cv, Nq, xq.scalar_type());
  const int64_t threads = at::get_num_threads();
  // Shifted taps of one tile reach rows of neighbouring tiles: every feature gradient is kept
  // per thread ([thread] + shape) and summed in thread order at the end.
  auto per_thread = [&](bool need, at::IntArrayRef shape) {
    std::vector<int64_t> full{threads};
    full.insert(full.end(), shape.begin(), shape.end());
    return need ? at::zeros(full, xq.options()) : at::Tensor();
  };
  at::Tensor dxq = per_thread(need_dq, xq.sizes()), dxk = per_thread(need_dk, xk.sizes());
  // Per centre: sum_j H_ij m_j and sum_j dS_ij * logit_ij (and the same over i for keys), the
  // gradients that reach the means and the norms (see ops/correspondence_warp.py).
  at::Tensor rows = per_thread(need_dq, {2, B, Nq}), cols = per_thread(need_dk, {2, B, Nk});
  at::Tensor dv = need_dv ? at::zeros_like(v) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "correspondence_warp_windows_backward", [&] {
    using T = scalar_t;
    const WindowTiles<T> tiles{windows<T>(xq, mq, aq, patch, width_q), windows<T>(xk, mk, ak, patch, width_k),
                               TransposedRows<T>(xk, false), static_cast<T>(patch * patch * C),
                               static_cast<T>(scale)};
    T *dxq_p = data_or_null<T>(dxq), *dxk_p = data_or_null<T>(dxk);
    T *rows_p = data_or_null<T>(rows), *cols_p = data_or_null<T>(cols);
    const int64_t Lq = xq.size(1), Lk = xk.size(1);
    std::vector<std::vector<T>> h_tiles(threads, std::vector<T>(BQ * BK));
    auto grad_tile = [&](int thread, int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                         const T* ds, const T* logits) {
      // dL/dscore = scale * dS; H = its part through the raw window products.
      T* h = h_tiles[thread].data();
      const T *mq_b = tiles.q.m + b * Nq + i0, *aq_b = tiles.q.a + b * Nq + i0;
      const T *mk_b = tiles.k.m + b * Nk + j0, *ak_b = tiles.k.a + b * Nk + j0;
      T* row_m = rows_p ? rows_p + ((thread * 2 + 0) * B + b) * Nq + i0 : nullptr;
      T* row_s = rows_p ? rows_p + ((thread * 2 + 1) * B + b) * Nq + i0 : nullptr;
      T* col_m = cols_p ? cols_p + ((thread * 2 + 0) * B + b) * Nk + j0 : nullptr;
      T* col_s = cols_p ? cols_p + ((thread * 2 + 1) * B + b) * Nk + j0 : nullptr;
      for (int64_t r = 0; r < bq; ++r) {
        const T sa = scale * aq_b[r];
        T hm = 0, es = 0;
        for (int64_t j = 0; j < bk; ++j) {
          const T d = ds[r * bk + j];
          const T hv = d * sa * ak_b[j];
          h[r * bk + j] = hv;
          const T e = d * logits[r * bk + j];  // (scale dS) * score, the score being logit / scale
          hm += hv * mk_b[j];
          es += e;
          if (col_m) {
            col_m[j] += hv * mq_b[r];
            col_s[j] += e;
          }
        }
        if (row_m) {
          row_m[r] += hm;
          row_s[r] += es;
        }
      }
      for (size_t t = 0; t < tiles.q.taps.size(); ++t) {
        if (dxq_p) {
          T* dst = dxq_p + (thread * B * Lq) * C + (tiles.q.rows(b, i0, t) - tiles.q.x);
          gemm<T>(false, false, bq, C, bk, T(1), h, bk, tiles.k.rows(b, j0, t), C, T(1), dst, C);
        }
        if (dxk_p) {
          T* dst = dxk_p + (thread * B * Lk) * C + (tiles.k.rows(b, j0, t) - tiles.k.x);
          gemm<T>(true, false, bk, C, bq, T(1), h, bk, tiles.q.rows(b, i0, t), C, T(1), dst, C);
        }
      }
    };
    backward_impl<T>(tiles, grad_tile, need_dq || need_dk, need_dq || need_dk, v.data_ptr<T>(),
                     mask, grad_out.data_ptr<T>(), lse.data_ptr<T>(), delta.data_ptr<T>(),
                     data_or_null<T>(dv), B, Nq, Nk, Cv);
  });
  auto total = [](const at::Tensor& t) { return t.defined() ? t.sum(0) : at::Tensor(); };
  return {total(dxq), total(dxk), dv, total(rows), total(cols)};
}

}  // namespace cocos_kernels
