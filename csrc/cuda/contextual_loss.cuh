// CUDA kernels of contextual_loss on prepared rows (float32): the algorithm of the CPU and Triton
// backends (csrc/cpu/contextual_loss.cpp, cocos_kernels/triton/contextual_loss.py), with the
// shared-memory tiles of correspondence_warp.cuh.
//
// d_ij = 1 - <x_i, y_j> is recomputed tile by tile (BM rows of x x BN rows of y, summed over C in
// chunks of BD columns by score_tile), never stored whole.
//
// Forward: one block per (BM rows of x, batch element), two passes over the column tiles: the
// row minimum m_i and its argmin first (its scale c_i = h (m_i + dist_eps) is only known then, so
// a partial sum cannot be rescaled online as a softmax's), then s_i = sum_j e_ij and
// t_i = sum_j e_ij d_ij with e_ij = exp(min((m_i - d_ij) / c_i, 0)). Four lanes per row, 16
// columns of each tile per lane, shuffles among the four for the reductions. Ties go to the
// lowest j: each lane scans its columns in increasing order with a strict <, the lanes'
// (value, column) pairs are reduced by value then column, and across tiles only a strictly
// smaller minimum replaces the current one.
//
// Backward: the loss's gradient w.r.t. d, negated, is P_ij = g_i e_ij / c_i, minus
// q_i = g_i (t_i + dist_eps s_i) / (h (m_i + dist_eps)^2) at j = argmin_i only (the minimum
// moves every term of s_i); dX_i = sum_j P_ij y_j and dY_j = sum_i P_ij x_i. One kernel per side
// (dX over row blocks of x, dY over row blocks of y) recomputes the tiles of d with the forward's
// exact arithmetic (so each d_ij rounds as it did there) and accumulates its C-wide output chunk
// by chunk in global memory, owned by the block: no atomics, deterministic.
#pragma once

#include "contextual_loss.h"
#include "correspondence_warp.cuh"  // score_tile, BM, BN, Tiles, ceil_div, launch
#include "tile.cuh"

namespace cocos_kernels {
namespace cuda {

using ContextualTiles = Tiles<float>;
constexpr float kInf = -kNegInf;
constexpr int kRowLanes = kThreads / BM;  // threads per row in the forward's row reductions
static_assert(kRowLanes * BM == kThreads && 32 % kRowLanes == 0, "a row's lanes are in one warp");

// ----------------------------------------------------------------------------- forward

struct ContextualForwardSmem {
  float *xc, *yc, *d, *row_min, *row_s, *row_t;
  int64_t* row_arg;
  __host__ __device__ static size_t carve(unsigned char* base, ContextualForwardSmem* out) {
    using L = ContextualTiles;
    SmemCarver c{base};
    ContextualForwardSmem m;
    m.xc = c.take<float>(BM * L::LD_D);
    m.yc = c.take<float>(BN * L::LD_D);
    m.d = c.take<float>(BM * L::LDF_N);  // <x_i, y_j> from score_tile; d = 1 - it
    m.row_min = c.take<float>(BM);
    m.row_s = c.take<float>(BM);
    m.row_t = c.take<float>(BM);
    m.row_arg = c.take<int64_t>(BM);
    if (out != nullptr) *out = m;
    return c.used;
  }
};

__global__ void __launch_bounds__(kThreads, 2)
    contextual_forward_kernel(const float* __restrict__ x, const float* __restrict__ y, float* __restrict__ m_out,
                              int64_t* __restrict__ arg_out, float* __restrict__ s_out, float* __restrict__ t_out,
                              ContextualShape shape, float bandwidth, float dist_eps, int64_t x_blocks) {
  using L = ContextualTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  ContextualForwardSmem sm;
  ContextualForwardSmem::carve(smem, &sm);

  const int64_t i0 = (blockIdx.x % x_blocks) * BM;
  const int64_t b = blockIdx.x / x_blocks;
  const int64_t nx = shape.nx, ny = shape.ny;
  const int c = shape.c;
  x += b * nx * c;
  y += b * ny * c;
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    sm.row_min[i] = kInf;
    sm.row_arg[i] = 0;
  }
  __syncthreads();
  // Row reductions: kRowLanes consecutive lanes per row (i = threadIdx / kRowLanes), each taking
  // the columns j = part + kRowLanes u in increasing order (conflict-free in shared memory).
  const int i = threadIdx.x / kRowLanes, part = threadIdx.x % kRowLanes;
  const float* d_row = sm.d + i * L::LDF_N;

  // Pass 1: the row minimum and its lowest column.
  for (int64_t j0 = 0; j0 < ny; j0 += BN) {
    score_tile(sm.d, sm.xc, sm.yc, x, y, nx, ny, c, i0, j0);
    // The thread's own columns in increasing order: a strict < keeps the lowest of equal ones.
    float best = kInf, best_j = 0.0f;  // a column index < BN: exact in a float
#pragma unroll
    for (int u = 0; u < BN / kRowLanes; ++u) {
      const int j = part + kRowLanes * u;
      const float dij = j0 + j < ny ? 1.0f - d_row[j] : kInf;
      if (dij < best) {
        best = dij;
        best_j = static_cast<float>(j);
      }
    }
    // Across the row's lanes: the smallest (value, column) pair; each of them ends with it.
#pragma unroll
    for (int offset = 1; offset < kRowLanes; offset *= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const float other_j = __shfl_xor_sync(0xffffffffu, best_j, offset);
      if (other < best || (other == best && other_j < best_j)) {
        best = other;
        best_j = other_j;
      }
    }
    if (part == 0 && best < sm.row_min[i]) {  // an earlier tile keeps a tie
      sm.row_min[i] = best;
      sm.row_arg[i] = j0 + static_cast<int64_t>(best_j);
    }
    __syncthreads();  // before the next score_tile overwrites d
  }
  const float mi = sm.row_min[i];  // written by this row's lane 0, before the last barrier
  const float inv_c = 1.0f / (bandwidth * (mi + dist_eps));

  // Pass 2: the sums, each row with its own scale.
  float sum = 0.0f, dsum = 0.0f;  // this thread's columns of every tile
  for (int64_t j0 = 0; j0 < ny; j0 += BN) {
    score_tile(sm.d, sm.xc, sm.yc, x, y, nx, ny, c, i0, j0);
#pragma unroll
    for (int u = 0; u < BN / kRowLanes; ++u) {
      const int j = part + kRowLanes * u;
      if (j0 + j < ny) {
        const float dij = 1.0f - d_row[j];
        const float e = expf(fminf((mi - dij) * inv_c, 0.0f));
        sum += e;
        dsum += e * dij;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int offset = 1; offset < kRowLanes; offset *= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    dsum += __shfl_xor_sync(0xffffffffu, dsum, offset);
  }
  if (part == 0) {
    sm.row_s[i] = sum;
    sm.row_t[i] = dsum;
  }
  __syncthreads();

  const int64_t o = b * nx + i0;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    if (i0 + r < nx) {
      m_out[o + r] = sm.row_min[r];
      arg_out[o + r] = sm.row_arg[r];
      s_out[o + r] = sm.row_s[r];
      t_out[o + r] = sm.row_t[r];
    }
  }
}

// ----------------------------------------------------------------------------- backward

struct ContextualBackwardSmem {
  float *xc, *yc, *p, *acc, *row_min, *row_inv_c, *row_coef, *row_q;
  int64_t* row_arg;
  __host__ __device__ static size_t carve(unsigned char* base, ContextualBackwardSmem* out) {
    using L = ContextualTiles;
    SmemCarver c{base};
    ContextualBackwardSmem m;
    m.xc = c.take<float>(BM * L::LD_D);
    m.yc = c.take<float>(BN * L::LD_D);
    m.p = c.take<float>(BM * L::LDF_N);  // <x_i, y_j>, then P_ij in place
    m.acc = c.take<float>(BM * L::LDF_D);  // a BM x BD (dX) or BN x BD (dY) output chunk
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

// p (BM x BN): the dot products of the tile (score_tile) -> P_ij, zero outside the matrix.
__device__ __forceinline__ void gradient_tile(const ContextualBackwardSmem& sm, int64_t nx, int64_t ny, int64_t i0,
                                              int64_t j0) {
  using L = ContextualTiles;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int i = e / BN, j = e % BN;
    float pij = 0.0f;
    if (i0 + i < nx && j0 + j < ny) {
      const float dij = 1.0f - sm.p[i * L::LDF_N + j];
      pij = sm.row_coef[i] * expf(fminf((sm.row_min[i] - dij) * sm.row_inv_c[i], 0.0f));
      if (sm.row_arg[i] == j0 + j) pij -= sm.row_q[i];
    }
    sm.p[i * L::LDF_N + j] = pij;
  }
}

// dX: one block per (BM rows of x, batch element), over the column tiles of y.
__global__ void __launch_bounds__(kThreads, 2)
    contextual_backward_dx_kernel(const float* __restrict__ grad_s, const float* __restrict__ x,
                                  const float* __restrict__ y, const float* __restrict__ m,
                                  const int64_t* __restrict__ argmin, const float* __restrict__ s,
                                  const float* __restrict__ t, float* __restrict__ dx, ContextualShape shape,
                                  float bandwidth, float dist_eps, int64_t x_blocks) {
  using L = ContextualTiles;
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
    score_tile(sm.p, sm.xc, sm.yc, x, y, nx, ny, c, i0, j0);  // its barriers publish the row stats
    gradient_tile(sm, nx, ny, i0, j0);
    __syncthreads();
    // dx[i0.., c0..] (+)= P @ y[j0.., c0..], one BD-wide chunk at a time.
    for (int c0 = 0; c0 < c; c0 += L::BD) {
      if (j0 == 0) {
        zero_tile<BM, L::BD>(sm.acc, L::LDF_D);
      } else {
        load_tile<BM, L::BD>(sm.acc, L::LDF_D, dx, nx, c, i0, c0);
      }
      load_tile<BN, L::BD>(sm.yc, L::LD_D, y, ny, c, j0, c0);
      __syncthreads();
      tile_mma<true, true, BM, L::BD, BN>(sm.acc, L::LDF_D, sm.p, L::LDF_N, sm.yc, L::LD_D);
      __syncthreads();
      store_tile<BM, L::BD>(dx, nx, c, i0, c0, sm.acc, L::LDF_D);
      __syncthreads();
    }
  }
}

// dY: one block per (BN rows of y, batch element), over the row tiles of x.
__global__ void __launch_bounds__(kThreads, 2)
    contextual_backward_dy_kernel(const float* __restrict__ grad_s, const float* __restrict__ x,
                                  const float* __restrict__ y, const float* __restrict__ m,
                                  const int64_t* __restrict__ argmin, const float* __restrict__ s,
                                  const float* __restrict__ t, float* __restrict__ dy, ContextualShape shape,
                                  float bandwidth, float dist_eps, int64_t y_blocks) {
  using L = ContextualTiles;
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
    score_tile(sm.p, sm.xc, sm.yc, x, y, nx, ny, c, i0, j0);  // its barriers publish the row stats
    gradient_tile(sm, nx, ny, i0, j0);
    __syncthreads();
    // dy[j0.., c0..] (+)= P^T @ x[i0.., c0..], one BD-wide chunk at a time.
    for (int c0 = 0; c0 < c; c0 += L::BD) {
      if (i0 == 0) {
        zero_tile<BN, L::BD>(sm.acc, L::LDF_D);
      } else {
        load_tile<BN, L::BD>(sm.acc, L::LDF_D, dy, ny, c, j0, c0);
      }
      load_tile<BM, L::BD>(sm.xc, L::LD_D, x, nx, c, i0, c0);
      __syncthreads();
      // acc[j][k] += sum_i p[i][j] xc[i][k]
      tile_mma<false, true, BN, L::BD, BM>(sm.acc, L::LDF_D, sm.p, L::LDF_N, sm.xc, L::LD_D);
      __syncthreads();
      store_tile<BN, L::BD>(dy, ny, c, j0, c0, sm.acc, L::LDF_D);
      __syncthreads();
    }
  }
}

}  // namespace cuda
}  // namespace cocos_kernels
