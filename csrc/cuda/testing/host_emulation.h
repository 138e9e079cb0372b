// Runs the CUDA kernels of this folder on the CPU, for tests on machines without a GPU: included
// (g++ -include) before the kernel headers, it turns the CUDA keywords into plain C++ and emulates
// one thread block with kThreads std::threads (__syncthreads: a std::barrier; warp shuffles: a
// per-warp exchange buffer between two warp barriers). Blocks run one after another, all sharing
// one dynamic shared-memory buffer. By default TensorCores<T> is false on the host and
// float16/bfloat16 tiles take the float32 FMA path; with -DCOCOS_KERNELS_EMULATE_WMMA they take
// the WMMA branch of tile_mma, run by the nvcuda::wmma emulation below. The PTX operations of
// mma.cuh (cp.async, ldmatrix, mma.sync) always run on the emulation below, lane by lane.
#pragma once

#define COCOS_KERNELS_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

namespace emu {
struct Index {
  unsigned x, y, z;
};
inline thread_local Index thread_index{0, 0, 0};
inline Index block_index{0, 0, 0};
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barriers[32] = {};
inline float exchange[32][32];
}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_sync(unsigned, float value, int src_lane) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emu::exchange[warp][lane] = value;
  emu::warp_barriers[warp]->arrive_and_wait();
  const float other = emu::exchange[warp][src_lane % 32];
  emu::warp_barriers[warp]->arrive_and_wait();
  return other;
}

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emu::exchange[warp][lane] = value;
  emu::warp_barriers[warp]->arrive_and_wait();
  const float other = emu::exchange[warp][lane ^ static_cast<unsigned>(offset)];
  emu::warp_barriers[warp]->arrive_and_wait();
  return other;
}

namespace emu {
// The first fault an emulated PTX operation met (a misaligned address); the harness reports it.
inline std::atomic<const char*> fault{nullptr};
inline void fail(const char* what) {
  const char* none = nullptr;
  fault.compare_exchange_strong(none, what);
}
inline const char* take_fault() { return fault.exchange(nullptr); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The dynamic shared memory of the launch, [shared_begin, shared_end), where the harness sets it
// (else unchecked): cp.async destinations, ldmatrix rows and 32-bit shared loads (mma.cuh: lds)
// outside it fault, as they would on a GPU.
inline const unsigned char* shared_begin = nullptr;
inline const unsigned char* shared_end = nullptr;
inline void check_shared(const void* p, size_t bytes, const char* what) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (shared_begin != nullptr && (q < shared_begin || q + bytes > shared_end)) fail(what);
}

// Every lane of the warp gets every lane's payload (all 32 lanes call it, as a .sync instruction).
alignas(16) inline unsigned char lane_payloads[32][32][64];
template <class P>
void warp_gather(const P& mine, P (&all)[32]) {
  static_assert(sizeof(P) <= 64 && std::is_trivially_copyable_v<P>, "a payload fits the exchange buffer");
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::memcpy(lane_payloads[warp][lane], &mine, sizeof(P));
  warp_barriers[warp]->arrive_and_wait();
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], lane_payloads[warp][l], sizeof(P));
  warp_barriers[warp]->arrive_and_wait();
}

// cp.async: each thread's copies wait in their commit group and happen only when a wait_group
// requires them (the latest the PTX ISA allows), so reading a stage before its wait reads stale
// data and fails the tests. A copy of fewer than 16 source bytes zero-fills the rest.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::deque<std::vector<AsyncCopy>> committed_groups;

inline void cp_async(void* dst, const void* src, int bytes) {
  if (!aligned16(dst) || !aligned16(src)) fail("cp.async: address not 16-byte aligned");
  check_shared(dst, 16, "cp.async: destination outside the launch's shared memory");
  open_group.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  committed_groups.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_async_wait(int pending) {
  while (static_cast<int>(committed_groups.size()) > pending) {
    for (const AsyncCopy& c : committed_groups.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
    }
    committed_groups.pop_front();
  }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane l's row address is row l % 8 of matrix l / 8.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (!aligned16(row)) fail("ldmatrix: row address not 16-byte aligned");
  check_shared(row, 16, "ldmatrix: row outside the launch's shared memory");
  const void* rows[32];
  warp_gather(row, rows);
  const unsigned lane = threadIdx.x % 32;
  auto element = [&](int matrix, int i, int j) {
    uint16_t x;
    std::memcpy(&x, static_cast<const unsigned char*>(rows[8 * matrix + i]) + 2 * j, 2);
    return static_cast<uint32_t>(x);
  };
  const int a = lane / 4, b = 2 * (lane % 4);
  for (int m = 0; m < 4; ++m) {
    r[m] = trans ? element(m, b, a) | element(m, b + 1, a) << 16 : element(m, a, b) | element(m, a, b + 1) << 16;
  }
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw x;
    x.x = static_cast<unsigned short>(bits);
    return __bfloat162float(__nv_bfloat16(x));
  }
  __half_raw x;
  x.x = static_cast<unsigned short>(bits);
  return __half2float(__half(x));
}

// This lane's d[e] += sum over k < K of A(i, k) B(k, j), where D(i, j) with i = g + 8 (e / 2),
// j = 2 t + e % 2 (g = lane / 4, t = lane % 4) is the float accumulator layout of m16n8k16 and
// m16n8k8 alike; one fma per product, in k order.
template <int K, class FragA, class FragB>
inline void accumulate_fragment(float (&d)[4], FragA A, FragB B) {
  const int g = static_cast<int>(threadIdx.x % 32) / 4, t = static_cast<int>(threadIdx.x % 4);
  for (int e = 0; e < 4; ++e) {
    const int i = g + 8 * (e / 2), j = 2 * t + e % 2;
    float acc = d[e];
    for (int k = 0; k < K; ++k) acc = std::fma(A(i, k), B(k, j), acc);
    d[e] = acc;
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 with d as c, from the PTX ISA's
// fragment layouts (g = lane / 4, t = lane % 4): A(i, k) is in lane 4 (i % 8) + (k % 8) / 2,
// register i / 8 + 2 (k / 8), half k % 2; B(k, n) in lane 4 n + (k % 8) / 2, register k / 8,
// half k % 2; this lane's d[e] is D(g + 8 (e / 2), 2 t + e % 2).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  Operands all[32];
  warp_gather(Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all);
  auto A = [&](int i, int k) {
    return half_bits_to_float(all[4 * (i % 8) + (k % 8) / 2].a[i / 8 + 2 * (k / 8)] >> (16 * (k % 2)), bf16);
  };
  auto B = [&](int k, int n) {
    return half_bits_to_float(all[4 * n + (k % 8) / 2].b[k / 8] >> (16 * (k % 2)), bf16);
  };
  accumulate_fragment<16>(d, A, B);
}

// cvt.rna.tf32.f32: 10 mantissa bits, to nearest with ties away from zero (add half of the
// dropped range to the magnitude, then truncate); infinities and NaNs pass unchanged.
inline uint32_t to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;
  return bits & ~0x1fffu;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 with d as c (g = lane / 4, t = lane % 4):
// A(i, k) is in lane 4 (i % 8) + k % 4, register i / 8 + 2 (k / 4); B(k, n) in lane 4 n + k % 4,
// register k / 4; d as m16n8k16. An operand's low 13 bits are ignored, so an operand the kernel
// did not round is truncated. The products of tf32 values are exact in float.
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  Operands all[32];
  warp_gather(Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all);
  auto value = [](uint32_t bits) {
    bits &= ~0x1fffu;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  auto A = [&](int i, int k) { return value(all[4 * (i % 8) + k % 4].a[i / 8 + 2 * (k / 4)]); };
  auto B = [&](int k, int n) { return value(all[4 * n + k % 4].b[k / 4]); };
  accumulate_fragment<8>(d, A, B);
}
}  // namespace emu

#ifdef COCOS_KERNELS_EMULATE_WMMA
// Tensor cores emulated too: TensorCores<T> (tile.cuh) follows __CUDA_ARCH__, and the fragments
// below give nvcuda::wmma its documented meaning (row_major: element (i, j) at p[i * ldm + j];
// col_major: at p[i + j * ldm]). Every lane holds the whole 16x16 tile in float and computes the
// product itself; lane 0 stores it, so the other lanes' copies never race with it.
#include <mma.h>  // nothing on the host; included before __CUDA_ARCH__ is set
#define __CUDA_ARCH__ 800
#endif

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct accumulator {};
struct matrix_a {};
struct matrix_b {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float x[M * N];
};

inline float element(float x) { return x; }
inline float element(__half x) { return __half2float(x); }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (unsigned i = 0; i < 16; ++i)
    for (unsigned j = 0; j < 16; ++j) f.x[i * 16 + j] = element(row ? p[i * ldm + j] : p[i + j * ldm]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  for (unsigned i = 0; i < 16; ++i)
    for (unsigned j = 0; j < 16; ++j) f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm];
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], acc);
      out[i * 16 + j] = acc;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (unsigned i = 0; i < 16; ++i)
    for (unsigned j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda

namespace emu {
// Runs body() as `blocks` blocks of `threads` threads, block by block, the last first: a block that
// writes outside its own outputs is then overwritten by no later block and shows in the results.
template <class Body>
void launch(long long blocks, int threads, Body body) {
  for (long long b = blocks - 1; b >= 0; --b) {
    block_index = {static_cast<unsigned>(b), 0, 0};
    std::barrier<> block(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (int w = 0; w < threads / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
      warp_barriers[w] = warps.back().get();
    }
    block_barrier = &block;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([t, &body] {
        thread_index = {static_cast<unsigned>(t), 0, 0};
        body();
      });
    }
    for (auto& thread : pool) thread.join();
  }
}
}  // namespace emu
