// The forward of correspondence_warp on tensor cores where the query rows cannot stay resident: k x k
// windows (patch > 1: a score sums the k*k taps' products of C-wide rows, WarpGeometry) and prepared
// rows wider than forward_mma_kernel takes (D > kMmaForwardD; unfolded 3x3 patches reach 2304).
// float16/bfloat16 through mma.sync m16n8k16, float32 with precision tf32x3 or tf32 through m16n8k8,
// with the fragments, the online softmax and the epilogue of correspondence_warp_mma.cuh.
//
// A block of 8 warps owns 128 query centres (16 per warp) and a value chunk of CVT channels, and
// walks the 64-key blocks. Per key block one flat loop runs over the steps (tap, D chunk of DC
// columns: 64 for 16-bit rows, 32 for float32), prepared rows being one tap. Each step is a stage
// of a three-stage cp.async pipeline holding the tap-shifted query chunk (128 rows) and key chunk
// (64 rows), and adds their product to S (16 x 64 per warp, float registers); the pipeline runs on
// across key blocks, and a key block's value tile ([c][n]) joins its first step's copies, in one of
// two buffers by key block parity. After a key block's last step the window factors
// s = (raw - dwin m_i m_j) a_i a_j are applied in the registers (a lane holds rows g, g + 8 and
// columns 2t, 2t + 1 of each n8 tile), then the mask, the online softmax and O += P V
// (OnlineSoftmax, as forward_mma_kernel).
//
// Rows past the centres, keys past Nk and columns past D load as zeros; every tap of a centre lies
// on the padded grid (correspondence_warp.h), so the shifted row ranges need no other bound. The
// backward of windows and of these wide rows stays on the FMA kernels (correspondence_warp.cuh).
//
// Static estimate, C = 256 with 3x3 windows (D 2304), 16-bit, per key block: 192 rows x 2304 x 2 B of
// Q and K copied to shared memory (864 KiB; the value tile adds 2-8 KiB) for 2 x 128 x 64 x 2304 flops
// of S (37.7 M; O += P V adds 0.3-1 M): ~43 flops per byte copied (float32: ~22).
#pragma once

#include "correspondence_warp.h"
#include "correspondence_warp_mma.cuh"
#include "mma.cuh"
#include "tile.cuh"
#include "warp_geometry.cuh"

namespace cocos_kernels {
namespace cuda {

template <class T, int CVT>
struct StreamedTiles {
  static constexpr int DC = kIsFloat<T> ? 32 : 64;  // feature columns per step
  using Rows = MmaTiles<T, DC, CVT>;                  // the strides of forward_mma_kernel's tiles
  static constexpr int LD_D = Rows::LD_D, LD_N = Rows::LD_N;
  static constexpr int kStages = 3;  // one barrier per step: step i + 2 refills step i - 1's stage
  static constexpr int STAGE = (kMmaRows + kMmaBN) * LD_D;  // the query chunk's rows, then the key chunk's
  static constexpr int VAL = CVT * LD_N;                    // a value tile, [c][n]
  static constexpr size_t kBytes = (kStages * STAGE + 2 * VAL) * sizeof(T);
};

// Calls f(P, CVT) (std::integral_constant) with the precision and the value chunk's width.
template <class T, class F>
auto with_streamed_tiles(const WarpShape& s, Precision precision, F&& f) {
  return with_precision<T>(precision, [&](auto p) {
    return s.cv <= 16 ? f(p, std::integral_constant<int, 16>{}) : f(p, std::integral_constant<int, 64>{});
  });
}

template <class T, Precision P, int CVT>
__global__ void __launch_bounds__(kThreads, 1)
    forward_streamed_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const uint8_t* __restrict__ key_mask, T* __restrict__ out, float* __restrict__ lse,
                                WarpShape shape, WarpGeometry geometry, float scale_log2, MmaGrid grid) {
  using L = StreamedTiles<T, CVT>;
  constexpr int BN = kMmaBN, DC = L::DC, STAGES = L::kStages;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const stages = reinterpret_cast<T*>(smem);
  T* const vs = stages + STAGES * L::STAGE;  // two value tiles, by key block parity

  const int64_t block = blockIdx.x;
  const int64_t m0 = (block % grid.row_blocks) * kMmaRows;
  const int64_t c0 = (block / grid.row_blocks % grid.cv_chunks) * CVT;
  const int64_t b = block / grid.row_blocks / grid.cv_chunks;
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  q += (b * geometry.len_q + geometry.lo_q) * d;  // centre 0's row
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  if (key_mask != nullptr) key_mask += b * nk;
  const Factors factors(geometry, b, nq, nk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;
  const int64_t row0 = m0 + 16 * warp + lane / 4;  // the lane's rows row0, row0 + 8

  const int patch = geometry.patch, chunks = (d + DC - 1) / DC;
  // Steps per key block: at least 2 (patch > 1, or D > kMmaForwardD > DC), so a value buffer is
  // refilled only after the key block two back is done with it.
  const int steps = patch * patch * chunks;
  const int64_t total = ceil_div(nk, BN) * steps;
  // Copies step i's query and key chunks to its stage and, at a key block's first step, the block's values.
  auto fetch = [&](int64_t i) {
    const int64_t j = i / steps;
    const int r = static_cast<int>(i % steps), tap = r / chunks, d0 = r % chunks * DC;
    T* const st = stages + i % STAGES * L::STAGE;
    load_tile_async<kMmaRows, DC>(st, L::LD_D, q + tap_offset(patch, geometry.width_q, tap) * d, nq, d, m0, d0);
    load_tile_async<BN, DC>(st + kMmaRows * L::LD_D, L::LD_D, k + tap_offset(patch, geometry.width_k, tap) * d, nk,
                            d, j * BN, d0);
    if (r == 0) load_tile_async<CVT, BN>(vs + j % 2 * L::VAL, L::LD_N, v, cv, nk, c0, j * BN);
  };

  float mq[2] = {}, aq[2] = {};  // the window factors of rows row0, row0 + 8
  if (factors.mq != nullptr) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mq[r] = centre_factor(factors.mq, nq, row0 + 8 * r);
      aq[r] = centre_factor(factors.aq, nq, row0 + 8 * r);
    }
  }
  OnlineSoftmax<T, P, CVT> softmax;
  float s[BN / 8][4] = {};
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < total) fetch(i);
    cp_async_commit();
  }
  for (int64_t i = 0; i < total; ++i) {
    cp_async_wait<STAGES - 2>();  // step i's group is complete
    __syncthreads();  // its copies are visible, and every warp is done with step i - 1's stage
    if (i + STAGES - 1 < total) fetch(i + STAGES - 1);  // into step i - 1's stage
    cp_async_commit();  // possibly empty: every iteration commits exactly one group

    const T* const st = stages + i % STAGES * L::STAGE;
    const int r = static_cast<int>(i % steps), d0 = r % chunks * DC;
    const int k_steps = ((d - d0 < DC ? d - d0 : DC) + kMmaK<T> - 1) / kMmaK<T>;  // the rest of DC is zeros
    ResidentA<T, P, DC> qf = {};
    row_fragments<T, DC>(qf, st, L::LD_D, k_steps);
    mma_tile<true>(s, qf, st + kMmaRows * L::LD_D, L::LD_D, k_steps, BN / 16, lane);  // S += Q K^T, K stored [n][d]
    if (r < steps - 1) continue;

    const int64_t j = i / steps, n0 = j * BN;
    if (factors.mq != nullptr) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // the lane's columns n0 + 8 nt + 2 t + c
          const int64_t n = n0 + 8 * nt + 2 * t + c;
          const float mk = centre_factor(factors.mk, nk, n), ak = centre_factor(factors.ak, nk, n);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& x = s[nt][2 * h + c];
            x = (x - factors.dwin * mq[h] * mk) * (aq[h] * ak);
          }
        }
      }
    }
    softmax.add(s, KeyBlock(key_mask, nk, n0), scale_log2, vs + j % 2 * L::VAL, L::LD_N, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
    }
  }
  softmax.store(out + b * cv * nq, lse + b * nq, row0, nq, cv, c0, lane);
}

}  // namespace cuda
}  // namespace cocos_kernels
