// Tile helpers shared by the CPU kernels: row-major GEMM on strided tiles (our AVX-512 kernel
// for float where the processor has it, else BLAS, or ATen's addmm where torch exports no BLAS)
// and a vectorisable float exp.
#pragma once
#include <ATen/ATen.h>

#include "avx512.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Fortran BLAS, which the torch CPU builds export (MKL or OpenBLAS). Weak, so that a torch
// without them still loads us and falls back to ATen's addmm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace cocos_kernels {

// The data of an optional tensor (undefined: not requested), or null.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
               const T* beta, T* c, const int* ldc) {
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// Row-major C[m x n] = alpha * op(A) op(B) + beta * C. Column-major BLAS sees row-major C as
// C^T = op(B)^T op(A)^T, so the operands swap.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if constexpr (avx512::kernels_for<T>) {
    if (have_avx512() && (beta == 0.0f || beta == 1.0f)) {
      avx512::gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta == 1.0f, c, ldc);
      return;
    }
  }
  if (have_blas<T>()) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    blas_gemm<T>(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(out, out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// Rows x (B, L, C) as the right operand of score tiles S = alpha * A X[b, j..j+n)^T. With the
// AVX-512 GEMM (float), x is transposed once so that every tile reads its columns in place:
// where every tile starts at a multiple of kNr rows (`aligned`), into contiguous panels of kNr
// rows (a panel stays in L1 and in few pages); otherwise (the k x k window taps start anywhere)
// to (B, C, ld) with ld / 16 odd, so that the rows of a panel fall in different L1 sets, and
// padding for a last panel's reads past L. Without that kernel each tile is a BLAS call.
template <typename T>
class TransposedRows {
 public:
  TransposedRows(const at::Tensor& x, bool aligned)
      : x_(x.data_ptr<T>()), L_(x.size(1)), C_(x.size(2)), aligned_(aligned) {
    if (!avx512::kernels_for<T> || !have_avx512()) return;
    const int64_t B = x.size(0), panels = (L_ + avx512::kNr - 1) / avx512::kNr;
    if (aligned_) {
      t_ = at::constant_pad_nd(x, {0, 0, 0, panels * avx512::kNr - L_})
               .view({B, panels, avx512::kNr, C_}).permute({0, 1, 3, 2}).contiguous();
      ld_ = panels * avx512::kNr;  // rows of a batch
    } else {
      ld_ = (panels + 1) * avx512::kNr + 16;
      t_ = at::zeros({B, C_, ld_}, x.options());
      t_.narrow(2, 0, L_).copy_(x.transpose(1, 2));
    }
  }

  // s (m x n, row stride n) = alpha * A X[b, j..j+n)^T (+ s where accumulate), A (m x C) row-major.
  void product(int64_t m, int64_t n, T alpha, const T* a, int64_t lda, int64_t b, int64_t j,
               bool accumulate, T* s) const {
    if constexpr (avx512::kernels_for<T>) {
      if (t_.defined()) {
        const float* base = t_.data_ptr<float>() + b * C_ * ld_;
        const avx512::Panels columns = aligned_ ? avx512::packed(base + j * C_, C_)
                                                : avx512::Panels{base + j, ld_, avx512::kNr};
        avx512::gemm_panels(m, n, C_, alpha, a, lda, 1, columns, accumulate, s, n);
        return;
      }
    }
    gemm<T>(false, true, m, n, C_, alpha, a, lda, x_ + (b * L_ + j) * C_, C_, accumulate ? T(1) : T(0), s, n);
  }

 private:
  const T* x_;
  int64_t L_, C_, ld_ = 0;
  bool aligned_;
  at::Tensor t_;
};

// exp(x) for float without libm calls, so the loop vectorises: Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, and the Cephes degree-6 polynomial (about 1 ulp). Returns 0
// below the normal range, which also covers -inf.
inline float exp_poly(float x) {
  const float lo = -87.33654f;
  const bool underflow = x < lo;
  x = std::min(std::max(x, lo), 88.37626f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return underflow ? 0.0f : p * two_n;
}

inline float exp_fast(float x) { return exp_poly(x); }
inline double exp_fast(double x) { return std::exp(x); }

}  // namespace cocos_kernels
