// The kernels of correspondence_warp on tensor cores where the rows cannot stay resident: k x k
// windows (patch > 1: a score sums the k*k taps' products of C-wide rows, WarpGeometry) and prepared
// rows wider than the kernels of correspondence_warp_mma.cuh take (forward D > kMmaForwardD,
// backward beyond uses_mma_backward; unfolded 3x3 patches reach 2304). float16/bfloat16 through
// mma.sync m16n8k16, float32 with precision tf32x3 or tf32 through m16n8k8, with the fragments, the
// online softmax and the epilogue of correspondence_warp_mma.cuh.
//
// A block of 8 warps owns 128 resident centres (16 per warp) and walks the other side's blocks of
// BN centres (the forward 128, or 64 with the wide value class, kStreamedForwardKeys; the backward
// 64). Per streamed block the score steps (tap, D chunk of DC columns: 64 for 16-bit rows, 32 for
// float32; prepared rows are one tap) build S = R X^T (StreamedScores): each step is a stage of a
// cp.async pipeline (three stages; the backward's wide dQ and dK blocks two, StreamedBackwardTiles)
// holding the tap-shifted resident chunk (128 rows) and streamed chunk (BN rows), and adds their
// product to S (16 x BN per warp, float registers); the pipeline runs on across blocks, and a
// block's value-like tile ([c][n]) joins its first step's copies, in one of two buffers by block
// parity.
// After the last score step the window factors s = (raw - dwin m_r m_c) a_r a_c are applied in the
// registers (a lane holds rows g, g + 8 and columns 2t, 2t + 1 of each n8 tile).
// - forward: 128 queries and a value chunk per block (16 or 64 channels; Cv > 64: up to 128,
//   StreamedForwardChunk); per key block the mask, the online softmax and O += P V (OnlineSoftmax, as
//   forward_mma_kernel). Each chunk computes all of S again.
// - backward (Cv <= 64, 16-bit Cv <= 192: dP needs every channel in one block), dQ over query
//   blocks and dK/dV over key blocks (backward_streamed_mma_kernel): per streamed block P, dP, dS and
//   H = dS a_r a_c in registers (dK/dV: dV += P^T dOut; at Cv > 64 the wide value tiles, dV in
//   dV-only blocks that recompute S and P); per group of G streamed blocks (kStreamedBackwardGroup) a
//   second pass of steps streams the group's rows again, X_t[:, chunk] of G x 64 rows per (tap,
//   chunk), for the plane pieces [H_1 .. H_G] X_t (9 taps x C accumulators do not fit in
//   registers): each piece (16 x DC a warp) is added to the float32 plane of its tap in global
//   memory, read and written by the owning block only (its first group overwrites): no atomics,
//   deterministic. 16-bit P and H enter their products rounded to T.
//
// Rows past the centres, keys past Nk and columns past D load as zeros; every tap of a centre lies
// on the padded grid (correspondence_warp.h), so the shifted row ranges need no other bound.
//
// Static estimates, C = 256 with 3x3 windows (D 2304), 16-bit, per streamed block. Forward (128
// keys): 256 rows x 2304 x 2 B of Q and K copied to shared memory (1152 KiB; the value tile adds
// 4-16 KiB) for 2 x 128 x 128 x 2304 flops of S (75.5 M; O += P V adds 0.5-2 M): ~64 flops per
// byte copied (float32: ~32; with value chunks of 64, in 64-key blocks, ~21). The wide value class
// (64 keys): 192 rows (864 KiB) for 37.7 M flops of S, ~43 flops per byte; at ADE20K's Cv 151 its
// 2 chunks copy what 3 chunks of 64 in 128-key blocks did, for two thirds of their S. Backward (64 keys;
// dQ and dK/dV alike): 192 rows of Q and K chunks (864 KiB), 288 KiB for the second pass over the
// streamed chunks and a third of the planes' read-modify-write (128 x 2304 floats read and written
// per group of 3 blocks: 2304 KiB, 768 KiB a block) for 75.5 M flops (S and H X_t; dP and dV add up
// to 2 M): ~0.026 bytes per flop, 40% of them the planes' (a group of one block: ~0.047, two thirds
// the planes'). Float32 (twice the chunk bytes): ~0.047 in groups of 2, ~0.0625 in groups of 1. With
// the wide value tiles (ADE20K's Cv 154, 160 channels) dP adds 2.6 M flops a block, and the dV-only
// blocks' 864 KiB of chunks for S (37.7 M flops) and P^T dOut (2.6 M): the backward's flops grow by
// a quarter (S thrice where it was twice, beside H X_t twice).
#pragma once

#include "correspondence_warp.h"
#include "correspondence_warp_mma.cuh"
#include "mma.cuh"
#include "tile.cuh"
#include "warp_geometry.cuh"

namespace cocos_kernels {
namespace cuda {

// The shared memory of a kernel streaming blocks of BN centres through STAGES pipeline stages.
template <class T, int CVT, int BN, int STAGES = 3>
struct StreamedTiles {
  static constexpr int DC = kIsFloat<T> ? 32 : 64;  // feature columns per step
  using Rows = MmaTiles<T, DC, CVT>;                  // the strides of forward_mma_kernel's tiles
  static constexpr int LD_D = Rows::LD_D, LD_R = Rows::LD_R;
  static constexpr int LD_N = BN + 8;  // value-like tiles [c][BN], padded as Rows::LD_N
  // One barrier per step: step i + STAGES - 1 refills step i - 1's stage.
  static constexpr int kStages = STAGES;
  static constexpr int STAGE = (kMmaRows + BN) * LD_D;  // the resident chunk's rows, then the streamed chunk's
  static constexpr int VAL = CVT * LD_N;                // a streamed value-like tile, [c][n]
  static constexpr size_t kBytes = (kStages * STAGE + 2 * VAL) * sizeof(T);
};

// Keys per block of the streamed forward: a key block's score steps copy 128 + 128 rows for
// 128 x 128 scores (S: 16 x 128 floats a warp, 64 registers), where 64-key blocks copy 192 rows for
// half the scores. The backward streams blocks of kMmaBN (S, dP and H of a block in registers).
constexpr int kStreamedForwardBN = 128;
// The forward's wide value class (Cv > kStreamedHeldCv): every value chunk recomputes all of S, so
// Cv 65..256 takes ceil(Cv / 128) chunks of O (16 x 128 floats a warp, 64 registers) in 64-key
// blocks (S: 32 registers), the registers of value chunks of 64 beside 128-key blocks. The chunks
// are sized at run time (StreamedForwardChunk). Float32 too: its three stages and two value tiles
// take 153 KiB.
constexpr int kStreamedWideForwardCv = 128;
// The forward's key block for T and CVT: kMmaBN for the wide class (its registers) and where the
// stages and the two value tiles of kStreamedForwardBN keys would not fit sm_80's shared memory
// (float32 rows with value chunks of 64: 176 KiB).
template <class T, int CVT>
constexpr int kStreamedForwardKeys =
    CVT != kStreamedWideForwardCv && StreamedTiles<T, CVT, kStreamedForwardBN>::kBytes <= kMmaSharedLimit
        ? kStreamedForwardBN
        : kMmaBN;

// The forward's value chunks for class CVT at a launch's Cv: CVT channels, or (wide class) Cv split
// evenly over ceil(Cv / CVT) chunks, padded to 16 (Cv 151: two of 80, not 128 and 23); the grid's
// chunk i starts at channel i * width. The wide class's value tile and O += P V take a chunk's
// channels up to Cv padded to 16, no mma past them; the classes of 16 and 64 take all CVT (bounds
// known at compile time).
template <int CVT>
struct StreamedForwardChunk {
  static constexpr bool kWide = CVT == kStreamedWideForwardCv;
  int width;
  __host__ __device__ explicit StreamedForwardChunk(int cv) : width(CVT) {
    if (kWide) {  // Cv > kStreamedHeldCv
      const int chunks = (cv + CVT - 1) / CVT;
      width = ((cv + chunks - 1) / chunks + 15) / 16 * 16;  // ceil(Cv / width) is chunks too
    }
  }
  // The channels of the chunk at c0 that the value tile and O += P V take.
  __host__ __device__ int channels(int cv, int c0) const {
    const int rest = (cv - c0 + 15) / 16 * 16;
    return !kWide ? CVT : rest < width ? rest : width;
  }
  // The end of the output channels the chunk at c0 writes (the wide class's O holds the next chunk's
  // channels as zeros).
  __host__ __device__ int end(int cv, int c0) const { return kWide && c0 + width < cv ? c0 + width : cv; }
};

// The backward's value-like tiles: classes of 16 and 64 channels (dP from value fragments held in
// registers, dV accumulated beside dK), and for 16-bit T the wide class of kStreamedWideCv: tiles
// of Cv padded to 16 (sized at run time; ADE20K's 151 labels and 3 image channels take 160), dP in
// 16-channel steps whose A fragments are read from the resident tile per step (the registers of the
// 16-channel class), and dV in dV-only blocks (G 0): 16 x 192 dV floats a warp (96 registers)
// do not fit beside S, dP and the group's H. Float32 value tiles that wide would not fit beside
// the stages (twice the bytes): float32 with Cv > 64 takes the shared-memory kernels.
constexpr int kStreamedHeldCv = 64;
constexpr int kStreamedWideCv = 192;
template <class T>
constexpr int kStreamedMaxBackwardCv = kIsFloat<T> ? kStreamedHeldCv : kStreamedWideCv;

// The tiles of backward_streamed_mma_kernel for class CVT and group G (0: dV-only blocks) at a
// launch's Cv: value-like tiles of `channels` rows, and for dQ and dK the resident value-like tile
// ([c][row]: dOut for dQ, V for dK/dV). The wide dQ and dK blocks run two stages: with three their
// tiles fit sm_80 up to 144 channels only (168.5 KiB at 160); 192 channels take 159 KiB with two.
template <class T, int CVT, int G>
struct StreamedBackwardTiles : StreamedTiles<T, CVT, kMmaBN, (CVT > kStreamedHeldCv && G > 0) ? 2 : 3> {
  using Base = StreamedTiles<T, CVT, kMmaBN, (CVT > kStreamedHeldCv && G > 0) ? 2 : 3>;
  static constexpr bool kWide = CVT > kStreamedHeldCv;
  int channels;  // CVT, or (wide) Cv padded to 16
  __host__ __device__ explicit StreamedBackwardTiles(int cv)
      : channels(!kWide ? CVT : (cv + 15) / 16 * 16 < CVT ? (cv + 15) / 16 * 16 : CVT) {}
  __host__ __device__ int val() const { return channels * Base::LD_N; }  // a streamed value-like tile
  __host__ __device__ size_t bytes() const {
    return (Base::kStages * Base::STAGE + 2 * val() + (G > 0 ? channels * Base::LD_R : 0)) * sizeof(T);
  }
};

// Streamed blocks per plane pass of the backward for T, P and CVT: the plane pieces of a group of G
// blocks, [H_1 .. H_G] times the chunks of their G x kMmaBN rows (one stage: G <= 3), go to the
// planes in one read-modify-write. The group's H fragments stay in registers (a block's: 16 for
// 16-bit T, 32 floats for float32); what ptxas -v fits without spills on sm_80 and sm_90a: 16-bit 3,
// float32 2, tf32x3 with value chunks of 64 1.
template <class T, Precision P, int CVT>
constexpr int kStreamedBackwardGroup = !kIsFloat<T> ? 3 : P == Precision::kTf32x3 && CVT == 64 ? 1 : 2;

// Whether correspondence_warp_backward<T> runs the streamed backward: windows and the prepared rows
// the register-resident backward does not take, on tensor cores (float32 ieee takes FMAs), with Cv
// up to kStreamedMaxBackwardCv<T>.
template <class T>
bool uses_streamed_mma_backward(const WarpShape& s, const WarpGeometry& g, Precision p) {
  return (!kIsFloat<T> || p != Precision::kIeee) && s.cv <= kStreamedMaxBackwardCv<T> &&
         !uses_mma_backward<T>(s, g, p);
}

// The backward's grid: one block per 128 resident centres (query centres for dQ, key centres for
// dK/dV) and batch element; dV-only blocks add chunks of CVT channels.
inline MmaGrid streamed_backward_grid(int64_t rows) { return {ceil_div(rows, kMmaRows), 1}; }
inline MmaGrid streamed_dv_grid(const WarpShape& s, int cvt) { return {ceil_div(s.nk, kMmaRows), ceil_div(s.cv, cvt)}; }

// Calls f(P, CVT) (std::integral_constant) with the precision and the value class: 16, 64.
template <class T, class F>
auto with_streamed_held_tiles(const WarpShape& s, Precision precision, F&& f) {
  return with_precision<T>(precision, [&](auto p) {
    return s.cv <= 16 ? f(p, std::integral_constant<int, 16>{}) : f(p, std::integral_constant<int, 64>{});
  });
}

// The same for the forward: at Cv > 64 its wide class, kStreamedWideForwardCv.
template <class T, class F>
auto with_streamed_tiles(const WarpShape& s, Precision precision, F&& f) {
  if (s.cv > kStreamedHeldCv) {
    return with_precision<T>(precision,
                             [&](auto p) { return f(p, std::integral_constant<int, kStreamedWideForwardCv>{}); });
  }
  return with_streamed_held_tiles<T>(s, precision, f);
}

// The same for the backward: at Cv > 64 (16-bit T) its wide class, kStreamedWideCv.
template <class T, class F>
auto with_streamed_backward_tiles(const WarpShape& s, Precision precision, F&& f) {
  if constexpr (!kIsFloat<T>) {
    if (s.cv > kStreamedHeldCv) {
      return with_precision<T>(precision, [&](auto p) { return f(p, std::integral_constant<int, kStreamedWideCv>{}); });
    }
  }
  return with_streamed_held_tiles<T>(s, precision, f);
}

// The steps of the score product S = R X^T of a block's 128 resident centres (R) and a streamed
// block of BN (X): step r is tap r / chunks, columns r % chunks * DC on; a score sums every step.
template <class T, int BN>
struct StreamedScores {
  using L = StreamedTiles<T, 16, BN>;  // the row tiles do not depend on the value chunk
  static constexpr int DC = L::DC;
  const T *resident, *streamed;  // centre 0's row
  int64_t resident_count, streamed_count, resident_width, streamed_width;
  int d, patch, chunks;

  __device__ StreamedScores(const T* r, int64_t r_count, int64_t r_width, const T* x, int64_t x_count,
                            int64_t x_width, int d, int patch)
      : resident(r), streamed(x), resident_count(r_count), streamed_count(x_count), resident_width(r_width),
        streamed_width(x_width), d(d), patch(patch), chunks((d + DC - 1) / DC) {}
  __device__ int steps() const { return patch * patch * chunks; }
  __device__ int tap(int r) const { return r / chunks; }
  __device__ int column(int r) const { return r % chunks * DC; }
  __device__ int width(int r) const { return d - column(r) < DC ? d - column(r) : DC; }  // the rest of DC is zeros

  // Copies step r's resident chunk (rows r0 ..) and streamed chunk (n0 ..) to its stage.
  __device__ __forceinline__ void fetch(T* stage, int r, int64_t r0, int64_t n0) const {
    load_tile_async<kMmaRows, DC>(stage, L::LD_D, resident + tap_offset(patch, resident_width, tap(r)) * d,
                                  resident_count, d, r0, column(r));
    fetch_streamed<BN>(stage + kMmaRows * L::LD_D, r, n0);
  }
  // Copies step r's chunk of N streamed rows (n0 ..) to dst, stride L::LD_D.
  template <int N>
  __device__ __forceinline__ void fetch_streamed(T* dst, int r, int64_t n0) const {
    load_tile_async<N, DC>(dst, L::LD_D, streamed + tap_offset(patch, streamed_width, tap(r)) * d, streamed_count,
                           d, n0, column(r));
  }

  // s (the warp's 16 x BN) += step r's product.
  template <Precision P>
  __device__ __forceinline__ void add(float (&s)[BN / 8][4], const T* stage, int r, int lane) const {
    const int k_steps = (width(r) + kMmaK<T> - 1) / kMmaK<T>;
    ResidentA<T, P, DC> rf = {};
    row_fragments<T, DC>(rf, stage, L::LD_D, k_steps);
    mma_tile<true>(s, rf, stage + kMmaRows * L::LD_D, L::LD_D, k_steps, BN / 16, lane);  // X stored [n][d]
  }
};

// The pipeline of L's stages over a flat sequence of `total` steps, running on across blocks:
// fetch(i, stage) copies step i's operands. Every call commits exactly one (possibly empty) group.
template <class L, class T, class Fetch>
__device__ __forceinline__ void start_pipeline(T* stages, int64_t total, Fetch&& fetch) {
#pragma unroll
  for (int i = 0; i < L::kStages - 1; ++i) {
    if (i < total) fetch(i, stages + i * L::STAGE);
    cp_async_commit();
  }
}
// Waits for step i's copies, issues step i + kStages - 1's (into step i - 1's stage) and returns step i's stage.
template <class L, class T, class Fetch>
__device__ __forceinline__ const T* next_stage(T* stages, int64_t i, int64_t total, Fetch&& fetch) {
  constexpr int STAGES = L::kStages;
  cp_async_wait<STAGES - 2>();  // step i's group is complete
  __syncthreads();  // its copies are visible, and every warp is done with step i - 1's stage
  if (i + STAGES - 1 < total) fetch(i + STAGES - 1, stages + (i + STAGES - 1) % STAGES * L::STAGE);
  cp_async_commit();
  return stages + i % STAGES * L::STAGE;
}

// The window factors of a block's scores s = (raw - dwin m_r m_c) a_r a_c: those of the warp's
// resident rows g and g + 8 (m_r, a_r, held) and the streamed side's (m_c, a_c per column).
struct WindowFactors {
  const float *mc, *ac;
  int64_t count;  // streamed centres
  float dwin, mr[2] = {}, ar[2] = {};
  __device__ WindowFactors(const float* m_rows, const float* a_rows, int64_t rows, int64_t row0, const float* m_cols,
                           const float* a_cols, int64_t cols, float dwin)
      : mc(m_cols), ac(a_cols), count(cols), dwin(dwin) {
    if (m_rows == nullptr) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mr[h] = centre_factor(m_rows, rows, row0 + 8 * h);
      ar[h] = centre_factor(a_rows, rows, row0 + 8 * h);
    }
  }
  __device__ float m(int64_t n) const { return centre_factor(mc, count, n); }
  __device__ float a(int64_t n) const { return centre_factor(ac, count, n); }
  // Applies them to the raw scores of the streamed block at n0 (a lane holds columns 2t, 2t + 1 of each n8 tile).
  template <int NT>
  __device__ __forceinline__ void apply(float (&s)[NT][4], int64_t n0, int t) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t n = n0 + 8 * nt + 2 * t + c;
        const float mn = m(n), an = a(n);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& x = s[nt][2 * h + c];
          x = (x - dwin * mr[h] * mn) * (ar[h] * an);
        }
      }
    }
  }
};

// BN: the key block, kStreamedForwardKeys<T, CVT> (a template argument: the launch plans name it).
template <class T, Precision P, int CVT, int BN>
__global__ void __launch_bounds__(kThreads, 1)
    forward_streamed_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const uint8_t* __restrict__ key_mask, T* __restrict__ out, float* __restrict__ lse,
                                WarpShape shape, WarpGeometry geometry, float scale_log2, MmaGrid grid) {
  using L = StreamedTiles<T, CVT, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const stages = reinterpret_cast<T*>(smem);
  T* const vs = stages + L::kStages * L::STAGE;  // two value tiles, by key block parity

  const int64_t block = blockIdx.x;
  const int d = shape.d, cv = shape.cv;
  const StreamedForwardChunk<CVT> chunk(cv);
  const int64_t m0 = grid.row0(block), c0 = grid.chunk(block) * chunk.width, b = grid.batch(block);
  const int channels = chunk.channels(cv, static_cast<int>(c0));  // the value tile's rows, and O += P V's
  const int64_t nq = shape.nq, nk = shape.nk;
  q += (b * geometry.len_q + geometry.lo_q) * d;  // centre 0's row
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  if (key_mask != nullptr) key_mask += b * nk;
  const Factors f(geometry, b, nq, nk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = m0 + 16 * warp + lane / 4;  // the lane's rows row0, row0 + 8
  const StreamedScores<T, BN> scores(q, nq, geometry.width_q, k, nk, geometry.width_k, d, geometry.patch);
  const WindowFactors factors(f.mq, f.aq, nq, row0, f.mk, f.ak, nk, f.dwin);

  // Steps per key block: at least 2 (patch > 1, or D > kMmaForwardD > DC), so a value buffer is
  // refilled only after the key block two back is done with it.
  const int steps = scores.steps();
  const int64_t blocks = ceil_div(nk, BN), total = blocks * steps;
  // Copies step i's query and key chunks and, at a key block's first step, the block's values.
  auto fetch = [&](int64_t i, T* stage) {
    const int64_t j = i / steps;
    const int r = static_cast<int>(i % steps);
    scores.fetch(stage, r, m0, j * BN);
    if (r == 0) load_tile_async<CVT, BN>(vs + j % 2 * L::VAL, L::LD_N, v, cv, nk, c0, j * BN, channels);
  };

  OnlineSoftmax<T, P, CVT> softmax;
  start_pipeline<L>(stages, total, fetch);
  int64_t i = 0;
  for (int64_t j = 0; j < blocks; ++j) {
    float s[BN / 8][4] = {};
    for (int r = 0; r < steps; ++r, ++i) scores.template add<P>(s, next_stage<L>(stages, i, total, fetch), r, lane);
    if (windowed(geometry)) factors.apply(s, j * BN, lane % 4);
    softmax.add(s, KeyBlock<BN>(key_mask, nk, j * BN), scale_log2, vs + j % 2 * L::VAL, L::LD_N, lane, channels / 16);
  }
  softmax.store(out + b * cv * nq, lse + b * nq, row0, nq, chunk.end(cv, static_cast<int>(c0)), c0, lane);
}

// The backward, one kernel per role: DK false, dQ over query-centre blocks (resident Q and dOut,
// streamed K and V); DK true, dK/dV over key-centre blocks (resident K and V, streamed Q and
// dOut). Resident row r, streamed column c: s = S_rc (windowed), P = exp2(s scale_log2 - lse2)
// (0 for masked keys and centres past Nq or Nk), dP (dOut V^T, or V dOut^T), dS = P (dP - delta)
// scale, H = dS a_r a_c (dS for prepared rows); dK/dV adds dV += P^T dOut. Then per group of G
// streamed blocks, per step (tap t, chunk) of a second pass over the group's rows, the plane piece
// [H_1 .. H_G] X_t[:, chunk] (16 x DC a warp) is added to grad's plane t in global memory, whose
// rows only this block owns (its first group overwrites): planes (taps, B, rows, D), one tap for
// prepared rows. sums (2, B, rows), windows, written with grad: [sum_c H_rc m_c, sum_c dS_rc s_rc].
// grad null: no second pass (dV only); dv null: no dV. G: kStreamedBackwardGroup<T, P, CVT> (a
// template argument: the launch plans name it). The wide class (CVT kStreamedWideCv) holds no dV:
// G 0 (DK) are its dV-only blocks, per (128 keys, chunk of CVT channels: the grid's chunks),
// P^T dOut without dP, dS or a second pass.
template <class T, Precision P, int CVT, int G, bool DK>
__global__ void __launch_bounds__(kThreads, 1)
    backward_streamed_mma_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const uint8_t* __restrict__ key_mask,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 float* __restrict__ grad, float* __restrict__ dv, float* __restrict__ sums,
                                 WarpShape shape, WarpGeometry geometry, float scale, MmaGrid grid) {
  using L = StreamedBackwardTiles<T, CVT, G>;
  constexpr int BN = kMmaBN, DC = L::DC, K = kMmaK<T>;
  constexpr bool DV_ONLY = G == 0, WITH_DV = DK && (DV_ONLY || !L::kWide);
  constexpr int GB = DV_ONLY ? 1 : G;  // streamed blocks a group
  static_assert(G * BN <= kMmaRows + BN, "a plane step's G blocks of streamed rows fill one stage");
  static_assert(!DV_ONLY || (DK && L::kWide), "dV-only blocks are the wide class's");
  const L tiles(shape.cv);
  const int val = tiles.val();
  extern __shared__ __align__(128) unsigned char smem[];
  T* const stages = reinterpret_cast<T*>(smem);
  T* const vs = stages + L::kStages * L::STAGE;  // two streamed value-like tiles, by block parity
  T* const vr = vs + 2 * val;                    // the resident value-like tile, [c][row] (not DV_ONLY)

  const int64_t r0 = grid.row0(blockIdx.x), b = grid.batch(blockIdx.x);
  const int c0 = DV_ONLY ? static_cast<int>(grid.chunk(blockIdx.x)) * CVT : 0;  // dV-only blocks' channels
  const int64_t nq = shape.nq, nk = shape.nk, rows = DK ? nk : nq, cols = DK ? nq : nk;
  const int d = shape.d, cv = shape.cv;
  q += (b * geometry.len_q + geometry.lo_q) * d;  // centre 0's row
  k += (b * geometry.len_k + geometry.lo_k) * d;
  v += b * cv * nk;
  grad_out += b * cv * nq;
  lse += b * nq;
  delta += b * nq;
  if (key_mask != nullptr) key_mask += b * nk;
  const T* const row_vals = DK ? v : grad_out;  // (Cv, rows)
  const T* const col_vals = DK ? grad_out : v;  // (Cv, cols)
  const Factors f(geometry, b, nq, nk);
  const bool windows = windowed(geometry);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;
  const int64_t row0 = r0 + 16 * warp + lane / 4;  // the lane's rows row0, row0 + 8
  const StreamedScores<T, BN> scores = DK ? StreamedScores<T, BN>(k, nk, geometry.width_k, q, nq, geometry.width_q,
                                                                  d, geometry.patch)
                                          : StreamedScores<T, BN>(q, nq, geometry.width_q, k, nk, geometry.width_k,
                                                                  d, geometry.patch);
  const WindowFactors factors = DK ? WindowFactors(f.mk, f.ak, nk, row0, f.mq, f.aq, nq, f.dwin)
                                   : WindowFactors(f.mq, f.aq, nq, row0, f.mk, f.ak, nk, f.dwin);
  const float scale_log2 = scale * kLog2e;
  // The query side's lse (base 2) and delta: dQ's rows (past Nq: lse +inf, so P = 0); dK/dV's
  // columns, read per streamed block. dK/dV's rows: whether the key gets weight.
  float lse2[2] = {}, dlt[2] = {};
  bool kept[2] = {};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = row0 + 8 * h;
    if (DK) {
      kept[h] = key_kept(key_mask, nk, n);
    } else {
      lse2[h] = n < nq ? lse[n] * kLog2e : -kNegInf;
      dlt[h] = n < nq ? delta[n] : 0.0f;
    }
  }

  // Per group of G streamed blocks (the last one: what is left) the score steps of each block, then
  // (with grad) the plane steps over the group's rows. Score steps per block: at least 2 (patch > 1,
  // or D > DC), so a value-like buffer is refilled only after the block two back is done with it.
  const int steps = scores.steps(), plane_steps = !DV_ONLY && grad != nullptr ? steps : 0;
  const int64_t blocks = ceil_div(cols, BN), groups = ceil_div(blocks, GB);
  const int64_t per_group = GB * steps + plane_steps, total = blocks * steps + groups * plane_steps;
  auto group_size = [&](int64_t j0) { return blocks - j0 < GB ? static_cast<int>(blocks - j0) : GB; };  // from block j0
  auto fetch = [&](int64_t i, T* stage) {
    const int64_t j0 = i / per_group * GB;  // the step's group (every one before it is whole), its first block
    const int group_blocks = group_size(j0);
    const int r = static_cast<int>(i % per_group);
    if (!DV_ONLY && i == 0) load_tile_async<CVT, kMmaRows>(vr, L::LD_R, row_vals, cv, rows, 0, r0, tiles.channels);
    if (r >= group_blocks * steps) {
      scores.template fetch_streamed<GB * BN>(stage, r - group_blocks * steps, j0 * BN);
      return;
    }
    const int64_t j = j0 + r / steps, n0 = j * BN;
    scores.fetch(stage, r % steps, r0, n0);
    if (r % steps == 0) load_tile_async<CVT, BN>(vs + j % 2 * val, L::LD_N, col_vals, cv, cols, c0, n0, tiles.channels);
  };

  float hm[2] = {}, es[2] = {};  // this lane's shares of the rows' sums
  float acc_dv[WITH_DV ? CVT / 8 : 1][4] = {};
  const int64_t plane = shape.batch * rows * d;
  if (grad != nullptr) grad += b * rows * d;
  start_pipeline<L>(stages, total, fetch);
  int64_t i = 0;
  for (int64_t j0 = 0; j0 < blocks; j0 += GB) {
    const int group_blocks = group_size(j0);
    AccumulatorA<T, P, BN> hf[GB];  // the group's H, block by block (unrolled: in registers)
#pragma unroll
    for (int jj = 0; jj < GB; ++jj) {
      if (jj >= group_blocks) break;
      const int64_t n0 = (j0 + jj) * BN;
      const T* const vt = vs + (j0 + jj) % 2 * val;
      float s[BN / 8][4] = {}, dp[BN / 8][4] = {};
      for (int r = 0; r < steps; ++r, ++i) scores.template add<P>(s, next_stage<L>(stages, i, total, fetch), r, lane);
      if (windows) factors.apply(s, n0, t);
      if constexpr (!DV_ONLY) {
        // The resident tile's A fragments: held (CVT <= 64), or (wide) read per 16-channel step.
        ColumnA<T, P, CVT, L::kWide> vf;
        column_fragments<T, CVT>(vf, vr, L::LD_R);
        mma_value_channels<T, CVT>(dp, vf, vt, L::LD_N, cv, lane);  // dP, the streamed tile stored [c][n]
      }
      // dK/dV: the streamed query columns' lse and delta.
      const QueryColumns columns = DK ? QueryColumns(lse, delta, n0, nq, lane) : QueryColumns{};
      const KeyBlock<BN> keys(key_mask, nk, n0);
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // the lane's columns n0 + 8 nt + 2 t + c
          const int col = 8 * nt + 2 * t + c;
          const bool factored = !DV_ONLY && windows;
          const float mc = factored ? factors.m(n0 + col) : 0.0f, ac = factored ? factors.a(n0 + col) : 0.0f;
          float cl = 0.0f, cd = 0.0f;
          if (DK) columns.get(4 * nt + t, c, cl, cd);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int e = 2 * h + c;
            const float x = s[nt][e];
            const bool keep = DK ? kept[h] && n0 + col < nq : keys.kept(col);
            const float p = keep ? exp2f(x * scale_log2 - (DK ? cl : lse2[h])) : 0.0f;
            s[nt][e] = p;
            if constexpr (DV_ONLY) continue;
            float ds = p * (dp[nt][e] - (DK ? cd : dlt[h])) * scale;
            if (windows) {  // H = dS a_r a_c: the part through the window products
              es[h] += ds * x;
              ds *= factors.ar[h] * ac;
              hm[h] += ds * mc;
            }
            dp[nt][e] = ds;
          }
        }
      }
      if constexpr (WITH_DV) {
        AccumulatorA<T, P, BN> pf;
        to_a_fragments<T>(pf, s);
        // dV += P^T dOut, dOut stored [c][m]
        mma_tile<true>(acc_dv, pf, vt, L::LD_N, BN / K, tiles.channels / 16, lane);
      }
      if constexpr (!DV_ONLY) to_a_fragments<T>(hf[jj], dp);
    }
    for (int r = 0; r < plane_steps; ++r, ++i) {
      const T* const xs = next_stage<L>(stages, i, total, fetch);  // the group's rows, block jj's from row jj BN
      const int n_pairs = (scores.width(r) + 15) / 16;
      float acc[DC / 8][4] = {};
#pragma unroll
      for (int jj = 0; jj < GB; ++jj) {  // [H_1 .. H_G] X_t, X stored [n][d]
        if (jj < group_blocks) mma_tile<false>(acc, hf[jj], xs + jj * BN * L::LD_D, L::LD_D, BN / K, n_pairs, lane);
      }
      float* const dst = grad + scores.tap(r) * plane + scores.column(r);
#pragma unroll
      for (int nt = 0; nt < DC / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t n = row0 + 8 * (e / 2);
          const int col = 8 * nt + 2 * t + e % 2;
          if (n >= rows || col >= scores.width(r)) continue;
          float* const x = dst + n * d + col;
          *x = j0 == 0 ? acc[nt][e] : *x + acc[nt][e];
        }
      }
    }
  }

  if (WITH_DV && dv != nullptr) store_accumulators<true>(dv + (b * cv + c0) * nk, acc_dv, row0, nk, cv - c0, nk);
  if (!DV_ONLY && windows && grad != nullptr) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      hm[h] = quad_sum(hm[h]);
      es[h] = quad_sum(es[h]);
      const int64_t n = row0 + 8 * h;
      if (t == 0 && n < rows) {
        sums[b * rows + n] = hm[h];
        sums[(shape.batch + b) * rows + n] = es[h];
      }
    }
  }
}

}  // namespace cuda
}  // namespace cocos_kernels
