// The forward of correspondence_warp for float16/bfloat16 prepared rows (patch 1, D <= 256), built
// as FlashAttention-2 builds it, from the PTX operations of mma.cuh (sm_80 and newer):
//
// One block of 8 warps per (BM = 128 query rows, value-channel chunk of CVT, batch element); warp w
// owns query rows 16 w .. 16 w + 15. The Q tile is copied to shared memory once and held as mma
// A fragments in registers for the whole key loop; key blocks of 64 keys (the K tile and the value
// tile) stream through a two-stage cp.async pipeline, 16 bytes per copy. Per key block each warp
// computes its 16 x 64 score tile with mma.sync m16n8k16 into float registers, runs the online
// softmax (base 2, running max per row) on those registers (a row's 64 scores sit in the 4 lanes
// of a quad: two xor shuffles reduce it), converts P to the input dtype in place as the A fragments
// of the value product, and accumulates O (16 x CVT, float) in registers. Nothing round-trips
// through shared memory but the copies; no atomics.
//
// D is padded to DT (64, 128 or 256) in the tiles and the fragments, the value chunk to CVT (16 or
// 64) channels: Cv = 3 pays for 16, not 64. Rows whose D (or, for values, Nk) is not a multiple of
// 8, or whose base is not 16-byte aligned, are loaded element by element instead of with cp.async.
#pragma once

#include "correspondence_warp.h"
#include "mma.cuh"
#include "tile.cuh"

namespace cocos_kernels {
namespace cuda {

constexpr int kMmaBM = 128;  // query rows per block, 16 per warp
constexpr int kMmaBN = 64;   // keys per pipeline stage
constexpr int kMmaMaxD = 256;
static_assert(kMmaBM == 16 * kWarps && kMmaBM == 2 * kMmaBN, "Q is staged in the two K stages");

// Whether correspondence_warp_forward<T> runs forward_mma_kernel for this input.
template <class T>
bool uses_mma_forward(const WarpShape& s, const WarpGeometry& g) {
  return !std::is_same_v<T, float> && g.patch == 1 && s.d <= kMmaMaxD;
}

// Calls f(DT, CVT) (std::integral_constant) with the padded widths of D and of the value chunk.
template <class F>
auto with_mma_tiles(const WarpShape& s, F&& f) {
  auto by_cv = [&](auto dt) {
    return s.cv <= 16 ? f(dt, std::integral_constant<int, 16>{}) : f(dt, std::integral_constant<int, 64>{});
  };
  if (s.d <= 64) return by_cv(std::integral_constant<int, 64>{});
  if (s.d <= 128) return by_cv(std::integral_constant<int, 128>{});
  return by_cv(std::integral_constant<int, kMmaMaxD>{});
}

template <class T, int DT, int CVT>
struct MmaForwardTiles {
  // Element strides of the shared rows: 16 bytes of padding put ldmatrix's 8 rows in distinct banks.
  static constexpr int LD_D = DT + 8;
  static constexpr int LD_N = kMmaBN + 8;
  static constexpr int K_STAGE = kMmaBN * LD_D;  // elements
  static constexpr int V_STAGE = CVT * LD_N;
  static constexpr size_t kBytes = (2 * K_STAGE + 2 * V_STAGE) * sizeof(T);
  // Blocks per SM the register file must hold: 2 (128 registers a thread) where the fragments
  // live across the key loop (Q: DT / 4 registers, O: CVT / 2, S: 32) leave ptxas room enough
  // not to spill, else 1 (8 warps an SM, as FlashAttention-2's two blocks of 4).
  static constexpr int kMinBlocks = DT / 4 + CVT / 2 + kMmaBN / 2 < 80 ? 2 : 1;
};

// One launch's grid: blocks iterate over (batch, value chunk, query block), the query block fastest.
struct MmaForwardGrid {
  int64_t m_blocks, cv_chunks;
  MmaForwardGrid(const WarpShape& s, int cvt)
      : m_blocks(ceil_div(s.nq, kMmaBM)), cv_chunks(s.cv > 0 ? ceil_div(s.cv, cvt) : 1) {}
  int64_t blocks(const WarpShape& s) const { return s.batch * cv_chunks * m_blocks; }
};

// dst[r][c] = src[r0 + r][c0 + c] for an R x COLS tile of a row-major (rows x cols) matrix, zero
// outside it. 16-byte cp.async copies (complete at the caller's cp_async_wait) where every row
// starts 16-byte aligned, else load_tile's element copies (complete at once).
template <int R, int COLS, class T>
__device__ __forceinline__ void load_tile_async(T* dst, int ldd, const T* src, int64_t rows, int64_t cols,
                                                int64_t r0, int64_t c0) {
  static_assert(COLS % 8 == 0, "whole 16-byte chunks");
  if (cols % 8 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    load_tile<R, COLS>(dst, ldd, src, rows, cols, r0, c0);
    return;
  }
  constexpr int CHUNKS = COLS / 8;
  for (int i = threadIdx.x; i < R * CHUNKS; i += kThreads) {
    const int r = i / CHUNKS, c = i % CHUNKS * 8;
    const int64_t gr = r0 + r, gc = c0 + c;
    const bool valid = gr < rows && gc < cols;  // a chunk is all in or all out: cols % 8 == 0
    cp_async_16(dst + r * ldd + c, valid ? src + gr * cols + gc : src, valid);
  }
}

// This lane's ldmatrix row address for the four 8 x 8 matrices of a 16 x 16 tile at (r0, c0) of
// a shared tile with row stride ld, ordered (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows
// 8-15, cols 0-7), (rows 8-15, cols 8-15): for a tile stored [n][k] these are the B fragments
// (registers 0, 1 and 2, 3) of the n8 tiles n0 and n0 + 8.
template <class T>
__device__ __forceinline__ const T* b_rows(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + lane / 16 * 8 + lane % 8) * ld + c0 + lane / 8 % 2 * 8;
}

template <class T, int DT, int CVT>
__global__ void __launch_bounds__(kThreads, (MmaForwardTiles<T, DT, CVT>::kMinBlocks))
    forward_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const uint8_t* __restrict__ key_mask, T* __restrict__ out, float* __restrict__ lse,
                       WarpShape shape, float scale_log2, MmaForwardGrid grid) {
  using L = MmaForwardTiles<T, DT, CVT>;
  constexpr int BN = kMmaBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const ks = reinterpret_cast<T*>(smem);  // two K stages; the Q tile before the key loop
  T* const vs = ks + 2 * L::K_STAGE;         // two value stages, vs[c][n] = v[c0 + c][n0 + n]

  const int64_t block = blockIdx.x;
  const int64_t m0 = (block % grid.m_blocks) * kMmaBM;
  const int64_t c0 = (block / grid.m_blocks % grid.cv_chunks) * CVT;
  const int64_t b = block / grid.m_blocks / grid.cv_chunks;
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  q += b * nq * d;
  k += b * nk * d;
  v += b * cv * nk;
  if (key_mask != nullptr) key_mask += b * nk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;        // this lane's columns in a fragment: 2 t, 2 t + 1
  const int d_steps = (d + 15) / 16;  // k16 steps of the score product; the rest of DT is zeros

  // The warp's 16 x DT slice of Q as A fragments, for the whole key loop.
  load_tile_async<kMmaBM, DT>(ks, L::LD_D, q, nq, d, m0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[DT / 16][4] = {};
#pragma unroll
  for (int s = 0; s < DT / 16; ++s) {
    if (s < d_steps) ldmatrix_x4<false>(qf[s], ks + (16 * warp + lane % 16) * L::LD_D + 16 * s + lane / 16 * 8);
  }
  __syncthreads();  // the stages are free for the keys

  // Rows g = lane / 4 and g + 8 of the warp's 16: running max (base 2), and this lane's share of
  // the row sum (its quad's four shares are added at the end).
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.0f, 0.0f};
  float o[CVT / 8][4] = {};
  const int64_t n_blocks = ceil_div(nk, BN);
  auto fetch = [&](int64_t n0, int stage) {
    load_tile_async<BN, DT>(ks + stage * L::K_STAGE, L::LD_D, k, nk, d, n0, 0);
    load_tile_async<CVT, BN>(vs + stage * L::V_STAGE, L::LD_N, v, cv, nk, c0, n0);
  };
  if (n_blocks > 0) fetch(0, 0);
  cp_async_commit();
  for (int64_t j = 0; j < n_blocks; ++j) {
    const int stage = j % 2;
    if (j + 1 < n_blocks) fetch((j + 1) * BN, stage ^ 1);
    cp_async_commit();  // possibly empty: every iteration commits exactly one group
    cp_async_wait<1>();  // block j's group is complete (block j + 1's may be in flight)
    __syncthreads();
    const T* kt = ks + stage * L::K_STAGE;
    const T* vt = vs + stage * L::V_STAGE;

    float s[BN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < DT / 16; ++kk) {
      if (kk >= d_steps) continue;
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t f[4];
        ldmatrix_x4<false>(f, b_rows(kt, L::LD_D, 16 * nn, 16 * kk, lane));
        const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
        mma_16816<T>(s[2 * nn], qf[kk], lo);
        mma_16816<T>(s[2 * nn + 1], qf[kk], hi);
      }
    }

    // Online softmax; s[nt][e] is the score of row g + 8 (e / 2) and key n0 + 8 nt + 2 t + e % 2.
    const int64_t n0 = j * BN;
    const int keys = nk - n0 < BN ? static_cast<int>(nk - n0) : BN;  // keys in this block
    const uint8_t* block_mask = key_mask == nullptr ? nullptr : key_mask + n0;
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 8 * nt + 2 * t + e % 2;
        const bool kept = n < keys && (block_mask == nullptr || block_mask[n] != 0);
        s[nt][e] = kept ? s[nt][e] * scale_log2 : kNegInf;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
      }
    }
    float shift[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // -inf while every key so far is masked out: shift by 0 so the exps are 0, not NaN.
      shift[r] = new_max == kNegInf ? 0.0f : new_max;
      alpha[r] = exp2f(row_max[r] - shift[r]);
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - shift[e / 2]);
        row_sum[e / 2] += s[nt][e];
      }
    }
#pragma unroll
    for (int c = 0; c < CVT / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[c][e] *= alpha[e / 2];
    }

    // O += P V: the accumulators of n8 tiles 2 kk and 2 kk + 1 are the A fragment of keys 16 kk ..
    // 16 kk + 15 (P rounded to T, as in the other kernels).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const float* p0 = s[2 * kk];
      const float* p1 = s[2 * kk + 1];
      const uint32_t a[4] = {pack2(from_float<T>(p0[0]), from_float<T>(p0[1])),
                             pack2(from_float<T>(p0[2]), from_float<T>(p0[3])),
                             pack2(from_float<T>(p1[0]), from_float<T>(p1[1])),
                             pack2(from_float<T>(p1[2]), from_float<T>(p1[3]))};
#pragma unroll
      for (int cc = 0; cc < CVT / 16; ++cc) {
        uint32_t f[4];
        ldmatrix_x4<false>(f, b_rows(vt, L::LD_N, 16 * cc, 16 * kk, lane));
        const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
        mma_16816<T>(o[2 * cc], a, lo);
        mma_16816<T>(o[2 * cc + 1], a, hi);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // out (Cv, Nq), lse (natural log) from the first chunk's blocks.
  out += b * cv * nq;
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    inv[r] = row_sum[r] == 0.0f ? 0.0f : 1.0f / row_sum[r];  // 0: every key masked out, and o is 0 too
  }
  const int64_t row0 = m0 + 16 * warp + lane / 4;
#pragma unroll
  for (int c = 0; c < CVT / 8; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = row0 + 8 * (e / 2), ch = c0 + 8 * c + 2 * t + e % 2;
      if (m < nq && ch < cv) out[ch * nq + m] = from_float<T>(o[c][e] * inv[e / 2]);
    }
  }
  if (c0 == 0 && t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row0 + 8 * r < nq) lse[b * nq + row0 + 8 * r] = (row_max[r] + log2f(row_sum[r])) * kLn2;
    }
  }
}

}  // namespace cuda
}  // namespace cocos_kernels
