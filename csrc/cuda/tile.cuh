// Shared-memory tile helpers of the CUDA kernels: loads with zero padding, and one tile product.
//
// Every tile lives in shared memory and every helper is called by all kThreads threads of the
// block (between __syncthreads). Tile products accumulate into float tiles.
//
// Tensor cores: float16/bfloat16 products go through WMMA (nvcuda::wmma, 16x16x16 fragments,
// float accumulators), hand-written and CUTLASS-free: its fragments load straight from the shared
// tiles in either layout (row- or column-major), so each product is the same few lines for every
// operand orientation the backward needs. (The half forward on rows keeps its fragments in
// registers instead, with raw mma.sync: correspondence_warp_mma.cuh; the kernels on windows and
// wider rows stream their operands to mma.sync: correspondence_warp_streamed_mma.cuh, whose
// backward takes Cv <= 64, 16-bit Cv <= 192.) float32 products here are plain FMAs in float32
// (precision ieee, and the float32 backward with Cv > 64 that the register-resident kernels do not
// take; tf32 is in those two files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace cocos_kernels {
namespace cuda {

constexpr int kThreads = 256;  // 8 warps; the helpers below assume exactly this block size
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Whether products of T tiles use tensor cores on the architecture being compiled.
template <class T>
struct TensorCores : std::false_type {};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
template <>
struct TensorCores<__half> : std::true_type {};
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
struct TensorCores<__nv_bfloat16> : std::true_type {};
#endif

// Row strides of the shared tiles: 16 bytes of padding per row (WMMA wants strides that are
// multiples of 16 bytes) shifts consecutive rows across the memory banks.
template <class T>
__host__ __device__ constexpr int padded(int cols) {
  return cols + 16 / static_cast<int>(sizeof(T));
}

// dst[r][c] = src[r0 + r][c0 + c] for an R x COLS tile of a row-major (rows x cols) matrix,
// zero outside it (ragged edges). Consecutive threads read consecutive columns.
template <int R, int COLS, class T, class U>
__device__ __forceinline__ void load_tile(T* dst, int ldd, const U* src, int64_t rows, int64_t cols,
                                          int64_t r0, int64_t c0) {
  for (int i = threadIdx.x; i < R * COLS; i += kThreads) {
    const int r = i / COLS, c = i % COLS;
    const int64_t gr = r0 + r, gc = c0 + c;
    const float x = (gr < rows && gc < cols) ? to_float(src[gr * cols + gc]) : 0.0f;
    dst[r * ldd + c] = from_float<T>(x);
  }
}

// The inverse for float tiles: dst[r0 + r][c0 + c] = src[r][c] inside the matrix.
template <int R, int COLS>
__device__ __forceinline__ void store_tile(float* dst, int64_t rows, int64_t cols, int64_t r0,
                                           int64_t c0, const float* src, int lds) {
  for (int i = threadIdx.x; i < R * COLS; i += kThreads) {
    const int r = i / COLS, c = i % COLS;
    const int64_t gr = r0 + r, gc = c0 + c;
    if (gr < rows && gc < cols) dst[gr * cols + gc] = src[r * lds + c];
  }
}

template <int R, int COLS>
__device__ __forceinline__ void zero_tile(float* dst, int ldd) {
  for (int i = threadIdx.x; i < R * COLS; i += kThreads) dst[(i / COLS) * ldd + i % COLS] = 0.0f;
}

// C (M x N, float, row stride ldc) += A (M x K) B (K x N), where
//   A(i, k) = A_ROW ? A[i * lda + k] : A[k * lda + i],  B(k, j) = B_ROW ? B[k * ldb + j] : B[j * ldb + k].
// M, N, K are multiples of 16; pointers are 32-byte aligned (the tiles start 128-byte aligned
// and every stride is a multiple of 16 bytes).
template <bool A_ROW, bool B_ROW, int M, int N, int K, class T>
__device__ __forceinline__ void tile_mma(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "tiles are multiples of 16");
  if constexpr (TensorCores<T>::value) {
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
    for (int t = threadIdx.x / 32; t < (M / 16) * (N / 16); t += kWarps) {
      const int i0 = (t / (N / 16)) * 16, j0 = (t % (N / 16)) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::load_matrix_sync(c, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, A_ROW ? A + i0 * lda + k0 : A + k0 * lda + i0, lda);
        wmma::load_matrix_sync(b, B_ROW ? B + k0 * ldb + j0 : B + j0 * ldb + k0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + i0 * ldc + j0, c, ldc, wmma::mem_row_major);
    }
  } else {
    // 16 x 16 threads, each owning the (M/16) x (N/16) elements (ty + 16 a, tx + 16 b).
    constexpr int TM = M / 16, TN = N / 16;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[TM][TN] = {};
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int r = 0; r < TM; ++r) {
        const int i = ty + 16 * r;
        a[r] = to_float(A_ROW ? A[i * lda + k] : A[k * lda + i]);
      }
#pragma unroll
      for (int s = 0; s < TN; ++s) {
        const int j = tx + 16 * s;
        b[s] = to_float(B_ROW ? B[k * ldb + j] : B[j * ldb + k]);
      }
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int s = 0; s < TN; ++s) acc[r][s] = fmaf(a[r], b[s], acc[r][s]);
    }
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int s = 0; s < TN; ++s) C[(ty + 16 * r) * ldc + tx + 16 * s] += acc[r][s];
  }
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Hands out 128-byte aligned pieces of dynamic shared memory. With a null base it only counts,
// so the host computes a kernel's shared-memory size with the same code that lays it out.
struct SmemCarver {
  unsigned char* base;
  size_t used = 0;
  template <class U>
  __host__ __device__ U* take(int count) {
    U* p = base == nullptr ? nullptr : reinterpret_cast<U*>(base + used);
    used += (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
    return p;
  }
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether key n of a batch element gets weight (key_mask: its bytes, or null for all).
__device__ __forceinline__ bool key_kept(const uint8_t* key_mask, int64_t nk, int64_t n) {
  return n < nk && (key_mask == nullptr || key_mask[n] != 0);
}

// The grid is one-dimensional (up to 2^31 - 1 blocks, no 65535 limit on any axis); blocks
// iterate over (batch, chunk, block) with the block index fastest.
constexpr int64_t kMaxBlocks = 2147483647;

}  // namespace cuda
}  // namespace cocos_kernels
