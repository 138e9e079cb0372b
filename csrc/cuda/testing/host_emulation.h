// Runs the CUDA kernels of this folder on the CPU, for tests on machines without a GPU: included
// (g++ -include) before the kernel headers, it turns the CUDA keywords into plain C++ and emulates
// one thread block with kThreads std::threads (__syncthreads: a std::barrier; warp shuffles: a
// per-warp exchange buffer between two warp barriers). Blocks run one after another, all sharing
// one dynamic shared-memory buffer. By default TensorCores<T> is false on the host and
// float16/bfloat16 tiles take the float32 FMA path; with -DCOCOS_KERNELS_EMULATE_WMMA they take
// the WMMA branch of tile_mma, run by the nvcuda::wmma emulation below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <type_traits>
#include <cmath>
#include <memory>
#include <thread>
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

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emu::exchange[warp][lane] = value;
  emu::warp_barriers[warp]->arrive_and_wait();
  const float other = emu::exchange[warp][lane ^ static_cast<unsigned>(offset)];
  emu::warp_barriers[warp]->arrive_and_wait();
  return other;
}

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
// Runs body() as `blocks` blocks of `threads` threads, block by block.
template <class Body>
void launch(long long blocks, int threads, Body body) {
  for (long long b = 0; b < blocks; ++b) {
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
