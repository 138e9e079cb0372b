// Float tile kernels for AVX-512 machines: a register-blocked GEMM and the softmax's row passes.
//
// The GEMM: the tiles here (128 x 128, K = C or D of a few hundred) are small enough that a
// BLAS call's own packing and dispatch dominate, and the torch build's MKL runs its AVX2 code
// on AMD processors: half of what the vector units do.
//
// C (m x n, row-major) = alpha * A B (+ C): A read in place with any strides (each of its
// elements is broadcast), B in panels of kNr columns whose rows are contiguous: packed (each
// panel k x kNr contiguous, zero-padded on the right, so that it stays in L1 while the
// micro-kernel sweeps the rows of A) or a row-major matrix read in place (`Panels`). Every
// output element sums its k products in order: deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// The kernels need x86-64 and GCC or clang (target attributes, __builtin_cpu_supports); other
// builds declare them only, for callers' branches that `kernels_for` discards.
#if defined(__x86_64__) && defined(__GNUC__)
#define COCOS_KERNELS_AVX512 1
#include <immintrin.h>
#define COCOS_KERNELS_AVX512_TARGET __attribute__((target("avx512f")))
#else
#define COCOS_KERNELS_AVX512 0
#endif

namespace cocos_kernels {

// Whether this processor runs the kernels (built, AVX-512F present, and not turned off with
// COCOS_KERNELS_CPU_AVX512=0: how the tests run the portable path on an AVX-512 machine).
inline bool have_avx512() {
#if COCOS_KERNELS_AVX512
  static const bool yes = [] {
    const char* wanted = std::getenv("COCOS_KERNELS_CPU_AVX512");
    return __builtin_cpu_supports("avx512f") && !(wanted != nullptr && std::strcmp(wanted, "0") == 0);
  }();
  return yes;
#else
  return false;
#endif
}

namespace avx512 {

// Whether this build has kernels for T.
template <typename T>
constexpr bool kernels_for = std::is_same_v<T, float> && COCOS_KERNELS_AVX512;

constexpr int64_t kMr = 8;   // rows of C per micro-kernel: 8 x 2 accumulators, 16 of 32 zmm
constexpr int64_t kNr = 32;  // columns of C per micro-kernel and per panel of B: two zmm

// Floats of a packed B with k rows and n columns.
inline int64_t packed_size(int64_t k, int64_t n) { return (n + kNr - 1) / kNr * kNr * k; }

// B with element (p, j) at data[p * ld + (j / kNr) * stride + j % kNr]; columns up to the next
// multiple of kNr must be readable (their values are unused).
struct Panels {
  const float* data;
  int64_t ld, stride;
};

// B packed by pack_panels, k rows.
inline Panels packed(const float* data, int64_t k) { return {data, kNr, kNr * k}; }

// A growable cache-line-aligned float buffer.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }
  float* get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      size_ = n;
      data_ = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// Packs B (k x n; element (p, j) at src[p * rs + j * cs]) into panels.
inline void pack_panels(const float* src, int64_t k, int64_t n, int64_t rs, int64_t cs, float* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += kNr) {
    const int64_t cols = std::min(kNr, n - j0);
    float* panel = dst + j0 * k;
    for (int64_t p = 0; p < k; ++p) {
      float* row = panel + p * kNr;
      const float* s = src + p * rs + j0 * cs;
      if (cs == 1) {
        std::copy(s, s + cols, row);
      } else {
        for (int64_t j = 0; j < cols; ++j) row[j] = s[j * cs];
      }
      std::fill(row + cols, row + kNr, 0.0f);
    }
  }
}

#if COCOS_KERNELS_AVX512

// C rows [0, R) x the panel's columns (the store masked to `cols`).
template <int R>
COCOS_KERNELS_AVX512_TARGET __attribute__((always_inline)) inline void micro_tile(
    int64_t k, float alpha, const float* a, int64_t rs_a, int64_t cs_a, const float* panel,
    int64_t ldb, bool accumulate, float* c, int64_t ldc, int64_t cols) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc0[r] = acc1[r] = _mm512_setzero_ps();
    // C may be far (a feature gradient row range of a large grid): fetched during the products.
    if (accumulate) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_loadu_ps(panel + p * ldb), b1 = _mm512_loadu_ps(panel + p * ldb + 16);
    const float* ap = a + p * cs_a;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(ap[r * rs_a]);
      acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1;
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    __m512 y0 = _mm512_mul_ps(acc0[r], va), y1 = _mm512_mul_ps(acc1[r], va);
    if (accumulate) {
      y0 = _mm512_add_ps(y0, _mm512_maskz_loadu_ps(m0, cr));
      y1 = _mm512_add_ps(y1, _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, y0);
    _mm512_mask_storeu_ps(cr + 16, m1, y1);
  }
}

// C (m x n, row stride ldc) = alpha * A B (+ C where accumulate); A (m x k) element (r, p) at
// a[r * rs_a + p * cs_a]; B (k x n) as `Panels`.
COCOS_KERNELS_AVX512_TARGET inline void gemm_panels(int64_t m, int64_t n, int64_t k, float alpha,
                                                    const float* a, int64_t rs_a, int64_t cs_a,
                                                    Panels b, bool accumulate, float* c,
                                                    int64_t ldc) {
  for (int64_t j0 = 0; j0 < n; j0 += kNr) {
    const float* panel = b.data + j0 / kNr * b.stride;
    const int64_t cols = std::min(kNr, n - j0);
    int64_t i0 = 0;
    for (; i0 + kMr <= m; i0 += kMr) {
      micro_tile<kMr>(k, alpha, a + i0 * rs_a, rs_a, cs_a, panel, b.ld, accumulate,
                      c + i0 * ldc + j0, ldc, cols);
    }
    const float* ai = a + i0 * rs_a;
    float* ci = c + i0 * ldc + j0;
    switch (m - i0) {
      case 7: micro_tile<7>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 6: micro_tile<6>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 5: micro_tile<5>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 4: micro_tile<4>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 3: micro_tile<3>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 2: micro_tile<2>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      case 1: micro_tile<1>(k, alpha, ai, rs_a, cs_a, panel, b.ld, accumulate, ci, ldc, cols); break;
      default: break;
    }
  }
}

// exp_poly (tile_math.h) on 16 lanes: the same range reduction and polynomial, 2^n by scalef.
COCOS_KERNELS_AVX512_TARGET __attribute__((always_inline)) inline __m512 exp_poly(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // false below it and for -inf
  // x second: min/max return their second operand where either is NaN, so NaN stays NaN.
  x = _mm512_min_ps(_mm512_set1_ps(88.37626f), _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// Lanes [j, n) of a row of n floats, at most 16.
inline __mmask16 tail(int64_t j, int64_t n) { return n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1; }

COCOS_KERNELS_AVX512_TARGET inline float row_max(const float* row, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  __m512 m = neg_inf;
  for (int64_t j = 0; j < n; j += 16) {
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(neg_inf, tail(j, n), row + j));
  }
  return _mm512_reduce_max_ps(m);
}

// row[j] = exp(row[j] - shift), returns the row sum.
COCOS_KERNELS_AVX512_TARGET inline float exp_shifted_sum(float* row, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = tail(j, n);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), s);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_poly(x));
    _mm512_mask_storeu_ps(row + j, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// row[j] = exp(min(row[j] - shift, 0)).
COCOS_KERNELS_AVX512_TARGET inline void exp_shifted_capped(float* row, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = tail(j, n);
    const __m512 x = _mm512_min_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), s), zero);
    _mm512_mask_storeu_ps(row + j, lanes, exp_poly(x));
  }
}

#else
void gemm_panels(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t rs_a, int64_t cs_a,
                 Panels b, bool accumulate, float* c, int64_t ldc);
float row_max(const float* row, int64_t n);
float exp_shifted_sum(float* row, int64_t n, float shift);
void exp_shifted_capped(float* row, int64_t n, float shift);
#endif

// Row-major C = alpha op(A) op(B) + beta C for beta 0 or 1. B is read in place where its rows
// are whole panels; otherwise op(B) is packed into a per-thread buffer on every call.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c,
                 int64_t ldc) {
  const int64_t rs_a = trans_a ? 1 : lda, cs_a = trans_a ? lda : 1;
  if (!trans_b && n % kNr == 0) {
    gemm_panels(m, n, k, alpha, a, rs_a, cs_a, Panels{b, ldb, kNr}, accumulate, c, ldc);
    return;
  }
  thread_local AlignedBuffer buffer;
  float* data = buffer.get(packed_size(k, n));
  pack_panels(b, k, n, trans_b ? 1 : ldb, trans_b ? ldb : 1, data);
  gemm_panels(m, n, k, alpha, a, rs_a, cs_a, packed(data, k), accumulate, c, ldc);
}

}  // namespace avx512
}  // namespace cocos_kernels
