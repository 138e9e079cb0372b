// CUDA kernels of contextual_loss on prepared rows (float32): the algorithm of the CPU and Triton
// backends (csrc/cpu/contextual_loss.cpp, cocos_kernels/triton/contextual_loss.py), on CUDA cores
// in exact float32 FMAs (no tf32: a distance's rounding is divided by down to 5e-5).
//
// d_ij = 1 - <x_i, y_j> is recomputed tile by tile (BM rows of x x BN rows of y), never stored
// whole, by distance_tile, the one product all three kernels call (so each d_ij rounds the same
// in the forward and the backward): BD-column chunks of x and y go global -> shared through a
// two-stage cp.async pipeline (load_tile_async, start_pipeline / next_stage; element copies where
// rows are not 16-byte aligned; cp.async needs sm_80 or newer), and each thread keeps a
// kThreadRows x kThreadCols block of the tile in registers, rows ty + 16 r and columns tx + 16 s
// (ty, tx = threadIdx / 16, % 16), summing over C in increasing order from float4 shared loads.
// Shared loads per FMA: distance_tile 0.125, add_product 0.25 (64/128-bit); tile_mma: 0.5, 0.75 (32-bit) + output RMW.
//
// Forward: one block per (BM rows of x, batch element), two passes over the column tiles: the
// row minimum m_i and its argmin first (its scale c_i = h (m_i + dist_eps) is only known then, so
// a partial sum cannot be rescaled online as a softmax's), then s_i = sum_j e_ij and
// t_i = sum_j e_ij d_ij with e_ij = exp(min((m_i - d_ij) / c_i, 0)), all on the registers of
// distance_tile: a row's 16 threads are one half-warp, reduced by xor shuffles. Ties go to the
// lowest j: each thread scans its columns in increasing order with a strict <, the threads'
// (value, column) pairs are reduced by value then column, and across tiles only a strictly
// smaller minimum replaces the current one.
//
// Backward: the loss's gradient w.r.t. d, negated, is P_ij = g_i e_ij / c_i, minus
// q_i = g_i (t_i + dist_eps s_i) / (h (m_i + dist_eps)^2) at j = argmin_i only (the minimum
// moves every term of s_i); dX_i = sum_j P_ij y_j and dY_j = sum_i P_ij x_i. One kernel per side
// (dX over row blocks of x, dY over row blocks of y) recomputes the tiles of d with distance_tile,
// writes P (dY: P^T) to shared memory, and add_product accumulates its C-wide output in global
// memory, owned by the block (no atomics, deterministic), chunk by chunk: the other side's rows
// stream through the same cp.async stages, each thread holds a 4 x 2 block of the output chunk in
// registers.
#pragma once

#include "contextual_loss.h"
#include "correspondence_warp.cuh"  // BM, BN, Tiles, ceil_div, launch, load_tile_async, start_pipeline, next_stage
#include "tile.cuh"

namespace cocos_kernels {
namespace cuda {

using ContextualTiles = Tiles<float>;
constexpr float kInf = -kNegInf;
// A thread's block of a distance tile: kThreadRows rows x kThreadCols columns, on a 16 x 16 grid of threads.
constexpr int kThreadRows = BM / 16, kThreadCols = BN / 16;
using DistanceBlock = float[kThreadRows][kThreadCols];
static_assert(kThreads == 16 * 16 && ContextualTiles::BD % 4 == 0, "16 x 16 threads, float4 steps");

// The pipeline's stages: a BD-column chunk of BM rows of x, then of BN rows of y.
struct DistanceStages {
  static constexpr int kStages = 2;
  static constexpr int STAGE = (BM + BN) * ContextualTiles::LD_D;
};

// dot[r][s] = <x_{i0 + ty + 16 r}, y_{j0 + tx + 16 s}> (zero rows outside the matrices); stages
// holds DistanceStages. Starts with a barrier: the previous tile's stages are free, and shared
// writes before the call are visible after it.
__device__ __forceinline__ void distance_tile(DistanceBlock& dot, float* stages, const float* x, const float* y,
                                              int64_t nx, int64_t ny, int c, int64_t i0, int64_t j0) {
  using L = ContextualTiles;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
    for (int s = 0; s < kThreadCols; ++s) dot[r][s] = 0.0f;
  const int64_t chunks = ceil_div(c, L::BD);
  auto fetch = [&](int64_t k, float* stage) {
    load_tile_async<BM, L::BD>(stage, L::LD_D, x, nx, c, i0, k * L::BD);
    load_tile_async<BN, L::BD>(stage + BM * L::LD_D, L::LD_D, y, ny, c, j0, k * L::BD);
  };
  __syncthreads();
  start_pipeline<DistanceStages>(stages, chunks, fetch);
  for (int64_t k = 0; k < chunks; ++k) {
    const float* stage = next_stage<DistanceStages>(stages, k, chunks, fetch);
    const float* xs = stage + ty * L::LD_D;
    const float* ys = stage + (BM + tx) * L::LD_D;
    // Rows 16 apart: a quarter-warp's 128-bit loads of y rows hit 8 distinct 4-bank groups
    // (LD_D = 4 mod 32); its x loads are one broadcast. Rolled: 64 FMAs a step hide the loop's
    // overhead, and the registers stay well under the 128 of two blocks per SM.
#pragma unroll 1
    for (int kk = 0; kk < L::BD; kk += 4) {
      float4 b[kThreadCols];
#pragma unroll
      for (int s = 0; s < kThreadCols; ++s) b[s] = *reinterpret_cast<const float4*>(ys + 16 * s * L::LD_D + kk);
#pragma unroll
      for (int r = 0; r < kThreadRows; ++r) {
        const float4 a = *reinterpret_cast<const float4*>(xs + 16 * r * L::LD_D + kk);
#pragma unroll
        for (int s = 0; s < kThreadCols; ++s) {
          dot[r][s] = fmaf(a.x, b[s].x, dot[r][s]);
          dot[r][s] = fmaf(a.y, b[s].y, dot[r][s]);
          dot[r][s] = fmaf(a.z, b[s].z, dot[r][s]);
          dot[r][s] = fmaf(a.w, b[s].w, dot[r][s]);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- forward

struct ContextualForwardSmem {
  float* stages;
  __host__ __device__ static size_t carve(unsigned char* base, ContextualForwardSmem* out) {
    SmemCarver c{base};
    ContextualForwardSmem m;
    m.stages = c.take<float>(DistanceStages::kStages * DistanceStages::STAGE);
    if (out != nullptr) *out = m;
    return c.used;
  }
};

__global__ void __launch_bounds__(kThreads, 2)
    contextual_forward_kernel(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ m_out,
                              int64_t* __restrict__ arg_out, float* __restrict__ s_out, float* __restrict__ t_out,
                              ContextualShape shape, float bandwidth, float dist_eps, int64_t x_blocks) {
  extern __shared__ __align__(128) unsigned char smem[];
  ContextualForwardSmem sm;
  ContextualForwardSmem::carve(smem, &sm);

  const int64_t i0 = (blockIdx.x % x_blocks) * BM;
  const int64_t b = blockIdx.x / x_blocks;
  const int64_t nx = shape.nx, ny = shape.ny;
  const int c = shape.c;
  x += b * nx * c;
  y += b * ny * c;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;  // a row's 16 threads: lanes 0-15 or 16-31 of a warp
  DistanceBlock dot;

  // Pass 1: the row minimum and its lowest column, kept by each of the row's threads.
  float row_min[kThreadRows];
  int64_t row_arg[kThreadRows];
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    row_min[r] = kInf;
    row_arg[r] = 0;
  }
  for (int64_t j0 = 0; j0 < ny; j0 += BN) {
    distance_tile(dot, sm.stages, x, y, nx, ny, c, i0, j0);
#pragma unroll
    for (int r = 0; r < kThreadRows; ++r) {
      // The thread's own columns in increasing order: a strict < keeps the lowest of equal ones.
      float best = kInf, best_j = 0.0f;  // a column index < BN: exact in a float
#pragma unroll
      for (int s = 0; s < kThreadCols; ++s) {
        const int j = tx + 16 * s;
        const float dij = j0 + j < ny ? 1.0f - dot[r][s] : kInf;
        if (dij < best) {
          best = dij;
          best_j = static_cast<float>(j);
        }
      }
      // Across the row's threads: the smallest (value, column) pair; each of them ends with it.
#pragma unroll
      for (int offset = 1; offset < 16; offset *= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const float other_j = __shfl_xor_sync(0xffffffffu, best_j, offset);
        if (other < best || (other == best && other_j < best_j)) {
          best = other;
          best_j = other_j;
        }
      }
      if (best < row_min[r]) {  // an earlier tile keeps a tie
        row_min[r] = best;
        row_arg[r] = j0 + static_cast<int64_t>(best_j);
      }
    }
  }

  // Pass 2: the sums, each row with its own scale.
  float inv_c[kThreadRows], row_s[kThreadRows], row_t[kThreadRows];
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
    inv_c[r] = 1.0f / (bandwidth * (row_min[r] + dist_eps));
    row_s[r] = 0.0f;
    row_t[r] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < ny; j0 += BN) {
    distance_tile(dot, sm.stages, x, y, nx, ny, c, i0, j0);
#pragma unroll
    for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
      for (int s = 0; s < kThreadCols; ++s) {
        if (j0 + tx + 16 * s < ny) {
          const float dij = 1.0f - dot[r][s];
          const float e = expf(fminf((row_min[r] - dij) * inv_c[r], 0.0f));
          row_s[r] += e;
          row_t[r] += e * dij;
        }
      }
  }
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r) {
#pragma unroll
    for (int offset = 1; offset < 16; offset *= 2) {
      row_s[r] += __shfl_xor_sync(0xffffffffu, row_s[r], offset);
      row_t[r] += __shfl_xor_sync(0xffffffffu, row_t[r], offset);
    }
    const int64_t i = i0 + ty + 16 * r;
    if (tx == 0 && i < nx) {
      const int64_t o = b * nx + i;
      m_out[o] = row_min[r];
      arg_out[o] = row_arg[r];
      s_out[o] = row_s[r];
      t_out[o] = row_t[r];
    }
  }
}

// ----------------------------------------------------------------------------- backward

struct ContextualBackwardSmem {
  float *stages, *p, *row_min, *row_inv_c, *row_coef, *row_q;
  int64_t* row_arg;
  __host__ __device__ static size_t carve(unsigned char* base, ContextualBackwardSmem* out) {
    using L = ContextualTiles;
    SmemCarver c{base};
    ContextualBackwardSmem m;
    // distance_tile's stages, then add_product's (the chunks of y or x that P multiplies)
    m.stages = c.take<float>(DistanceStages::kStages * DistanceStages::STAGE);
    m.p = c.take<float>(BM * L::LDF_N);  // P (dX) or P^T (dY)
    m.row_min = c.take<float>(BM);
    m.row_inv_c = c.take<float>(BM);
    m.row_coef = c.take<float>(BM);
    m.row_q = c.take<float>(BM);
    m.row_arg = c.take<int64_t>(BM);
    if (out != nullptr) *out = m;
    return c.used;
  }
};

// The statistics of rows i0 .. i0 + BM of x (batch element b); padded rows get g = 0 and no argmin.
__device__ __forceinline__ void load_row_stats(const ContextualBackwardSmem& sm, const float* grad_s, const float* m,
                                               const int64_t* argmin, const float* s, const float* t, int64_t b,
                                               int64_t nx, int64_t i0, float bandwidth, float dist_eps) {
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    float mi = 0.0f, coef = 0.0f, q = 0.0f, inv_c = 0.0f;
    int64_t arg = -1;
    if (i0 + i < nx) {
      const int64_t o = b * nx + i0 + i;
      const float g = grad_s[o], me = m[o] + dist_eps;
      mi = m[o];
      inv_c = 1.0f / (bandwidth * (mi + dist_eps));
      coef = g * inv_c;
      q = g * (t[o] + dist_eps * s[o]) / (bandwidth * me * me);
      arg = argmin[o];
    }
    sm.row_min[i] = mi;
    sm.row_inv_c[i] = inv_c;
    sm.row_coef[i] = coef;
    sm.row_q[i] = q;
    sm.row_arg[i] = arg;
  }
}

// p = P_ij (p[i][j]; TRANSPOSED: p[j][i]) from the thread's dot products (distance_tile), zero
// outside the matrix.
template <bool TRANSPOSED>
__device__ __forceinline__ void gradient_tile(const ContextualBackwardSmem& sm, const DistanceBlock& dot,
                                              int64_t nx, int64_t ny, int64_t i0, int64_t j0) {
  using L = ContextualTiles;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int r = 0; r < kThreadRows; ++r)
#pragma unroll
    for (int s = 0; s < kThreadCols; ++s) {
      const int i = ty + 16 * r, j = tx + 16 * s;
      float pij = 0.0f;
      if (i0 + i < nx && j0 + j < ny) {
        const float dij = 1.0f - dot[r][s];
        pij = sm.row_coef[i] * expf(fminf((sm.row_min[i] - dij) * sm.row_inv_c[i], 0.0f));
        if (sm.row_arg[i] == j0 + j) pij -= sm.row_q[i];
      }
      sm.p[TRANSPOSED ? j * L::LDF_N + i : i * L::LDF_N + j] = pij;
    }
}

// out[r0 + u][v] (+)= sum_k a[u][k] src[k0 + k][v] for the 64 rows u of a (shared, 64 x 64, row
// stride LDF_N) over all C columns v, in BD-column chunks of src streamed through the stages;
// `first` overwrites. Thread (ty, tx) holds rows ty + 16 r and columns 2 tx, 2 tx + 1 of a chunk
// in registers (0.25 shared loads per FMA: float4 of a, float2 of src). Starts with a barrier: a
// is complete and the stages are free.
__device__ __forceinline__ void add_product(float* out, int64_t out_rows, int64_t r0, bool first, const float* a,
                                            float* stages, const float* src, int64_t src_rows, int64_t k0, int c) {
  using L = ContextualTiles;
  static_assert(BM == BN && L::BD == 2 * 16, "64 x 64 a, two chunk columns per thread");
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t chunks = ceil_div(c, L::BD);
  auto fetch = [&](int64_t k, float* stage) {
    load_tile_async<BN, L::BD>(stage, L::LD_D, src, src_rows, c, k0, k * L::BD);
  };
  __syncthreads();
  start_pipeline<DistanceStages>(stages, chunks, fetch);
  for (int64_t k = 0; k < chunks; ++k) {
    const float* b = next_stage<DistanceStages>(stages, k, chunks, fetch) + 2 * tx;
    const int64_t col = k * L::BD + 2 * tx;
    float acc[kThreadRows][2];
#pragma unroll
    for (int r = 0; r < kThreadRows; ++r) {
      const int64_t row = r0 + ty + 16 * r;
#pragma unroll
      for (int e = 0; e < 2; ++e) acc[r][e] = !first && row < out_rows && col + e < c ? out[row * c + col + e] : 0.0f;
    }
    // A quarter-warp's float2 loads of src are 64 consecutive bytes; its float4 loads of a one
    // broadcast. Unrolled by 4: a step's 32 FMAs alone would not hide the loop's overhead.
#pragma unroll 4
    for (int kk = 0; kk < BN; kk += 4) {
      float2 bv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = *reinterpret_cast<const float2*>(b + (kk + q) * L::LD_D);
#pragma unroll
      for (int r = 0; r < kThreadRows; ++r) {
        const float4 av = *reinterpret_cast<const float4*>(a + (ty + 16 * r) * L::LDF_N + kk);
        const float ak[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[r][0] = fmaf(ak[q], bv[q].x, acc[r][0]);
          acc[r][1] = fmaf(ak[q], bv[q].y, acc[r][1]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kThreadRows; ++r) {
      const int64_t row = r0 + ty + 16 * r;
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (row < out_rows && col + e < c) out[row * c + col + e] = acc[r][e];
    }
  }
}

// dX: one block per (BM rows of x, batch element), over the column tiles of y.
__global__ void __launch_bounds__(kThreads, 2)
    contextual_backward_dx_kernel(const float* __restrict__ grad_s, const float* __restrict__ x,
                                  const float* __restrict__ y, const float* __restrict__ m,
                                  const int64_t* __restrict__ argmin, const float* __restrict__ s,
                                  const float* __restrict__ t, float* __restrict__ dx, ContextualShape shape,
                                  float bandwidth, float dist_eps, int64_t x_blocks) {
  extern __shared__ __align__(128) unsigned char smem[];
  ContextualBackwardSmem sm;
  ContextualBackwardSmem::carve(smem, &sm);

  const int64_t i0 = (blockIdx.x % x_blocks) * BM;
  const int64_t b = blockIdx.x / x_blocks;
  const int64_t nx = shape.nx, ny = shape.ny;
  const int c = shape.c;
  load_row_stats(sm, grad_s, m, argmin, s, t, b, nx, i0, bandwidth, dist_eps);
  x += b * nx * c;
  y += b * ny * c;
  dx += b * nx * c;
  for (int64_t j0 = 0; j0 < ny; j0 += BN) {
    DistanceBlock dot;
    distance_tile(dot, sm.stages, x, y, nx, ny, c, i0, j0);  // its first barrier publishes the row stats
    gradient_tile<false>(sm, dot, nx, ny, i0, j0);
    add_product(dx, nx, i0, j0 == 0, sm.p, sm.stages, y, ny, j0, c);  // dx[i0..] (+)= P y[j0..]
  }
}

// dY: one block per (BN rows of y, batch element), over the row tiles of x.
__global__ void __launch_bounds__(kThreads, 2)
    contextual_backward_dy_kernel(const float* __restrict__ grad_s, const float* __restrict__ x,
                                  const float* __restrict__ y, const float* __restrict__ m,
                                  const int64_t* __restrict__ argmin, const float* __restrict__ s,
                                  const float* __restrict__ t, float* __restrict__ dy, ContextualShape shape,
                                  float bandwidth, float dist_eps, int64_t y_blocks) {
  extern __shared__ __align__(128) unsigned char smem[];
  ContextualBackwardSmem sm;
  ContextualBackwardSmem::carve(smem, &sm);

  const int64_t j0 = (blockIdx.x % y_blocks) * BN;
  const int64_t b = blockIdx.x / y_blocks;
  const int64_t nx = shape.nx, ny = shape.ny;
  const int c = shape.c;
  x += b * nx * c;
  y += b * ny * c;
  dy += b * ny * c;
  for (int64_t i0 = 0; i0 < nx; i0 += BM) {
    load_row_stats(sm, grad_s, m, argmin, s, t, b, nx, i0, bandwidth, dist_eps);
    DistanceBlock dot;
    distance_tile(dot, sm.stages, x, y, nx, ny, c, i0, j0);  // its first barrier publishes the row stats
    gradient_tile<true>(sm, dot, nx, ny, i0, j0);
    add_product(dy, ny, j0, i0 == 0, sm.p, sm.stages, x, nx, i0, c);  // dy[j0..] (+)= P^T x[i0..]
  }
}

}  // namespace cuda
}  // namespace cocos_kernels
