// CUDA kernels of correspondence_warp: the same algorithm as the Triton kernels
// (cocos_kernels/triton/correspondence_warp.py), with simple shared-memory tiles, on prepared
// feature rows or on k x k windows without the unfold (WarpGeometry, correspondence_warp.h).
//
// Forward: one block per (query block of BM rows, value-channel chunk of BCV, batch element).
// It walks the key blocks: the BM x BN score tile is accumulated over D in chunks of BD (D
// reaches 2304 with unfolded 3x3 patches), an online softmax in base 2 keeps a running max per
// row (scores reach 1/temperature = 100: exp overflows float32 without it), and the value chunk
// is accumulated. Value channels beyond BCV go to further blocks, which recompute the same scores
// (bit-identical, so their row statistics agree); the first chunk's block writes the lse.
// float16/bfloat16 inputs, and float32 ones with precision tf32x3 or tf32, take the tensor-core
// kernels instead: on prepared rows those of correspondence_warp_mma.cuh, with their tiles in
// registers, where they fit (uses_mma_forward, uses_mma_backward); every other forward (windows,
// wider rows) forward_streamed_mma_kernel, every other backward with Cv <= 64 (16-bit: 192)
// backward_streamed_mma_kernel (correspondence_warp_streamed_mma.cuh). The forward here runs
// float32 with precision ieee; the backward here float32 with precision ieee and every input with
// Cv beyond those (float32 > 64, 16-bit > 192) the register-resident backward does not take,
// windows included.
//
// Windows (patch k > 1): score_tile sums the k*k taps' tile products, each tap's rows loaded from
// the tap-shifted row range in C-wide chunks (no D-wide copy), then applies the per-centre means
// and factors. The backward writes one float32 gradient plane per tap (only the block owning
// those centres writes it) and the per-centre sums for the means and norms (reduced in the
// block); the caller adds the planes at their taps' offsets (cocos_kernels/windows.py).
//
// Backward (FlashAttention-2): delta = rowsum(dOut * Out) (bindings.cpp), then a dQ kernel over
// query blocks and a dK/dV kernel over key blocks, each recomputing P = exp(S - lse) from the
// saved logsumexp; no atomics, deterministic. Their D-wide (and Cv-wide) accumulators live in
// the float32 output in global memory, chunk by chunk: only the block owning those rows reads
// and writes them, and its first pass overwrites instead of adding.
//
// Softmax statistics and accumulators are float32 for every input dtype; with float16/bfloat16
// features P and dS (H for windows) are rounded to that dtype for their tensor-core products,
// as in Triton.
#pragma once

#include "correspondence_warp.h"
#include "correspondence_warp_mma.cuh"
#include "correspondence_warp_streamed_mma.cuh"
#include "tile.cuh"
#include "warp_geometry.cuh"

namespace cocos_kernels {
namespace cuda {

constexpr int BM = 64;   // query rows per tile
constexpr int BN = 64;   // keys per tile
constexpr int BCV = 64;  // value channels per tile

template <class T>
struct Tiles {
  static constexpr int BD = sizeof(T) == 4 ? 32 : 64;  // feature columns per chunk
  static constexpr int LD_D = padded<T>(BD);            // T tiles with rows of D columns
  static constexpr int LD_M = padded<T>(BM);            // ... of query columns
  static constexpr int LD_N = padded<T>(BN);            // ... of key columns
  static constexpr int LDF_D = padded<float>(BD);       // float tiles
  static constexpr int LDF_N = padded<float>(BN);
  static constexpr int LDF_CV = padded<float>(BCV);
  // A float product operand can share storage with the float tile it is computed from.
  static constexpr bool kFloat = std::is_same<T, float>::value;
};

// s (BM x BN, float) = the scores of centres m0 .. m0+BM against n0 .. n0+BN; qc, kc are scratch.
// q, k point at centre 0's row. Prepared rows: q[m] . k[n] over all D columns. Windows: the sum
// over taps of the tap-shifted rows' products over C (rows past the centres load as zeros, and
// every tap of a centre lies on the grid), then (s - dwin m_i m_j) a_i a_j.
template <class T>
__device__ __forceinline__ void score_tile(float* s, T* qc, T* kc, const T* q, const T* k, int64_t nq,
                                           int64_t nk, int d, int64_t m0, int64_t n0, const WarpGeometry& g,
                                           const Factors& f) {
  using L = Tiles<T>;
  zero_tile<BM, BN>(s, L::LDF_N);
  __syncthreads();  // s is complete on return even when D = 0
  for (int t = 0; t < g.patch * g.patch; ++t) {
    const T* qt = q + tap_offset(g.patch, g.width_q, t) * d;
    const T* kt = k + tap_offset(g.patch, g.width_k, t) * d;
    for (int d0 = 0; d0 < d; d0 += L::BD) {
      load_tile<BM, L::BD>(qc, L::LD_D, qt, nq, d, m0, d0);
      load_tile<BN, L::BD>(kc, L::LD_D, kt, nk, d, n0, d0);
      __syncthreads();
      tile_mma<true, false, BM, BN, L::BD>(s, L::LDF_N, qc, L::LD_D, kc, L::LD_D);
      __syncthreads();
    }
  }
  if (f.mq != nullptr) {
#pragma unroll 1  // unrolled, it pushes the kernels past their 128 registers (spills)
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int i = e / BN, j = e % BN;
      const int64_t m = m0 + i, n = n0 + j;
      const float raw = s[i * L::LDF_N + j];
      s[i * L::LDF_N + j] = (raw - f.dwin * centre_factor(f.mq, nq, m) * centre_factor(f.mk, nk, n)) *
                            (centre_factor(f.aq, nq, m) * centre_factor(f.ak, nk, n));
    }
    __syncthreads();
  }
}

// Prepared rows: s = q[m0..] . k[n0..] over all D columns.
template <class T>
__device__ __forceinline__ void score_tile(float* s, T* qc, T* kc, const T* q, const T* k, int64_t nq,
                                           int64_t nk, int d, int64_t m0, int64_t n0) {
  const WarpGeometry rows{1, nq, nk, 0, 0, 0, 0, 0.0f, nullptr, nullptr, nullptr, nullptr};
  score_tile(s, qc, kc, q, k, nq, nk, d, m0, n0, rows, Factors(rows, 0, nq, nk));
}

// ----------------------------------------------------------------------------- forward

template <class T>
struct ForwardSmem {
  T *qc, *kc, *vt, *p;
  float *s, *o, *row_max, *row_sum, *row_alpha;
  __host__ __device__ static size_t carve(unsigned char* base, ForwardSmem* out) {
    using L = Tiles<T>;
    SmemCarver c{base};
    ForwardSmem m;
    m.qc = c.take<T>(BM * L::LD_D);
    m.kc = c.take<T>(BN * L::LD_D);
    m.vt = c.take<T>(BCV * L::LD_N);  // vt[c][n] = v[c0 + c][n0 + n]
    m.s = c.take<float>(BM * L::LDF_N);
    // float: P overwrites S in place (each element by the thread that read it).
    m.p = L::kFloat ? reinterpret_cast<T*>(m.s) : c.take<T>(BM * L::LD_N);
    m.o = c.take<float>(BM * L::LDF_CV);
    m.row_max = c.take<float>(BM);
    m.row_sum = c.take<float>(BM);
    m.row_alpha = c.take<float>(BM);
    if (out != nullptr) *out = m;
    return c.used;
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const uint8_t* __restrict__ key_mask, T* __restrict__ out, float* __restrict__ lse,
                   WarpShape shape, WarpGeometry geometry, float scale_log2, int64_t m_blocks, int64_t cv_chunks) {
  using L = Tiles<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  ForwardSmem<T> sm;
  ForwardSmem<T>::carve(smem, &sm);

  const int64_t block = blockIdx.x;
  const int64_t m0 = (block % m_blocks) * BM;
  const int64_t c0 = (block / m_blocks % cv_chunks) * BCV;
  const int64_t b = block / m_blocks / cv_chunks;
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  q += (b * geometry.len_q + geometry.lo_q) * d;
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  if (key_mask != nullptr) key_mask += b * nk;
  const Factors factors(geometry, b, nq, nk);

  zero_tile<BM, BCV>(sm.o, L::LDF_CV);
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    sm.row_max[i] = kNegInf;
    sm.row_sum[i] = 0.0f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t n0 = 0; n0 < nk; n0 += BN) {
    score_tile(sm.s, sm.qc, sm.kc, q, k, nq, nk, d, m0, n0, geometry, factors);
    load_tile<BCV, BN>(sm.vt, L::LD_N, v, cv, nk, c0, n0);
    // Online softmax, one warp per row, BN / 32 keys per lane.
    for (int i = warp; i < BM; i += kWarps) {
      float x[BN / 32];
      float tile_max = kNegInf;
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const int j = lane + 32 * t;
        x[t] = key_kept(key_mask, nk, n0 + j) ? sm.s[i * L::LDF_N + j] * scale_log2 : kNegInf;
        tile_max = fmaxf(tile_max, x[t]);
      }
      const float old_max = sm.row_max[i];
      const float new_max = fmaxf(old_max, warp_max(tile_max));
      // -inf while every key so far is masked out: shift by 0 so the exps are 0, not NaN.
      const float shift = new_max == kNegInf ? 0.0f : new_max;
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const float p = exp2f(x[t] - shift);
        sm.p[i * L::LD_N + lane + 32 * t] = from_float<T>(p);
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(old_max - shift);
        sm.row_alpha[i] = alpha;
        sm.row_sum[i] = sm.row_sum[i] * alpha + sum;
        sm.row_max[i] = new_max;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BCV; e += kThreads) sm.o[(e / BCV) * L::LDF_CV + e % BCV] *= sm.row_alpha[e / BCV];
    __syncthreads();
    // o[m][c] += sum_n p[m][n] vt[c][n]
    tile_mma<true, false, BM, BCV, BN>(sm.o, L::LDF_CV, sm.p, L::LD_N, sm.vt, L::LD_N);
    __syncthreads();
  }

  // out (Cv, Nq): consecutive threads write consecutive queries.
  out += b * cv * nq;
  for (int e = threadIdx.x; e < BM * BCV; e += kThreads) {
    const int i = e % BM, c = e / BM;
    const int64_t m = m0 + i, ch = c0 + c;
    if (m < nq && ch < cv) {
      const float l = sm.row_sum[i];  // 0: every key masked out, and o is 0 too
      out[ch * nq + m] = from_float<T>(sm.o[i * L::LDF_CV + c] / (l == 0.0f ? 1.0f : l));
    }
  }
  if (c0 == 0) {
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      if (m0 + i < nq) lse[b * nq + m0 + i] = (sm.row_max[i] + log2f(sm.row_sum[i])) * kLn2;
    }
  }
}

// ----------------------------------------------------------------------------- backward

template <class T>
struct BackwardDqSmem {
  T *qc, *kc, *dot, *vt, *ds;
  float *s, *dp, *acc, *row_lse2, *row_delta, *row_hm, *row_es;
  __host__ __device__ static size_t carve(unsigned char* base, BackwardDqSmem* out) {
    using L = Tiles<T>;
    SmemCarver c{base};
    BackwardDqSmem m;
    m.qc = c.take<T>(BM * L::LD_D);
    m.kc = c.take<T>(BN * L::LD_D);
    m.dot = c.take<T>(BCV * L::LD_M);  // dot[c][m] = grad_out[c0 + c][m0 + m]
    m.vt = c.take<T>(BCV * L::LD_N);   // vt[c][n] = v[c0 + c][n0 + n]
    m.s = c.take<float>(BM * L::LDF_N);
    m.dp = c.take<float>(BM * L::LDF_N);
    m.ds = L::kFloat ? reinterpret_cast<T*>(m.s) : c.take<T>(BM * L::LD_N);  // dS, or H for windows
    m.acc = c.take<float>(BM * L::LDF_D);  // a BM x BD chunk of dq
    m.row_lse2 = c.take<float>(BM);
    m.row_delta = c.take<float>(BM);
    m.row_hm = c.take<float>(BM);  // windows: sum_j H_ij m_j
    m.row_es = c.take<float>(BM);  // windows: sum_j dS_ij score_ij
    if (out != nullptr) *out = m;
    return c.used;
  }
};

// dp (BM x BN, float) = grad_out[:, m0..] ^T v[:, n0..] over all Cv channels, chunk by chunk.
template <class T>
__device__ __forceinline__ void dp_tile(float* dp, T* dot, T* vt, const T* grad_out, const T* v,
                                        int64_t nq, int64_t nk, int cv, int64_t m0, int64_t n0) {
  using L = Tiles<T>;
  zero_tile<BM, BN>(dp, L::LDF_N);
  __syncthreads();  // dp is complete on return even when Cv = 0
  for (int c0 = 0; c0 < cv; c0 += BCV) {
    load_tile<BCV, BM>(dot, L::LD_M, grad_out, cv, nq, c0, m0);
    load_tile<BCV, BN>(vt, L::LD_N, v, cv, nk, c0, n0);
    __syncthreads();
    // dp[m][n] += sum_c dot[c][m] vt[c][n]
    tile_mma<false, true, BM, BN, BCV>(dp, L::LDF_N, dot, L::LD_M, vt, L::LD_N);
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    backward_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const uint8_t* __restrict__ key_mask,
                       const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq,
                       float* __restrict__ sums, WarpShape shape, WarpGeometry geometry, float scale,
                       int64_t m_blocks) {
  using L = Tiles<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  BackwardDqSmem<T> sm;
  BackwardDqSmem<T>::carve(smem, &sm);

  const int64_t m0 = (blockIdx.x % m_blocks) * BM;
  const int64_t b = blockIdx.x / m_blocks;
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  q += (b * geometry.len_q + geometry.lo_q) * d;
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  grad_out += b * cv * nq;
  dq += b * nq * d;  // plane t of the windows' (taps, B, Nq, C) at + t * plane
  const int64_t plane = shape.batch * nq * d;
  if (key_mask != nullptr) key_mask += b * nk;
  const Factors factors(geometry, b, nq, nk);
  const bool windows = windowed(geometry);
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    const bool in = m0 + i < nq;
    sm.row_lse2[i] = in ? lse[b * nq + m0 + i] * kLog2e : 0.0f;
    sm.row_delta[i] = in ? delta[b * nq + m0 + i] : 0.0f;
    sm.row_hm[i] = 0.0f;
    sm.row_es[i] = 0.0f;
  }
  const float scale_log2 = scale * kLog2e;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t n0 = 0; n0 < nk; n0 += BN) {
    score_tile(sm.s, sm.qc, sm.kc, q, k, nq, nk, d, m0, n0, geometry, factors);
    dp_tile(sm.dp, sm.dot, sm.vt, grad_out, v, nq, nk, cv, m0, n0);
    // ds = p (dp - delta) scale, p = exp(s - lse); masked keys and padded rows get p = 0
    // before exp2 (a padded key's score of 0 can sit far above a row's logsumexp). One warp
    // per row, which reduces the windows' row sums.
    for (int i = warp; i < BM; i += kWarps) {
      const int64_t m = m0 + i;
      const float aq = windows ? centre_factor(factors.aq, nq, m) : 0.0f;
      float hm = 0.0f, es = 0.0f;
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const int j = lane + 32 * t;
        const bool keep = m < nq && key_kept(key_mask, nk, n0 + j);
        const float sc = sm.s[i * L::LDF_N + j];
        const float p = keep ? exp2f(sc * scale_log2 - sm.row_lse2[i]) : 0.0f;
        float ds = p * (sm.dp[i * L::LDF_N + j] - sm.row_delta[i]) * scale;
        if (windows) {  // H = ds a_i a_j: the part through the window products
          es += ds * sc;
          ds *= aq * centre_factor(factors.ak, nk, n0 + j);
          hm += ds * centre_factor(factors.mk, nk, n0 + j);
        }
        sm.ds[i * L::LD_N + j] = from_float<T>(ds);  // float: the element sc was read from
      }
      if (windows) {
        hm = warp_sum(hm);
        es = warp_sum(es);
        if (lane == 0) {
          sm.row_hm[i] += hm;
          sm.row_es[i] += es;
        }
      }
    }
    __syncthreads();
    // dq[m0.., d0..] (+)= ds @ k[n0.., d0..] one BD-wide chunk at a time; windows: plane t
    // (+)= H @ (k rows shifted by tap t).
    for (int t = 0; t < geometry.patch * geometry.patch; ++t) {
      float* dq_t = dq + t * plane;
      const T* kt = k + tap_offset(geometry.patch, geometry.width_k, t) * d;
      for (int d0 = 0; d0 < d; d0 += L::BD) {
        if (n0 == 0) {
          zero_tile<BM, L::BD>(sm.acc, L::LDF_D);
        } else {
          load_tile<BM, L::BD>(sm.acc, L::LDF_D, dq_t, nq, d, m0, d0);
        }
        load_tile<BN, L::BD>(sm.kc, L::LD_D, kt, nk, d, n0, d0);
        __syncthreads();
        tile_mma<true, true, BM, L::BD, BN>(sm.acc, L::LDF_D, sm.ds, L::LD_N, sm.kc, L::LD_D);
        __syncthreads();
        store_tile<BM, L::BD>(dq_t, nq, d, m0, d0, sm.acc, L::LDF_D);
        __syncthreads();
      }
    }
  }
  if (windows) {
    __syncthreads();  // the row sums are complete
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      if (m0 + i >= nq) continue;
      sums[b * nq + m0 + i] = sm.row_hm[i];
      sums[(shape.batch + b) * nq + m0 + i] = sm.row_es[i];
    }
  }
}

template <class T>
struct BackwardDkDvSmem {
  T *qc, *kc, *dot, *vt, *pt, *ds;
  float *s, *dp, *score, *acc_dv, *acc_dk, *row_lse2, *row_delta, *col_hm, *col_es;
  // windows: room for the scores, which P overwrites, and the column sums.
  __host__ __device__ static size_t carve(unsigned char* base, BackwardDkDvSmem* out, bool windows = false) {
    using L = Tiles<T>;
    SmemCarver c{base};
    BackwardDkDvSmem m;
    m.qc = c.take<T>(BM * L::LD_D);
    m.kc = c.take<T>(BN * L::LD_D);
    m.dot = c.take<T>(BCV * L::LD_M);
    m.vt = c.take<T>(BCV * L::LD_N);
    m.s = c.take<float>(BM * L::LDF_N);  // scores, then P in float32
    m.pt = L::kFloat ? reinterpret_cast<T*>(m.s) : c.take<T>(BM * L::LD_N);  // P for its product
    m.dp = c.take<float>(BM * L::LDF_N);
    m.ds = L::kFloat ? reinterpret_cast<T*>(m.dp) : c.take<T>(BM * L::LD_N);  // dS, or H for windows
    m.acc_dv = c.take<float>(BCV * L::LDF_N);  // a BCV x BN chunk of dv (Cv, Nk)
    m.acc_dk = c.take<float>(BN * L::LDF_D);   // a BN x BD chunk of dk
    m.row_lse2 = c.take<float>(BM);
    m.row_delta = c.take<float>(BM);
    // Last, and laid out either way (fixed offsets, no selects): only windows launches reserve them.
    const size_t rows_only = c.used;
    m.score = c.take<float>(BM * L::LDF_N);
    m.col_hm = c.take<float>(BN);  // sum_i H_ij m_i
    m.col_es = c.take<float>(BN);  // sum_i dS_ij score_ij
    if (out != nullptr) *out = m;
    return windows ? c.used : rows_only;
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    backward_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const uint8_t* __restrict__ key_mask,
                         const float* __restrict__ lse, const float* __restrict__ delta,
                         float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ sums,
                         WarpShape shape, WarpGeometry geometry, float scale, int64_t n_blocks) {
  using L = Tiles<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const bool windows = windowed(geometry);
  BackwardDkDvSmem<T> sm;
  BackwardDkDvSmem<T>::carve(smem, &sm);

  const int64_t n0 = (blockIdx.x % n_blocks) * BN;
  const int64_t b = blockIdx.x / n_blocks;
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  q += (b * geometry.len_q + geometry.lo_q) * d;
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  grad_out += b * cv * nq;
  if (dk != nullptr) dk += b * nk * d;  // plane t of the windows' (taps, B, Nk, C) at + t * plane
  const int64_t plane = shape.batch * nk * d;
  if (dv != nullptr) dv += b * cv * nk;
  if (key_mask != nullptr) key_mask += b * nk;
  const Factors factors(geometry, b, nq, nk);
  const float scale_log2 = scale * kLog2e;
  if (windows) {
    for (int j = threadIdx.x; j < BN; j += kThreads) sm.col_hm[j] = sm.col_es[j] = 0.0f;
  }

  for (int64_t m0 = 0; m0 < nq; m0 += BM) {
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const bool in = m0 + i < nq;
      sm.row_lse2[i] = in ? lse[b * nq + m0 + i] * kLog2e : 0.0f;
      sm.row_delta[i] = in ? delta[b * nq + m0 + i] : 0.0f;
    }
    score_tile(sm.s, sm.qc, sm.kc, q, k, nq, nk, d, m0, n0, geometry, factors);  // its syncs publish the row stats
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int i = e / BN, j = e % BN;
      const bool keep = m0 + i < nq && key_kept(key_mask, nk, n0 + j);
      const float sc = sm.s[i * L::LDF_N + j];
      const float p = keep ? exp2f(sc * scale_log2 - sm.row_lse2[i]) : 0.0f;
      if (windows) sm.score[i * L::LDF_N + j] = sc;
      sm.s[i * L::LDF_N + j] = p;
      sm.pt[i * L::LD_N + j] = from_float<T>(p);  // float: the same element
    }
    if (dk != nullptr) zero_tile<BM, BN>(sm.dp, L::LDF_N);
    __syncthreads();
    for (int c0 = 0; c0 < cv; c0 += BCV) {
      load_tile<BCV, BM>(sm.dot, L::LD_M, grad_out, cv, nq, c0, m0);
      if (dk != nullptr) load_tile<BCV, BN>(sm.vt, L::LD_N, v, cv, nk, c0, n0);
      if (dv != nullptr) {
        if (m0 == 0) {
          zero_tile<BCV, BN>(sm.acc_dv, L::LDF_N);
        } else {
          load_tile<BCV, BN>(sm.acc_dv, L::LDF_N, dv, cv, nk, c0, n0);
        }
      }
      __syncthreads();
      // dp[m][n] += sum_c dot[c][m] vt[c][n];  dv[c][n] += sum_m dot[c][m] p[m][n]
      if (dk != nullptr) tile_mma<false, true, BM, BN, BCV>(sm.dp, L::LDF_N, sm.dot, L::LD_M, sm.vt, L::LD_N);
      if (dv != nullptr) tile_mma<true, true, BCV, BN, BM>(sm.acc_dv, L::LDF_N, sm.dot, L::LD_M, sm.pt, L::LD_N);
      __syncthreads();
      if (dv != nullptr) store_tile<BCV, BN>(dv, cv, nk, c0, n0, sm.acc_dv, L::LDF_N);
      __syncthreads();
    }
    if (dk == nullptr) continue;
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int i = e / BN, j = e % BN;
      const float p = sm.s[i * L::LDF_N + j];
      float ds = p * (sm.dp[i * L::LDF_N + j] - sm.row_delta[i]) * scale;
      if (windows) {  // H = ds a_i a_j; the column sums' terms go to the float tiles s and score
        const float aq = centre_factor(factors.aq, nq, m0 + i);
        sm.score[i * L::LDF_N + j] *= ds;
        sm.s[i * L::LDF_N + j] = ds * aq * centre_factor(factors.mq, nq, m0 + i);  // H_ij m_i / a_j
        ds *= aq * centre_factor(factors.ak, nk, n0 + j);
      }
      sm.ds[i * L::LD_N + j] = from_float<T>(ds);  // float: the element dp was read from
    }
    __syncthreads();
    if (windows) {
      for (int j = threadIdx.x; j < BN; j += kThreads) {
        float hm = 0.0f, es = 0.0f;
        for (int i = 0; i < BM; ++i) {
          hm += sm.s[i * L::LDF_N + j];
          es += sm.score[i * L::LDF_N + j];
        }
        sm.col_hm[j] += hm * centre_factor(factors.ak, nk, n0 + j);
        sm.col_es[j] += es;
      }
      __syncthreads();  // before the next score tile overwrites s
    }
    // dk[n0.., d0..] (+)= ds^T @ q[m0.., d0..] one BD-wide chunk at a time; windows: plane t
    // (+)= H^T @ (q rows shifted by tap t).
    for (int t = 0; t < geometry.patch * geometry.patch; ++t) {
      float* dk_t = dk + t * plane;
      const T* qt = q + tap_offset(geometry.patch, geometry.width_q, t) * d;
      for (int d0 = 0; d0 < d; d0 += L::BD) {
        if (m0 == 0) {
          zero_tile<BN, L::BD>(sm.acc_dk, L::LDF_D);
        } else {
          load_tile<BN, L::BD>(sm.acc_dk, L::LDF_D, dk_t, nk, d, n0, d0);
        }
        load_tile<BM, L::BD>(sm.qc, L::LD_D, qt, nq, d, m0, d0);
        __syncthreads();
        // dk[n][d] += sum_m ds[m][n] qc[m][d]
        tile_mma<false, true, BN, L::BD, BM>(sm.acc_dk, L::LDF_D, sm.ds, L::LD_N, sm.qc, L::LD_D);
        __syncthreads();
        store_tile<BN, L::BD>(dk_t, nk, d, n0, d0, sm.acc_dk, L::LDF_D);
        __syncthreads();
      }
    }
  }
  if (windows && dk != nullptr) {
    __syncthreads();  // the column sums are complete
    for (int j = threadIdx.x; j < BN; j += kThreads) {
      if (n0 + j >= nk) continue;
      sums[b * nk + n0 + j] = sm.col_hm[j];
      sums[(shape.batch + b) * nk + n0 + j] = sm.col_es[j];
    }
  }
}

// ----------------------------------------------------------------------------- launchers

// Calls run(kernel, blocks, dynamic shared bytes, the kernel's arguments...) with the forward
// kernel and grid for these inputs and returns what run returns: correspondence_warp_forward
// launches them, testing/harness.cpp runs them on the CPU, testing/launch_probe.cu records them
// (benchmarks/kernel_report.py's launch plans). float32 with precision ieee:
// forward_kernel (instantiated for float32 only); else prepared rows up to kMmaForwardD:
// forward_mma_kernel; windows and wider rows: forward_streamed_mma_kernel.
template <class T, class Run>
auto with_forward_kernel(const T* q, const T* k, const T* v, const uint8_t* key_mask, T* out, float* lse,
                         WarpShape shape, WarpGeometry geometry, float scale, Precision precision, Run&& run) {
  const float scale_log2 = scale * kLog2e;
  if (uses_mma_forward<T>(shape, geometry, precision)) {
    return with_mma_tiles<T, kMmaForwardD<T>, 64>(shape, precision, [&](auto p, auto dt, auto cvt) {
      constexpr Precision P = decltype(p)::value;
      constexpr int DT = decltype(dt)::value, CVT = decltype(cvt)::value;
      const MmaGrid grid = forward_mma_grid(shape, CVT);
      return run(forward_mma_kernel<T, P, DT, CVT>, grid.blocks(shape.batch), MmaTiles<T, DT, CVT>::kForwardBytes,
                 q, k, v, key_mask, out, lse, shape, scale_log2, grid);
    });
  }
  if constexpr (kIsFloat<T>) {
    if (precision == Precision::kIeee) {
      const int64_t m_blocks = ceil_div(shape.nq, BM);
      const int64_t cv_chunks = shape.cv > 0 ? ceil_div(shape.cv, BCV) : 1;  // chunk 0 writes the lse
      return run(forward_kernel<T>, shape.batch * cv_chunks * m_blocks, ForwardSmem<T>::carve(nullptr, nullptr), q,
                 k, v, key_mask, out, lse, shape, geometry, scale_log2, m_blocks, cv_chunks);
    }
  }
  return with_streamed_tiles<T>(shape, precision, [&](auto p, auto cvt) {
    constexpr Precision P = decltype(p)::value;
    constexpr int CVT = decltype(cvt)::value, BN = kStreamedForwardKeys<T, CVT>;
    const MmaGrid grid = forward_mma_grid(shape, StreamedForwardChunk<CVT>(shape.cv).width);
    return run(forward_streamed_mma_kernel<T, P, CVT, BN>, grid.blocks(shape.batch), StreamedTiles<T, CVT, BN>::kBytes,
               q, k, v, key_mask, out, lse, shape, geometry, scale_log2, grid);
  });
}

// Runs the backward kernels for these inputs through launch(kernel, blocks, dynamic shared bytes,
// the kernel's arguments...) -> cudaError_t, as with_forward_kernel: rows that fit the
// register-resident kernels take backward_mma; windows and other rows with Cv <= 64 (float32 with
// tf32x3 / tf32) or Cv <= 192 (16-bit) backward_streamed_mma_kernel; the rest the shared-memory kernels.
template <class T, class Launch>
cudaError_t backward_kernels(const T* grad_out, const T* q, const T* k, const T* v, const uint8_t* key_mask,
                             const float* lse, const float* delta, float* dq, float* dk, float* dv, float* sums_q,
                             float* sums_k, WarpShape shape, WarpGeometry geometry, float scale, Precision precision,
                             Launch&& launch) {
  if (uses_mma_backward<T>(shape, geometry, precision)) {
    return backward_mma(grad_out, q, k, v, key_mask, lse, delta, dq, dk, dv, shape, scale, precision, launch);
  }
  if (uses_streamed_mma_backward<T>(shape, geometry, precision)) {
    return with_streamed_backward_tiles<T>(shape, precision, [&](auto p, auto cvt) {
      constexpr Precision P = decltype(p)::value;
      constexpr int CVT = decltype(cvt)::value, G = kStreamedBackwardGroup<T, P, CVT>;
      using L = StreamedBackwardTiles<T, CVT, G>;
      const size_t bytes = L(shape.cv).bytes();
      if (dq != nullptr) {
        const MmaGrid grid = streamed_backward_grid(shape.nq);
        const cudaError_t err = launch(backward_streamed_mma_kernel<T, P, CVT, G, false>, grid.blocks(shape.batch),
                                       bytes, grad_out, q, k, v, key_mask, lse, delta, dq, nullptr, sums_q, shape,
                                       geometry, scale, grid);
        if (err != cudaSuccess) return err;
      }
      // The wide class: dK blocks, then dV-only blocks (G 0).
      if (dk != nullptr || (dv != nullptr && !L::kWide)) {
        const MmaGrid grid = streamed_backward_grid(shape.nk);
        const cudaError_t err = launch(backward_streamed_mma_kernel<T, P, CVT, G, true>, grid.blocks(shape.batch),
                                       bytes, grad_out, q, k, v, key_mask, lse, delta, dk, L::kWide ? nullptr : dv,
                                       sums_k, shape, geometry, scale, grid);
        if (err != cudaSuccess) return err;
      }
      if constexpr (L::kWide) {
        if (dv != nullptr) {
          const MmaGrid grid = streamed_dv_grid(shape, CVT);
          return launch(backward_streamed_mma_kernel<T, P, CVT, 0, true>, grid.blocks(shape.batch),
                        StreamedBackwardTiles<T, CVT, 0>(shape.cv).bytes(), grad_out, q, k, v, key_mask, lse, delta,
                        nullptr, dv, nullptr, shape, geometry, scale, grid);
        }
      }
      return cudaSuccess;
    });
  }
  if (dq != nullptr) {
    const int64_t m_blocks = ceil_div(shape.nq, BM);
    const cudaError_t err = launch(backward_dq_kernel<T>, shape.batch * m_blocks,
                                   BackwardDqSmem<T>::carve(nullptr, nullptr), grad_out, q, k, v,
                                   key_mask, lse, delta, dq, sums_q, shape, geometry, scale, m_blocks);
    if (err != cudaSuccess) return err;
  }
  if (dk != nullptr || dv != nullptr) {
    const int64_t n_blocks = ceil_div(shape.nk, BN);
    return launch(backward_dkdv_kernel<T>, shape.batch * n_blocks,
                  BackwardDkDvSmem<T>::carve(nullptr, nullptr, windowed(geometry)), grad_out, q, k, v,
                  key_mask, lse, delta, dk, dv, sums_k, shape, geometry, scale, n_blocks);
  }
  return cudaSuccess;
}

// The launchers themselves are nvcc only: tests/test_cuda_build.py also compiles the kernels above
// with a host compiler, each block emulated by kThreads CPU threads, and runs them through
// with_forward_kernel, backward_kernels and harness.cpp.
#ifdef __CUDACC__

// Opts the kernel into `bytes` of dynamic shared memory (above 48 KiB needs it) and launches.
template <class Kernel, class... Args>
cudaError_t launch(Kernel kernel, int64_t blocks, size_t bytes, cudaStream_t stream, Args... args) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned int>(blocks), kThreads, bytes, stream>>>(args...);
  return cudaGetLastError();
}

template <class T>
cudaError_t correspondence_warp_forward(const T* q, const T* k, const T* v, const uint8_t* key_mask,
                                        T* out, float* lse, WarpShape shape, WarpGeometry geometry,
                                        float scale, Precision precision, cudaStream_t stream) {
  return with_forward_kernel(q, k, v, key_mask, out, lse, shape, geometry, scale, precision,
                             [&](auto kernel, int64_t blocks, size_t bytes, auto... args) {
                               return launch(kernel, blocks, bytes, stream, args...);
                             });
}

template <class T>
cudaError_t correspondence_warp_backward(const T* grad_out, const T* q, const T* k, const T* v,
                                         const uint8_t* key_mask, const float* lse,
                                         const float* delta, float* dq, float* dk, float* dv,
                                         float* sums_q, float* sums_k, WarpShape shape,
                                         WarpGeometry geometry, float scale, Precision precision,
                                         cudaStream_t stream) {
  return backward_kernels(grad_out, q, k, v, key_mask, lse, delta, dq, dk, dv, sums_q, sums_k, shape, geometry, scale,
                          precision, [&](auto kernel, int64_t blocks, size_t bytes, auto... args) {
                            return launch(kernel, blocks, bytes, stream, args...);
                          });
}

#endif  // __CUDACC__

#define COCOS_KERNELS_INSTANTIATE_WARP(T)                                                          \
  template cudaError_t correspondence_warp_forward<T>(const T*, const T*, const T*, const uint8_t*,   \
                                                      T*, float*, WarpShape, WarpGeometry, float,     \
                                                      Precision, cudaStream_t);                       \
  template cudaError_t correspondence_warp_backward<T>(                                             \
      const T*, const T*, const T*, const T*, const uint8_t*, const float*, const float*, float*,    \
      float*, float*, float*, float*, WarpShape, WarpGeometry, float, Precision, cudaStream_t);

}  // namespace cuda
}  // namespace cocos_kernels
