// The kernels of correspondence_warp for prepared rows (patch 1) on tensor cores, built as
// FlashAttention-2 builds them, from the PTX operations of mma.cuh (sm_80 and newer): float16 and
// bfloat16 rows through mma.sync m16n8k16, float32 rows with precision tf32x3 or tf32 through
// m16n8k8 on tf32 inputs (below: "float32 rows").
//
// Every kernel has one shape: a block of 8 warps keeps 128 rows resident (warp w owns rows
// 16 w .. 16 w + 15), copied to shared memory once and, where the registers allow, held as mma A
// fragments, and streams 64-row blocks of the other side through a two-stage cp.async pipeline
// (a tile of feature rows and the matching value-like tile, 16 bytes per copy). Products are mma.sync
// m16n8k16 into float registers; the elementwise work (softmax, P, dS) runs on those registers,
// and a product's float accumulators become the next product's A fragments in place (rounded to
// the input dtype, as in the other kernels). Nothing round-trips through shared memory but the
// copies; no atomics.
//
// - forward (D <= 256): resident Q; per key block S = Q K^T, the online softmax (base 2, running
//   max per row; a row's 64 scores sit in the 4 lanes of a quad: two xor shuffles reduce it) and
//   O += P V. One block per (128 queries, value chunk of CVT, batch element). Windows and wider
//   rows take forward_streamed_mma_kernel (correspondence_warp_streamed_mma.cuh), which shares
//   its online softmax (OnlineSoftmax).
// - backward dQ (D <= 256): resident Q and dOut; per key block S, P = exp2(S - lse),
//   dP = dOut V^T, dS = P (dP - delta) scale, dQ += dS K. One block per (128 queries, chunk of
//   dQ columns, batch element): one chunk but at D > 128 with Cv > 48 (two).
// - backward dK/dV (D <= 256): resident K and V; per query block S^T = K Q^T, P^T,
//   dP^T = V dOut^T, dV += P^T dOut, dK += dS^T Q. One block per (128 keys, chunk of dK columns,
//   batch element), and where dK and dV are split (kDvSplit) dV-only blocks per (128 keys, chunk
//   of dV channels, batch element).
// The backward takes Cv as far as its tiles fit sm_80's shared memory (MmaBackwardTiles, where
// its plan per D and Cv is): for 16-bit rows Cv <= 256 at D <= 64, 224 at D <= 128, 176 at
// D <= 256 (ADE20K's 151 labels at CoCosNet's D = 256); float32 rows below.
//
// D is padded to DT (64, 128 or 256) in the tiles and fragments, the value chunk to CVT (16 or 64)
// channels: Cv = 3 pays for 16, not 64. The backward's kernels for more channels (and for every
// Cv > 16 at DT 256 or with float32 rows) size their value-like tiles at run time, Cv padded to a
// multiple of 16. Rows whose length (D; Nq or Nk for value-like tiles) is not a whole number of
// 16-byte chunks, or whose base is not 16-byte aligned, are copied element by element.
//
// Float32 rows: the same kernels with k8 steps. There is no ldmatrix for 32-bit elements: the
// fragments are plain 32-bit shared loads (64-bit where a fragment's two elements are adjacent).
// Since a product sums over k, any permutation of k within a k8 step gives the same result if A
// and B agree on it. Fragments loaded from shared memory hold k in the ISA's order (t, t + 4);
// the A fragments made from accumulators hold columns 2t, 2t + 1 of their C layout in the k
// slots t and t + 4 (no shuffles), and their B fragments are loaded with that order. With row
// strides of 4 words mod 32 for feature rows and 8 for value-like tiles, every one of these loads
// hits 32 distinct banks. tf32x3 keeps the float values and splits each at use (hi = cvt.rna(x),
// lo = cvt.rna(x - hi)): three products hi hi + hi lo + lo hi per step; tf32 rounds them once.
// 32-bit fragments take twice the registers of 16-bit ones, so the resident tiles (Q; Q and dOut;
// K and V) stay in shared memory and their A fragments are read there per k step: the forward
// takes D <= 128 (value chunks of 16 channels at D > 64, for the shared memory), the backward
// D <= 128 with Cv <= 112 at D <= 64, Cv <= 80 at D <= 128 (at Cv > 16 Q and K fragments held in
// registers, their room in shared memory going to the value-like tiles, and dK blocks and dV-only
// blocks of 16 channels: kDvSplit).
#pragma once

#include "correspondence_warp.h"
#include "mma.cuh"
#include "tile.cuh"

namespace cocos_kernels {
namespace cuda {

constexpr int kMmaRows = 128;  // resident rows per block, 16 per warp
constexpr int kMmaBN = 64;     // streamed rows per pipeline stage
constexpr int kMmaMaxD = 256;
// The backward: D and Cv up to these where its tiles fit kMmaSharedLimit (MmaBackwardTiles).
constexpr int kMmaMaxBackwardD = 256;
constexpr int kMmaMaxBackwardCv = 256;
constexpr int kTf32MaxD = 128;
constexpr int kTf32MaxBackwardD = 128;
constexpr int kTf32MaxBackwardCv = 256;
constexpr int kTf32DvChunk = 16;  // dV channels per dV-only block (kDvSplit), float32 rows
constexpr int kMmaDvChunk = 128;  // the same, 16-bit rows
constexpr int kMmaDChunk = 128;   // dQ / dK columns per block where D is split (MmaBackwardTiles::kChunked)
// Dynamic shared memory per block: sm_80's opt-in limit (sm_90: 227 KiB).
constexpr size_t kMmaSharedLimit = 163 * 1024;
static_assert(kMmaRows == 16 * kWarps && kMmaRows == 2 * kMmaBN, "resident rows are staged in the two row stages");

template <class T>
constexpr bool kIsFloat = std::is_same_v<T, float>;

// Whether correspondence_warp_forward<T> / _backward<T> run the kernels of this file (float32
// with precision ieee takes the FMA kernels), and up to which D (the backward: and Cv, as far as
// its tiles fit, uses_mma_backward below).
template <class T>
constexpr int kMmaForwardD = kIsFloat<T> ? kTf32MaxD : kMmaMaxD;
template <class T>
constexpr int kMmaBackwardD = kIsFloat<T> ? kTf32MaxBackwardD : kMmaMaxBackwardD;
template <class T>
constexpr int kMmaBackwardCv = kIsFloat<T> ? kTf32MaxBackwardCv : kMmaMaxBackwardCv;
template <class T>
bool uses_mma_forward(const WarpShape& s, const WarpGeometry& g, Precision p) {
  return (!kIsFloat<T> || p != Precision::kIeee) && g.patch == 1 && s.d <= kMmaForwardD<T>;
}
template <class T, int DT, int CVT>
struct MmaBackwardTiles;

// Calls f(P) (std::integral_constant) with the precision of T's tile products: kIeee for 16-bit
// T, which ignores it.
template <class T, class F>
auto with_precision(Precision precision, F&& f) {
  if constexpr (kIsFloat<T>) {
    if (precision == Precision::kTf32) return f(std::integral_constant<Precision, Precision::kTf32>{});
    return f(std::integral_constant<Precision, Precision::kTf32x3>{});
  } else {
    return f(std::integral_constant<Precision, Precision::kIeee>{});
  }
}

// Calls f(P, DT, CVT) (std::integral_constant) with the precision (kIeee for 16-bit T, which
// ignores it), the padded widths of D (up to MAX_D) and of the value chunk (up to MAX_CV);
// instantiates f for those only. The backward (MAX_CV > 64) takes CVT as the class of its
// kernels: 16; 64 (16-bit) where MmaBackwardTiles<T, DT, 64> fit; else MAX_CV.
template <class T, int MAX_D, int MAX_CV, class F>
auto with_mma_tiles(const WarpShape& s, Precision precision, F&& f) {
  auto by_cv = [&](auto p, auto dt) {
    // Float32 at D > 64: chunks of 16 channels, or the resident Q would not fit sm_80's shared memory.
    if constexpr (MAX_CV == 16 || (kIsFloat<T> && decltype(dt)::value > 64 && MAX_CV <= 64)) {
      return f(p, dt, std::integral_constant<int, 16>{});
    } else if constexpr (MAX_CV <= 64) {
      return s.cv <= 16 ? f(p, dt, std::integral_constant<int, 16>{}) : f(p, dt, std::integral_constant<int, 64>{});
    } else {
      if (s.cv <= 16) return f(p, dt, std::integral_constant<int, 16>{});
      if constexpr (!kIsFloat<T>) {
        if (s.cv <= 64 && MmaBackwardTiles<T, decltype(dt)::value, 64>(s.cv).fits()) {
          return f(p, dt, std::integral_constant<int, 64>{});
        }
      }
      return f(p, dt, std::integral_constant<int, MAX_CV>{});
    }
  };
  auto by_d = [&](auto p) {
    if constexpr (MAX_D > 128) {
      if (s.d > 128) return by_cv(p, std::integral_constant<int, MAX_D>{});
    }
    if constexpr (MAX_D > 64) {
      if (s.d > 64) return by_cv(p, std::integral_constant<int, 128>{});
    }
    return by_cv(p, std::integral_constant<int, 64>{});
  };
  return with_precision<T>(precision, by_d);
}

// k per mma step: m16n8k16 for 16-bit inputs, m16n8k8 for tf32.
template <class T>
constexpr int kMmaK = kIsFloat<T> ? 8 : 16;

// Float32 A fragments made from accumulators, one k8 step per x[s]: the accumulators of n8 tile
// s in their C order (columns 2t, 2t + 1 in c0, c1 and c2, c3). P is the precision of the
// products they enter.
template <Precision P, int STEPS>
struct Tf32Accumulators {
  static constexpr Precision kPrecision = P;
  static constexpr int kSteps = STEPS;
  static constexpr bool kIsaOrder = false;
  float x[STEPS][4];
  __device__ __forceinline__ void fragment(float (&a)[4], int kk) const {
    a[0] = x[kk][0];  // the ISA's register order: rows g, g + 8 at k slot t, then at t + 4
    a[1] = x[kk][2];
    a[2] = x[kk][1];
    a[3] = x[kk][3];
  }
};

// Float32 A fragments held in registers, one k8 step per x[s] in the ISA's order (rows g, g + 8
// at k t, then at t + 4), loaded once from a resident tile (the backward's held Q or K).
template <Precision P, int STEPS>
struct Tf32Held {
  static constexpr Precision kPrecision = P;
  static constexpr int kSteps = STEPS;
  static constexpr bool kIsaOrder = true;
  float x[STEPS][4];
  __device__ __forceinline__ void fragment(float (&a)[4], int kk) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) a[e] = x[kk][e];
  }
};

// Float32 A fragments of a resident shared tile, read per k step in the ISA's order (k t, t + 4):
// element offsets of this lane's a0, of k step kk + 1 from kk, of rows g + 8 from g, of k t + 4
// from t.
template <Precision P, int STEPS>
struct Tf32SharedA {
  static constexpr Precision kPrecision = P;
  static constexpr int kSteps = STEPS;
  static constexpr bool kIsaOrder = true;
  const float* tile;
  int base, step, rows8, k4;
  // The N k steps from step `first` on.
  template <int N>
  __device__ __forceinline__ Tf32SharedA<P, N> steps(int first) const {
    return {tile, base + first * step, step, rows8, k4};
  }
  __device__ __forceinline__ void fragment(float (&a)[4], int kk) const {
    const int i = base + kk * step;
    a[0] = lds(tile, i);
    a[1] = lds(tile, i + rows8);
    a[2] = lds(tile, i + k4);
    a[3] = lds(tile, i + rows8 + k4);
  }
};

// 16-bit A fragments of a resident shared tile, read per k16 step by ldmatrix (.trans for a
// [c][row] tile): this lane's row address at step 0, and the elements from one step to the next.
template <class T, bool TRANS, int STEPS>
struct SharedA16 {
  static constexpr int kSteps = STEPS;
  const T* base;
  int step;
  template <int N>
  __device__ __forceinline__ SharedA16<T, TRANS, N> steps(int first) const {
    return {base + first * step, step};
  }
};

// The A fragments of a W-wide k extent: of a resident tile (ResidentA: registers for 16-bit T,
// the shared tile for float32) or made from accumulators (AccumulatorA). The backward's RowA
// (a [row][k] tile) and ColumnA (a [k][row] tile) read a 16-bit tile per k step too (PER_STEP);
// RowA holds float32 fragments in registers unless PER_STEP.
template <class T, Precision P, int W>
using ResidentA = std::conditional_t<kIsFloat<T>, Tf32SharedA<P, W / 8>, uint32_t[W / 16][4]>;
template <class T, Precision P, int W>
using AccumulatorA = std::conditional_t<kIsFloat<T>, Tf32Accumulators<P, W / 8>, uint32_t[W / 16][4]>;
template <class T, Precision P, int W, bool PER_STEP>
using RowA = std::conditional_t<kIsFloat<T>, std::conditional_t<PER_STEP, Tf32SharedA<P, W / 8>, Tf32Held<P, W / 8>>,
                                std::conditional_t<PER_STEP, SharedA16<T, false, W / 16>, uint32_t[W / 16][4]>>;
template <class T, Precision P, int W, bool PER_STEP>
using ColumnA = std::conditional_t<!kIsFloat<T> && PER_STEP, SharedA16<T, true, W / 16>, ResidentA<T, P, W>>;

// A fragment kk of 16-bit A fragments: held, or read from shared memory into `loaded`.
template <int STEPS>
__device__ __forceinline__ const uint32_t (&a_fragment(const uint32_t (&a)[STEPS][4], int kk, uint32_t (&)[4]))[4] {
  return a[kk];
}
template <class T, bool TRANS, int STEPS>
__device__ __forceinline__ const uint32_t (&a_fragment(const SharedA16<T, TRANS, STEPS>& a, int kk,
                                                       uint32_t (&loaded)[4]))[4] {
  ldmatrix_x4<TRANS>(loaded, a.base + kk * a.step);
  return loaded;
}
template <class A>
constexpr int kSteps16 = A::kSteps;
template <int STEPS>
constexpr int kSteps16<uint32_t[STEPS][4]> = STEPS;

template <class T, int DT, int CVT>
struct MmaTiles {
  // Element strides of the shared rows: 16 bytes of padding put ldmatrix's 8 rows in distinct banks;
  // float32 tiles: 4 words mod 32 for feature rows, 8 for value-like tiles (see the top).
  static constexpr int LD_D = DT + 16 / static_cast<int>(sizeof(T));  // feature rows
  static constexpr int LD_N = kMmaBN + 8;      // value-like tiles of a stage, [c][64 rows]
  static constexpr int LD_R = kMmaRows + 8;    // the resident value-like tile, [c][128 rows]
  static constexpr int ROW_STAGE = kMmaBN * LD_D;  // elements
  static constexpr int VAL_STAGE = CVT * LD_N;
  static_assert(2 * VAL_STAGE >= CVT * LD_R, "the resident value-like tile is staged in the two value stages");
  static constexpr size_t kBytes = (2 * ROW_STAGE + 2 * VAL_STAGE) * sizeof(T);
  // Float32 keeps every resident tile in shared memory of its own, after the stages: Q (forward).
  static constexpr size_t kForwardBytes = kIsFloat<T> ? kBytes + kMmaRows * LD_D * sizeof(T) : kBytes;
};

// One launch's grid: blocks iterate over (batch, chunk, block of resident rows), the resident
// rows fastest. The chunks: of the value channels (forward, dV-only blocks) or of the dQ / dK
// columns (dQ, dK blocks: MmaBackwardTiles::kChunked).
struct MmaGrid {
  int64_t row_blocks, cv_chunks;
  int64_t blocks(int64_t batch) const { return batch * cv_chunks * row_blocks; }
  // Block `block`'s first resident row, its chunk and its batch element.
  __device__ int64_t row0(int64_t block) const { return block % row_blocks * kMmaRows; }
  __device__ int64_t chunk(int64_t block) const { return block / row_blocks % cv_chunks; }
  __device__ int64_t batch(int64_t block) const { return block / row_blocks / cv_chunks; }
};
inline MmaGrid forward_mma_grid(const WarpShape& s, int cvt) {
  return {ceil_div(s.nq, kMmaRows), s.cv > 0 ? ceil_div(s.cv, cvt) : 1};  // chunk 0 writes the lse
}

// The backward kernels' plan and shared memory for T, D padded to DT and the kernel class CVT
// (with_mma_tiles: 16, 64 or kMmaMaxBackwardCv channels), at a launch's Cv (cv).
//
// A lane's registers (255 at one block of 8 warps per SM) hold its accumulators, dQ or dK (DT / 2
// floats for 16 rows x D a warp) and dV (16 x the dV channels), beside the products of the
// streamed block in flight, S and dP (kSub / 2 floats each), and the fragments held. Shared
// memory (kMmaSharedLimit) holds the two stages and the resident tiles whose fragments are read
// there. ptxas -v (tests/test_cuda_build.py) reports no spills for every kernel below.
// - 16-bit, DT <= 128, CVT <= 64 (the first kernels): Q and dOut fragments held for the whole key
//   loop (staged through the stages); K and V read into registers per query block from tiles of
//   their own; S and dP of whole 64-row blocks.
// - 16-bit, DT 256, CVT <= 64: Q and K fragments read per k step from their tiles, dOut and V
//   fragments too. The 128 dQ or dK floats a lane fit beside S and dP of 32-row sub-blocks of the
//   streamed block (kSub 32): each sub-block reads the resident fragments again (shared-memory
//   traffic, not flops). At Cv > 16 dV in dV-only blocks (kDvSplit). Both resident tiles of a
//   kernel (64 KiB for the rows) and the two stages leave room for Cv <= 48.
// - 16-bit, CVT 256 (Cv > 64; at DT 256 Cv > 48): dOut and V fragments read per 16-channel step
//   from their tiles, Q and K fragments held (K's tile staged, not kept: the room goes to the
//   value-like tiles, Cv 256 at DT 64, 224 at DT 128). dV in dV-only blocks of kMmaDvChunk
//   channels. At DT 256 (kChunked) the 64 registers of held Q or K fragments leave no room for
//   128 dQ or dK floats (ptxas: dQ and dK spill with 16- or 32-row sub-blocks), and
//   reading them per k step needs their 64 KiB tile beside the value-like tiles (Cv <= 48): so
//   a block accumulates kMmaDChunk = 128 of the columns, one grid chunk per 128, each chunk
//   recomputing S and dP over all of D and Cv. Per query-key pair a dQ (or dK) block does
//   2 D + 2 Cv + 2 D / chunks flops: at D 256, Cv 160 two chunks do 2 x (512 + 320 + 256) = 2176
//   where one block would do 1344 (1.6x); the dV-only blocks recompute S once per 128 channels.
//   Without the recomputation the D-wide sums would go through memory: a shared-memory tile of
//   128 x 256 floats (128 KiB) does not fit beside the stages, and global memory means atomics
//   (FlashAttention-2 adds dQ from its dK/dV kernel: nondeterministic sums) or a pass per chunk
//   of keys re-reading the partial sums. Room: Cv 176.
// - Float32: resident tiles in shared memory, fragments read per k step (Tf32SharedA); kSub 32 at
//   DT 128. At CVT 256 (Cv > 16) Q and K fragments held instead (Tf32Held: DT / 2 registers, K's
//   tile staged; DT 128 with a 66 KiB Q or K tile leaves room for Cv 16 only) and dV in dV-only
//   blocks of kTf32DvChunk channels. Cv 112 at DT 64, 80 at DT 128.
template <class T, int DT, int CVT>
struct MmaBackwardTiles {
  using Tiles = MmaTiles<T, DT, CVT>;
  static constexpr int LD_D = Tiles::LD_D, LD_N = Tiles::LD_N, LD_R = Tiles::LD_R;
  static constexpr int ROW_STAGE = Tiles::ROW_STAGE;   // elements
  static constexpr int ROWS = kMmaRows * LD_D;         // a resident row tile
  static constexpr bool kChunked = !kIsFloat<T> && DT > kMmaDChunk && CVT > 64;
  static constexpr int kOutD = kChunked ? kMmaDChunk : DT;  // dQ / dK columns per block
  // Q (dQ) and K (dK/dV) fragments in registers: held for the whole loop (dQ; dK/dV where
  // kKHeld), or read from K's tile per query block (16-bit); else read per k step (RowA).
  static constexpr bool kRowsInRegisters = kIsFloat<T> ? CVT > 16 : DT <= 128 || kChunked;
  // dOut (dQ) and V (dK/dV) fragments: held (dQ) or read per query block (dK/dV); else per k step.
  static constexpr bool kValsInRegisters = !kIsFloat<T> && DT <= 128 && CVT <= 64;
  // dK/dV holds K's fragments where V's are read per k step: K is staged, V's tile is big.
  static constexpr bool kKHeld = kRowsInRegisters && !kValsInRegisters;
  static constexpr int kSub = kValsInRegisters || DT <= 64 ? kMmaBN : 32;
  static constexpr bool kDvSplit = kIsFloat<T> ? CVT > kTf32DvChunk : CVT > 64 || (DT > 128 && CVT > 16);
  static constexpr int kDvChunk = !kDvSplit ? CVT : kIsFloat<T> ? kTf32DvChunk : kMmaDvChunk;  // dV channels a block
  static_assert(kMmaBN % kSub == 0 && kSub % 16 == 0, "whole sub-blocks of k16 steps");

  int channels;  // value-like rows of the stages and tiles: CVT, or Cv padded to 16 where read per step
  __host__ __device__ explicit MmaBackwardTiles(int cv)
      : channels(kValsInRegisters ? CVT : (cv + 15) / 16 * 16 > 16 ? (cv + 15) / 16 * 16 : 16) {}
  __host__ __device__ int val_stage() const { return channels * LD_N; }
  __host__ __device__ int vals() const { return channels * LD_R; }
  __host__ __device__ int own() const { return 2 * ROW_STAGE + 2 * val_stage(); }  // after the stages
  // dQ: stages, Q's tile (where not held), dOut's (where read per step).
  __host__ __device__ size_t dq_bytes() const {
    return (own() + (kRowsInRegisters ? 0 : ROWS) + (kValsInRegisters ? 0 : vals())) * sizeof(T);
  }
  // dK/dV: stages, K's tile (where not held), V's.
  __host__ __device__ size_t dkdv_bytes() const { return (own() + (kKHeld ? 0 : ROWS) + vals()) * sizeof(T); }
  __host__ __device__ size_t bytes() const { return dq_bytes() > dkdv_bytes() ? dq_bytes() : dkdv_bytes(); }
  __host__ __device__ bool fits() const { return bytes() <= kMmaSharedLimit; }

  static MmaGrid dq_grid(const WarpShape& s) { return {ceil_div(s.nq, kMmaRows), ceil_div(s.d, kOutD)}; }
  static MmaGrid dk_grid(const WarpShape& s) { return {ceil_div(s.nk, kMmaRows), ceil_div(s.d, kOutD)}; }
  static MmaGrid dv_grid(const WarpShape& s) { return {ceil_div(s.nk, kMmaRows), ceil_div(s.cv, kDvChunk)}; }
};

// Whether correspondence_warp_backward<T> runs the kernels of this file.
template <class T>
bool uses_mma_backward(const WarpShape& s, const WarpGeometry& g, Precision p) {
  if ((kIsFloat<T> && p == Precision::kIeee) || g.patch != 1 || s.d > kMmaBackwardD<T> || s.cv > kMmaBackwardCv<T>) {
    return false;
  }
  return with_mma_tiles<T, kMmaBackwardD<T>, kMmaBackwardCv<T>>(s, p, [&](auto, auto dt, auto cvt) {
    return s.cv <= decltype(cvt)::value && MmaBackwardTiles<T, decltype(dt)::value, decltype(cvt)::value>(s.cv).fits();
  });
}

// dst[r][c] = src[r0 + r][c0 + c] for an R x COLS tile (r_count x COLS) of a row-major (rows x
// cols) matrix, zero outside it. 16-byte cp.async copies (complete at the caller's cp_async_wait) where every row
// starts 16-byte aligned, else load_tile's element copies (complete at once).
template <int R, int COLS, class T>
__device__ __forceinline__ void load_tile_async(T* dst, int ldd, const T* src, int64_t rows, int64_t cols,
                                                int64_t r0, int64_t c0, int r_count = R) {
  constexpr int E = 16 / sizeof(T);  // elements per 16-byte chunk
  static_assert(COLS % E == 0, "whole 16-byte chunks");
  // Both loops stay rolled: unrolled, their addresses and loads sit in registers beside the
  // accumulators of the key loop, and the float32 kernels spill.
  if (cols % E != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
#pragma unroll 1
    for (int i = threadIdx.x; i < r_count * COLS; i += kThreads) {
      const int r = i / COLS, c = i % COLS;
      const int64_t gr = r0 + r, gc = c0 + c;
      dst[r * ldd + c] = gr < rows && gc < cols ? src[gr * cols + gc] : from_float<T>(0.0f);
    }
    return;
  }
  constexpr int CHUNKS = COLS / E;
#pragma unroll 1
  for (int i = threadIdx.x; i < r_count * CHUNKS; i += kThreads) {
    const int r = i / CHUNKS, c = i % CHUNKS * E;
    const int64_t gr = r0 + r, gc = c0 + c;
    const bool valid = gr < rows && gc < cols;  // a chunk is all in or all out: cols % E == 0
    cp_async_16(dst + r * ldd + c, valid ? src + gr * cols + gc : src, valid);
  }
}

// This lane's ldmatrix row address for the four 8 x 8 matrices of the 16 x 16 tile at (r0, c0)
// of a shared tile with row stride ld, in the order (rows 0-7, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 0-7), (rows 8-15, cols 8-15). Plain, of a tile stored [n][k]: the B fragments
// (registers 0, 1 and 2, 3) of the n8 tiles r0 and r0 + 8; with .trans, of a tile stored [k][m]:
// the A fragment of rows c0 .. c0 + 15.
template <class T>
__device__ __forceinline__ const T* ldsm_rows(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + lane / 16 * 8 + lane % 8) * ld + c0 + lane / 8 % 2 * 8;
}

// The same for B fragments of a tile stored [k][n] (with .trans): order (k 0-7, n 0-7),
// (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), at (k0, n0).
template <class T>
__device__ __forceinline__ const T* ldsm_cols(const T* tile, int ld, int k0, int n0, int lane) {
  return tile + (k0 + lane / 8 % 2 * 8 + lane % 8) * ld + n0 + lane / 16 * 8;
}

// acc (16 x 8 NT, float) += A B over the first k_steps k16 steps and n_pairs pairs of n8 tiles,
// B(k, n) = tile[n][k] (B_ROWS: stored [n][k]) or tile[k][n]. A: held fragments or SharedA16.
template <bool B_ROWS, class T, class A, int NT>
__device__ __forceinline__ void mma_tile_16(float (&acc)[NT][4], const A& a, const T* tile, int ld, int k_steps,
                                            int n_pairs, int lane) {
#pragma unroll
  for (int kk = 0; kk < kSteps16<A>; ++kk) {
    if (kk >= k_steps) continue;
    uint32_t loaded[4];
    const uint32_t(&ak)[4] = a_fragment(a, kk, loaded);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      if (nn >= n_pairs) continue;
      uint32_t f[4];
      if constexpr (B_ROWS) {
        ldmatrix_x4<false>(f, ldsm_rows(tile, ld, 16 * nn, 16 * kk, lane));
      } else {
        ldmatrix_x4<true>(f, ldsm_cols(tile, ld, 16 * kk, 16 * nn, lane));
      }
      const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
      mma_16816<T>(acc[2 * nn], ak, lo);
      mma_16816<T>(acc[2 * nn + 1], ak, hi);
    }
  }
}
template <bool B_ROWS, class T, int STEPS, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[NT][4], const uint32_t (&a)[STEPS][4], const T* tile, int ld,
                                         int k_steps, int n_pairs, int lane) {
  mma_tile_16<B_ROWS>(acc, a, tile, ld, k_steps, n_pairs, lane);
}
template <bool B_ROWS, class T, bool TRANS, int STEPS, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[NT][4], const SharedA16<T, TRANS, STEPS>& a, const T* tile,
                                         int ld, int k_steps, int n_pairs, int lane) {
  mma_tile_16<B_ROWS>(acc, a, tile, ld, k_steps, n_pairs, lane);
}

// The accumulators of n8 tiles 2 kk and 2 kk + 1 (16 x 16, float) as the A fragment of k16 step
// kk, rounded to T: the C layout of the two tiles is the A layout of their columns.
template <class T, int NT>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[NT / 2][4], const float (&acc)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const float* lo = acc[2 * kk];
    const float* hi = acc[2 * kk + 1];
    a[kk][0] = pack2(from_float<T>(lo[0]), from_float<T>(lo[1]));
    a[kk][1] = pack2(from_float<T>(lo[2]), from_float<T>(lo[3]));
    a[kk][2] = pack2(from_float<T>(hi[0]), from_float<T>(hi[1]));
    a[kk][3] = pack2(from_float<T>(hi[2]), from_float<T>(hi[3]));
  }
}

// Float32: the accumulators are the A fragments as they are (Tf32Accumulators' order).
template <class T, Precision P, int NT>
__device__ __forceinline__ void to_a_fragments(Tf32Accumulators<P, NT>& a, const float (&acc)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) a.x[kk][e] = acc[kk][e];
  }
}

// x as tf32 hi (and, for tf32x3, lo = x - hi rounded to tf32; else 0).
template <Precision P, int N>
__device__ __forceinline__ void split_tf32(const float (&x)[N], uint32_t (&hi)[N], uint32_t (&lo)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    hi[i] = to_tf32(x[i]);
    lo[i] = P == Precision::kTf32x3 ? to_tf32(x[i] - float_bits(hi[i])) : 0u;
  }
}

// acc (16 x 8 NT, float) += A B for float32 tiles, B(k, n) = tile[n][k] (B_ROWS) or tile[k][n],
// over the first k_steps k8 steps and n_pairs pairs of n8 tiles; B is loaded in A's k order.
template <bool B_ROWS, class A, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[NT][4], const A& a, const float* tile, int ld, int k_steps,
                                         int n_pairs, int lane) {
  constexpr Precision P = A::kPrecision;
  constexpr int STEPS = A::kSteps;
  constexpr bool RESIDENT = A::kIsaOrder;
  static_assert(P != Precision::kIeee, "float32 tiles on tensor cores are tf32x3 or tf32");
  const int g = lane / 4, kt = RESIDENT ? lane % 4 : 2 * (lane % 4);  // this lane's first k of B
  // This lane's B elements (k kt, n g) and its second k (kt + 4, or kt + 1 for accumulator order),
  // at n8 tile 0 of k step 0; the others are constant offsets from them.
  const int b0 = B_ROWS ? g * ld + kt : kt * ld + g;
  const int b1 = b0 + (RESIDENT ? 4 : 1) * (B_ROWS ? 1 : ld);
#pragma unroll
  for (int kk = 0; kk < STEPS; ++kk) {
    if (kk >= k_steps) continue;
    float ax[4];
    a.fragment(ax, kk);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt >= 2 * n_pairs) continue;
      // A is split again per n8 tile and B's lo made after the first two products: split once
      // per k step, tf32x3's dK/dV spills on sm_90a (ptxas keeps several tiles' splits in flight).
      uint32_t ahi[4], alo[4];
      split_tf32<P>(ax, ahi, alo);
      const int step = B_ROWS ? 8 * nt * ld + 8 * kk : 8 * kk * ld + 8 * nt;
      float b[2];
      if constexpr (B_ROWS && !RESIDENT) {
        lds_pair(b, tile, b0 + step);  // k contiguous and adjacent
      } else {
        b[0] = lds(tile, b0 + step);
        b[1] = lds(tile, b1 + step);
      }
      const uint32_t bhi[2] = {to_tf32(b[0]), to_tf32(b[1])};
      mma_1688_tf32(acc[nt], ahi, bhi);
      if constexpr (P == Precision::kTf32x3) {
        mma_1688_tf32(acc[nt], alo, bhi);
        const uint32_t blo[2] = {to_tf32(b[0] - float_bits(bhi[0])), to_tf32(b[1] - float_bits(bhi[1]))};
        mma_1688_tf32(acc[nt], ahi, blo);
      }
    }
  }
}

// dP (16 x 8 NT) += A B over the value channels, B(c, n) = tile[c][n]: where A is read from
// shared memory (float32; 16-bit SharedA16) and CVT > 16, in a rolled loop over the first cv
// channels, 16 (two k8 or one k16 step) at a time: fully unrolled over 64 channels, dQ and dK/dV
// spill (ptxas -v).
template <class T, int CVT, class A, int NT>
__device__ __forceinline__ void mma_value_channels(float (&acc)[NT][4], const A& a, const T* tile, int ld, int cv,
                                                   int lane) {
  if constexpr ((kIsFloat<T> || std::is_class_v<A>) && CVT > 16) {
    constexpr int STEPS = 16 / kMmaK<T>;  // k steps per 16 channels
    const int chunks = (cv + 15) / 16;
#pragma unroll 1
    for (int c = 0; c < chunks; ++c) {
      mma_tile<false>(acc, a.template steps<STEPS>(STEPS * c), tile + 16 * c * ld, ld, STEPS, NT / 2, lane);
    }
  } else {
    mma_tile<false>(acc, a, tile, ld, CVT / kMmaK<T>, NT / 2, lane);
  }
}

// Copies the block's resident rows r0 .. r0 + 127 of `rows` (n x d) to rdst (stride LD_D) and,
// with `vals`, their value-like columns (cv x n) to vs ([c][row], stride LD_R; val_rows channels),
// for every thread.
template <class T, int DT, int CVT>
__device__ __forceinline__ void stage_resident(T* rdst, T* vs, const T* rows, const T* vals, int64_t n, int d, int cv,
                                               int64_t r0, int val_rows = CVT) {
  using L = MmaTiles<T, DT, CVT>;
  load_tile_async<kMmaRows, DT>(rdst, L::LD_D, rows, n, d, r0, 0);
  if (vals != nullptr) load_tile_async<CVT, kMmaRows>(vs, L::LD_R, vals, cv, n, 0, r0, val_rows);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// The A fragments of the warp's 16 resident rows: of a [row][d] tile (the first d_steps k16
// steps), and of vals^T from the [c][row] tile.
template <class T, int DT>
__device__ __forceinline__ void row_fragments(uint32_t (&f)[DT / 16][4], const T* tile, int ld, int d_steps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < DT / 16; ++s) {
    if (s < d_steps) ldmatrix_x4<false>(f[s], tile + (16 * warp + lane % 16) * ld + 16 * s + lane / 16 * 8);
  }
}
template <class T, int CVT>
__device__ __forceinline__ void column_fragments(uint32_t (&f)[CVT / 16][4], const T* vs, int ld) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < CVT / 16; ++c) ldmatrix_x4<true>(f[c], ldsm_rows(vs, ld, 16 * c, 16 * warp, lane));
}

// The same for 16-bit tiles read per k step (SharedA16): only the lane's addresses.
template <class T, int DT, int STEPS>
__device__ __forceinline__ void row_fragments(SharedA16<T, false, STEPS>& f, const T* tile, int ld, int) {
  static_assert(STEPS == DT / 16, "one k16 step per 16 columns");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  f = {tile + (16 * warp + lane % 16) * ld + lane / 16 * 8, 16};
}
template <class T, int CVT, int STEPS>
__device__ __forceinline__ void column_fragments(SharedA16<T, true, STEPS>& f, const T* vs, int ld) {
  static_assert(STEPS == CVT / 16, "one k16 step per 16 channels");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  f = {ldsm_rows(vs, ld, 0, 16 * warp, lane), 16 * ld};
}

// The same for float32 tiles: the fragments stay in the shared tile, read per k step.
template <class T, int DT, Precision P, int STEPS>
__device__ __forceinline__ void row_fragments(Tf32SharedA<P, STEPS>& f, const float* tile, int ld, int) {
  static_assert(STEPS == DT / 8, "one k8 step per 8 columns");
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  f = {tile, (16 * warp + g) * ld + t, 8, 8 * ld, 4};
}
template <class T, int DT, Precision P, int STEPS>
__device__ __forceinline__ void row_fragments(Tf32Held<P, STEPS>& f, const float* tile, int ld, int) {
  static_assert(STEPS == DT / 8, "one k8 step per 8 columns");
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const float* const row = tile + (16 * warp + g) * ld + t;
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    f.x[s][0] = row[8 * s];
    f.x[s][1] = row[8 * ld + 8 * s];
    f.x[s][2] = row[8 * s + 4];
    f.x[s][3] = row[8 * ld + 8 * s + 4];
  }
}
template <class T, int CVT, Precision P, int STEPS>
__device__ __forceinline__ void column_fragments(Tf32SharedA<P, STEPS>& f, const float* vs, int ld) {
  static_assert(STEPS == CVT / 8, "one k8 step per 8 channels");
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  f = {vs, t * ld + 16 * warp + g, 8 * ld, 8, 4 * ld};
}

// Streams the 64-row blocks of `rows` (n x d) and of `vals` (cv x n, channels c0 .. c0 + CVT)
// through the two-stage pipeline: body(n0, rows tile [row][d], vals tile [c][row]) per block.
template <class T, int DT, int CVT, int LOAD_CV = CVT, class Body>
__device__ __forceinline__ void stream_blocks(T* rs, T* vs, const T* rows, const T* vals, int64_t n, int d, int cv,
                                              int64_t c0, Body&& body) {
  stream_stages<T, DT>(rs, vs, MmaTiles<T, DT, CVT>::VAL_STAGE, LOAD_CV, rows, vals, n, d, cv, c0, body);
}

// The same with value stages of val_stage elements, load_cv channels each.
template <class T, int DT, class Body>
__device__ __forceinline__ void stream_stages(T* rs, T* vs, int val_stage, int load_cv, const T* rows, const T* vals,
                                              int64_t n, int d, int cv, int64_t c0, Body&& body) {
  using L = MmaTiles<T, DT, 16>;  // the row tiles do not depend on the value chunk
  const int64_t blocks = ceil_div(n, kMmaBN);
  auto fetch = [&](int64_t n0, int stage) {
    load_tile_async<kMmaBN, DT>(rs + stage * L::ROW_STAGE, L::LD_D, rows, n, d, n0, 0);
    load_tile_async<kMmaMaxBackwardCv, kMmaBN>(vs + stage * val_stage, L::LD_N, vals, cv, n, c0, n0, load_cv);
  };
  if (blocks > 0) fetch(0, 0);
  cp_async_commit();
  for (int64_t j = 0; j < blocks; ++j) {
    const int stage = j % 2;
    if (j + 1 < blocks) fetch((j + 1) * kMmaBN, stage ^ 1);
    cp_async_commit();   // possibly empty: every iteration commits exactly one group
    cp_async_wait<1>();  // block j's group is complete (block j + 1's may be in flight)
    __syncthreads();
    body(j * kMmaBN, rs + stage * L::ROW_STAGE, vs + stage * val_stage);
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
}

// The sum and the max of x over the four lanes of a quad (a row's columns of an accumulator tile).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// lse (base 2) and delta of the query columns m0 .. m0 + 63 of a streamed block, for the kernels
// whose resident rows are keys: column c's are in lane c / 2 (two registers a lane instead of
// sixteen); columns past Nq read 0.
struct QueryColumns {
  float lse2[2] = {}, delta[2] = {};
  QueryColumns() = default;  // unused (the dQ kernels' rows are the queries)
  __device__ QueryColumns(const float* lse, const float* dlt, int64_t m0, int64_t nq, int lane) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t m = m0 + 2 * lane + j;
      lse2[j] = m < nq ? lse[m] * kLog2e : 0.0f;
      delta[j] = m < nq ? dlt[m] : 0.0f;
    }
  }
  // Column 2 src + j's lse2 and delta (every lane calls it: shuffles).
  __device__ __forceinline__ void get(int src, int j, float& l, float& d) const {
    l = __shfl_sync(0xffffffffu, lse2[j], src);
    d = __shfl_sync(0xffffffffu, delta[j], src);
  }
};

// In every kernel, acc[nt][e] of a warp is element (row g + 8 (e / 2), column 8 nt + 2 t + e % 2)
// of its 16-row tile, g = lane / 4, t = lane % 4.

// Which columns n of the streamed block of BN keys at n0 get weight: keys inside Nk that the mask keeps.
template <int BN>
struct KeyBlock {
  int keys;
  const uint8_t* mask;
  __device__ KeyBlock(const uint8_t* key_mask, int64_t nk, int64_t n0)
      : keys(nk - n0 < BN ? static_cast<int>(nk - n0) : BN), mask(key_mask == nullptr ? nullptr : key_mask + n0) {}
  __device__ bool kept(int n) const { return n < keys && (mask == nullptr || mask[n] != 0); }
};

// Moves the operands to batch element b.
template <class P, class M>
__device__ __forceinline__ void to_batch(int64_t b, const WarpShape& s, P& q, P& k, P& v, M& key_mask) {
  q += b * s.nq * s.d;
  k += b * s.nk * s.d;
  v += b * s.cv * s.nk;
  if (key_mask != nullptr) key_mask += b * s.nk;
}

// Writes a warp's float accumulators, its row g being row0, to dst[row][col] (stride ld), or
// COLUMN_MAJOR to dst[col][row] (stride rows), for rows < rows and columns < cols.
template <bool COLUMN_MAJOR, int NT>
__device__ __forceinline__ void store_accumulators(float* dst, const float (&acc)[NT][4], int64_t row0, int64_t rows,
                                                   int64_t cols, int64_t ld) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int c = 0; c < NT; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t r = row0 + 8 * (e / 2), col = 8 * c + 2 * t + e % 2;
      if (r < rows && col < cols) dst[COLUMN_MAJOR ? col * rows + r : r * ld + col] = acc[c][e];
    }
  }
}

// A warp's online softmax over the streamed key blocks of the forward kernels (this file's and
// correspondence_warp_streamed_mma.cuh's): rows g and g + 8's running max (base 2) and this
// lane's share of their row sums (its quad's four shares are added at the end), and the output
// accumulators of the value chunk (CVT channels).
template <class T, Precision P, int CVT>
struct OnlineSoftmax {
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.0f, 0.0f};
  float o[CVT / 8][4] = {};

  // Folds in the scores s of one block of BN keys (keys: which get weight), scaled by scale_log2,
  // and O += P V with the block's value tile vt, stored [c][n] with stride ld, over its first
  // 16 channel_pairs channels (the streamed forward's wide class sizes its chunk at run time).
  template <int BN>
  __device__ __forceinline__ void add(float (&s)[BN / 8][4], const KeyBlock<BN>& keys, float scale_log2, const T* vt,
                                      int ld, int lane, int channel_pairs = CVT / 16) {
    const int t = lane % 4;
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = keys.kept(8 * nt + 2 * t + e % 2) ? s[nt][e] * scale_log2 : kNegInf;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
      }
    }
    float shift[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = quad_max(tile_max[r]);
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
    AccumulatorA<T, P, BN> pf;
    to_a_fragments<T>(pf, s);
    mma_tile<true>(o, pf, vt, ld, BN / kMmaK<T>, channel_pairs, lane);  // O += P V, V stored [c][n]
  }

  // Writes channels c0 .. c_end - 1 of out (Cv, Nq) for the warp's rows (row g being row0), and
  // from the first chunk's blocks (c0 = 0) their lse (natural log); out and lse at the batch element.
  __device__ __forceinline__ void store(T* out, float* lse, int64_t row0, int64_t nq, int c_end, int64_t c0, int lane) {
    const int t = lane % 4;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] = quad_sum(row_sum[r]);
      inv[r] = row_sum[r] == 0.0f ? 0.0f : 1.0f / row_sum[r];  // 0: every key masked out, and o is 0 too
    }
#pragma unroll
    for (int c = 0; c < CVT / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = row0 + 8 * (e / 2), ch = c0 + 8 * c + 2 * t + e % 2;
        if (m < nq && ch < c_end) out[ch * nq + m] = from_float<T>(o[c][e] * inv[e / 2]);
      }
    }
    if (c0 == 0 && t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row0 + 8 * r < nq) lse[row0 + 8 * r] = (row_max[r] + log2f(row_sum[r])) * kLn2;
      }
    }
  }
};

// One block (8 warps) per SM as the register budget: 128 registers a thread would make ptxas
// spill the fragments of most tile widths. FlashAttention-2 runs two blocks of 4 warps.
template <class T, Precision P, int DT, int CVT>
__global__ void __launch_bounds__(kThreads, 1)
    forward_mma_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const uint8_t* __restrict__ key_mask, T* __restrict__ out, float* __restrict__ lse,
                       WarpShape shape, float scale_log2, MmaGrid grid) {
  using L = MmaTiles<T, DT, CVT>;
  constexpr int BN = kMmaBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const rs = reinterpret_cast<T*>(smem);  // two K stages; the Q tile before the key loop
  T* const vs = rs + 2 * L::ROW_STAGE;       // two value stages, [c][n]
  T* const qs = kIsFloat<T> ? vs + 2 * L::VAL_STAGE : rs;  // float32: Q stays, after the stages

  const int64_t block = blockIdx.x;
  const int64_t m0 = grid.row0(block), c0 = grid.chunk(block) * CVT, b = grid.batch(block);
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  to_batch(b, shape, q, k, v, key_mask);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int K = kMmaK<T>;
  const int d_steps = (d + K - 1) / K;  // k steps of the score product; the rest of DT is zeros

  ResidentA<T, P, DT> qf = {};
  stage_resident<T, DT, CVT>(qs, vs, q, nullptr, nq, d, cv, m0);
  row_fragments<T, DT>(qf, qs, L::LD_D, d_steps);
  __syncthreads();  // the stages are free for the keys

  OnlineSoftmax<T, P, CVT> softmax;
  stream_blocks<T, DT, CVT>(rs, vs, k, v, nk, d, cv, c0, [&](int64_t n0, const T* kt, const T* vt) {
    float s[BN / 8][4] = {};
    mma_tile<true>(s, qf, kt, L::LD_D, d_steps, BN / 16, lane);
    softmax.add(s, KeyBlock<BN>(key_mask, nk, n0), scale_log2, vt, L::LD_N, lane);
  });
  softmax.store(out + b * cv * nq, lse + b * nq, m0 + 16 * warp + lane / 4, nq, cv, c0, lane);
}

// a if A, else b.
template <bool A, class X>
__device__ __forceinline__ const X& pick(const X& a, const X& b) {
  if constexpr (A) {
    return a;
  } else {
    return b;
  }
}

// dQ for the block's 128 queries and its chunk of kOutD columns (grid.cv_chunks D chunks).
template <class T, Precision P, int DT, int CVT>
__global__ void __launch_bounds__(kThreads, 1)
    backward_dq_mma_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const uint8_t* __restrict__ key_mask,
                           const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq,
                           WarpShape shape, float scale, MmaGrid grid, MmaBackwardTiles<T, DT, CVT> tiles) {
  using L = MmaBackwardTiles<T, DT, CVT>;
  constexpr int BN = kMmaBN, SB = L::kSub, DO = L::kOutD;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const rs = reinterpret_cast<T*>(smem);  // two K stages; Q before the key loop where held
  T* const vs = rs + 2 * L::ROW_STAGE;       // two V stages [c][n]; dOut [c][m] before where held
  T* const own = rs + tiles.own();
  T* const qs = L::kRowsInRegisters ? rs : own;
  T* const os = L::kValsInRegisters ? vs : own + (L::kRowsInRegisters ? 0 : L::ROWS);

  const int64_t block = blockIdx.x;
  const int64_t m0 = grid.row0(block), b = grid.batch(block);
  const int d0 = static_cast<int>(grid.chunk(block)) * DO;  // the block's dQ columns
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  to_batch(b, shape, q, k, v, key_mask);
  grad_out += b * cv * nq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;
  constexpr int K = kMmaK<T>;
  const int d_out = d - d0 < DO ? d - d0 : DO;
  const int d_steps = (d + K - 1) / K, d_pairs = (d_out + 15) / 16;
  const float scale_log2 = scale * kLog2e;

  RowA<T, P, DT, !L::kRowsInRegisters> qf = {};
  ColumnA<T, P, CVT, !L::kValsInRegisters> of = {};
  stage_resident<T, DT, CVT>(qs, os, q, grad_out, nq, d, cv, m0, tiles.channels);
  row_fragments<T, DT>(qf, qs, L::LD_D, d_steps);
  column_fragments<T, CVT>(of, os, L::LD_R);
  __syncthreads();  // the stages are free for the keys
  // Rows g and g + 8: lse in base 2 and delta; rows past Nq get P = 0.
  const int64_t row0 = m0 + 16 * warp + lane / 4;
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t m = row0 + 8 * r;
    lse2[r] = m < nq ? lse[b * nq + m] * kLog2e : -kNegInf;
    dlt[r] = m < nq ? delta[b * nq + m] : 0.0f;
  }

  float acc[DO / 8][4] = {};
  stream_stages<T, DT>(rs, vs, tiles.val_stage(), tiles.channels, k, v, nk, d, cv, 0,
                       [&](int64_t n0, const T* kt, const T* vt) {
    const KeyBlock<BN> keys(key_mask, nk, n0);
    // Keys j0 .. j0 + SB - 1 of the block at a time (kSub).
#pragma unroll 1
    for (int j0 = 0; j0 < BN; j0 += SB) {
      const T* const kj = kt + j0 * L::LD_D;
      float s[SB / 8][4] = {}, dp[SB / 8][4] = {};
      mma_tile<true>(s, qf, kj, L::LD_D, d_steps, SB / 16, lane);
      mma_value_channels<T, CVT>(dp, of, vt + j0, L::LD_N, cv, lane);  // dP = dOut V^T, V stored [c][n]
#pragma unroll
      for (int nt = 0; nt < SB / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool kept = keys.kept(j0 + 8 * nt + 2 * t + e % 2);
          const float p = kept ? exp2f(s[nt][e] * scale_log2 - lse2[e / 2]) : 0.0f;
          s[nt][e] = p * (dp[nt][e] - dlt[e / 2]) * scale;
        }
      }
      AccumulatorA<T, P, SB> dsf;
      to_a_fragments<T>(dsf, s);
      mma_tile<false>(acc, dsf, kj + d0, L::LD_D, SB / K, d_pairs, lane);  // dQ += dS K, K stored [n][d]
    }
  });

  store_accumulators<false>(dq + b * nq * d + d0, acc, row0, nq, d_out, d);
}

// dK blocks: dK for the block's 128 keys and its chunk of kOutD columns (grid.cv_chunks D
// chunks), and dV for all channels unless kDvSplit; with kDvSplit, DV_ONLY blocks: dV for the
// kDvChunk channels of their chunk (grid.cv_chunks channel chunks).
template <class T, Precision P, int DT, int CVT, bool DV_ONLY>
__global__ void __launch_bounds__(kThreads, 1)
    backward_dkdv_mma_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const uint8_t* __restrict__ key_mask,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             float* __restrict__ dk, float* __restrict__ dv, WarpShape shape, float scale,
                             MmaGrid grid, MmaBackwardTiles<T, DT, CVT> tiles) {
  using L = MmaBackwardTiles<T, DT, CVT>;
  constexpr int BM = kMmaBN, SB = L::kSub, DO = L::kOutD, DVT = L::kDvChunk;
  static_assert(!DV_ONLY || L::kDvSplit, "dV-only blocks only where dK and dV are split");
  constexpr bool WITH_DV = DV_ONLY || !L::kDvSplit;
  // K's fragments: held for the whole loop (staged), read per query block, or per k step.
  constexpr bool K_HELD = L::kKHeld, K_PER_BLOCK = L::kRowsInRegisters && !L::kKHeld;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const rs = reinterpret_cast<T*>(smem);  // two Q stages; K before the query loop where held
  T* const vs = rs + 2 * L::ROW_STAGE;       // two dOut stages, [c][m]
  T* const own = rs + tiles.own();
  T* const ks = K_HELD ? rs : own;           // the resident K rows
  T* const vr = own + (K_HELD ? 0 : L::ROWS);  // the resident V columns, [c][n]

  const int64_t block = blockIdx.x;
  const int64_t n0 = grid.row0(block);
  const int chunk = static_cast<int>(grid.chunk(block));
  const int c0 = DV_ONLY ? chunk * DVT : 0, d0 = DV_ONLY ? 0 : chunk * DO;
  const int64_t b = grid.batch(block);
  const int64_t nq = shape.nq, nk = shape.nk;
  const int d = shape.d, cv = shape.cv;
  to_batch(b, shape, q, k, v, key_mask);
  grad_out += b * cv * nq;
  lse += b * nq;
  delta += b * nq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % 4;
  constexpr int K = kMmaK<T>;
  const int d_out = d - d0 < DO ? d - d0 : DO;
  const int d_steps = (d + K - 1) / K, d_pairs = (d_out + 15) / 16;
  // dOut channels c0 .. c0 + DVT - 1 (DV_ONLY), else every channel: dP sums over them.
  const int load_cv = DV_ONLY ? (tiles.channels - c0 < DVT ? tiles.channels - c0 : DVT) : tiles.channels;
  [[maybe_unused]] const int dv_pairs = DV_ONLY ? (load_cv + 15) / 16 : DVT / 16;
  const float scale_log2 = scale * kLog2e;

  using KA = RowA<T, P, DT, !L::kRowsInRegisters>;
  using VA = ColumnA<T, P, CVT, !L::kValsInRegisters>;
  stage_resident<T, DT, CVT>(ks, vr, k, DV_ONLY ? nullptr : v, nk, d, cv, n0, tiles.channels);
  KA k_loop = {};  // the fragments for the whole loop (unless read per query block)
  VA v_loop = {};
  if constexpr (!K_PER_BLOCK) row_fragments<T, DT>(k_loop, ks, L::LD_D, d_steps);
  if constexpr (!L::kValsInRegisters) column_fragments<T, CVT>(v_loop, vr, L::LD_R);
  if constexpr (K_HELD) __syncthreads();  // the stages are free for the queries
  const int64_t row0 = n0 + 16 * warp + lane / 4;  // keys g and g + 8 of the warp
  const bool kept[2] = {key_kept(key_mask, nk, row0), key_kept(key_mask, nk, row0 + 8)};

  float acc_dk[DV_ONLY ? 1 : DO / 8][4] = {}, acc_dv[WITH_DV ? DVT / 8 : 1][4] = {};
  stream_stages<T, DT>(rs, vs, tiles.val_stage(), load_cv, q, grad_out, nq, d, cv, c0,
                       [&](int64_t m0, const T* qt, const T* ot) {
    KA k_block = {};
    VA v_block = {};
    if constexpr (K_PER_BLOCK) row_fragments<T, DT>(k_block, ks, L::LD_D, d_steps);
    if constexpr (!DV_ONLY && L::kValsInRegisters) column_fragments<T, CVT>(v_block, vr, L::LD_R);
    const KA& kf = pick<K_PER_BLOCK>(k_block, k_loop);
    const VA& vf = pick<L::kValsInRegisters>(v_block, v_loop);
    const QueryColumns columns(lse, delta, m0, nq, lane);
    // Queries i0 .. i0 + SB - 1 of the block at a time (kSub).
#pragma unroll 1
    for (int i0 = 0; i0 < BM; i0 += SB) {
      const T* const qi = qt + i0 * L::LD_D;
      float s[SB / 8][4] = {}, dp[SB / 8][4] = {};
      mma_tile<true>(s, kf, qi, L::LD_D, d_steps, SB / 16, lane);  // S^T = K Q^T, Q stored [m][d]
      if constexpr (!DV_ONLY) {
        mma_value_channels<T, CVT>(dp, vf, ot + i0, L::LD_N, cv, lane);  // dP^T = V dOut^T, dOut stored [c][m]
      }
#pragma unroll
      for (int nt = 0; nt < SB / 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {  // this lane's query columns m0 + i0 + 8 nt + 2 t + j
          const int64_t m = m0 + i0 + 8 * nt + 2 * t + j;
          float lse2, dlt;
          columns.get(i0 / 2 + 4 * nt + t, j, lse2, dlt);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int e = 2 * r + j;
            const float p = kept[r] && m < nq ? exp2f(s[nt][e] * scale_log2 - lse2) : 0.0f;
            s[nt][e] = p;
            if constexpr (!DV_ONLY) dp[nt][e] = p * (dp[nt][e] - dlt) * scale;
          }
        }
      }
      AccumulatorA<T, P, SB> f;
      to_a_fragments<T>(f, s);
      if constexpr (WITH_DV) mma_tile<true>(acc_dv, f, ot + i0, L::LD_N, SB / K, dv_pairs, lane);  // dV += P^T dOut
      if constexpr (!DV_ONLY) {
        to_a_fragments<T>(f, dp);
        mma_tile<false>(acc_dk, f, qi + d0, L::LD_D, SB / K, d_pairs, lane);  // dK += dS^T Q, Q stored [m][d]
      }
    }
  });

  if (!DV_ONLY && dk != nullptr) store_accumulators<false>(dk + b * nk * d + d0, acc_dk, row0, nk, d_out, d);
  if (WITH_DV && dv != nullptr) store_accumulators<true>(dv + (b * cv + c0) * nk, acc_dv, row0, nk, cv - c0, nk);
}

// Runs correspondence_warp_backward<T> where uses_mma_backward<T>: dQ blocks, then dK and dV
// blocks (with kDvSplit dK blocks, then dV-only blocks), each launch through
// launch(kernel, blocks, dynamic shared bytes, kernel arguments...) -> cudaError_t: the CUDA
// launcher's (correspondence_warp.cuh), the CPU emulation's (testing/harness.cpp) or the launch
// plan's (testing/launch_probe.cu, which reads the grid and the tiles from the arguments).
template <class T, class Launch>
cudaError_t backward_mma(const T* grad_out, const T* q, const T* k, const T* v, const uint8_t* key_mask,
                         const float* lse, const float* delta, float* dq, float* dk, float* dv, const WarpShape& shape,
                         float scale, Precision precision, Launch&& launch) {
  return with_mma_tiles<T, kMmaBackwardD<T>, kMmaBackwardCv<T>>(shape, precision, [&](auto p, auto dt, auto cvt) {
    constexpr Precision P = decltype(p)::value;
    constexpr int DT = decltype(dt)::value, CVT = decltype(cvt)::value;
    using L = MmaBackwardTiles<T, DT, CVT>;
    const L tiles(shape.cv);
    const int64_t batch = shape.batch;
    if (dq != nullptr) {
      const MmaGrid grid = L::dq_grid(shape);
      const cudaError_t err = launch(backward_dq_mma_kernel<T, P, DT, CVT>, grid.blocks(batch), tiles.dq_bytes(),
                                     grad_out, q, k, v, key_mask, lse, delta, dq, shape, scale, grid, tiles);
      if (err != cudaSuccess) return err;
    }
    if (dk != nullptr || (dv != nullptr && !L::kDvSplit)) {
      const MmaGrid grid = L::dk_grid(shape);
      const cudaError_t err = launch(backward_dkdv_mma_kernel<T, P, DT, CVT, false>, grid.blocks(batch),
                                     tiles.dkdv_bytes(), grad_out, q, k, v, key_mask, lse, delta, dk, dv, shape,
                                     scale, grid, tiles);
      if (err != cudaSuccess) return err;
    }
    if constexpr (L::kDvSplit) {
      if (dv != nullptr) {
        const MmaGrid grid = L::dv_grid(shape);
        return launch(backward_dkdv_mma_kernel<T, P, DT, CVT, true>, grid.blocks(batch), tiles.dkdv_bytes(),
                      grad_out, q, k, v, key_mask, lse, delta, dk, dv, shape, scale, grid, tiles);
      }
    }
    return cudaSuccess;
  });
}

}  // namespace cuda
}  // namespace cocos_kernels
