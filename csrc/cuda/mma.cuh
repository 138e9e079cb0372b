// The PTX-level warp operations of the tensor-core kernels (correspondence_warp_mma.cuh,
// correspondence_warp_streamed_mma.cuh):
// cp.async global->shared copies, ldmatrix shared->register fragments, mma.sync m16n8k16 (16-bit
// inputs) and m16n8k8 with tf32 inputs (float32 inputs), and cvt.rna.tf32.f32.
//
// On the GPU each is one inline-asm instruction (sm_80 or newer). Under the CPU emulation
// (testing/host_emulation.h, COCOS_KERNELS_HOST_EMULATION) each calls the emulation's version,
// which implements the PTX ISA's per-lane fragment layouts; tests/test_cuda_build.py checks those
// lane by lane against the ISA's tables and against float64 products.
//
// Fragments are 32-bit registers holding two 16-bit elements, the lower-indexed one in the low
// half. With g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A (16 x 16, row): reg 0 (g, 2t..2t+1), reg 1 (g+8, 2t..), reg 2 (g, 2t+8..), reg 3 (g+8, 2t+8..)
//   B (16 x 8, col):  reg 0 (k 2t..2t+1, n g), reg 1 (k 2t+8..2t+9, n g)
//   C, D (16 x 8, float): c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// m16n8k8 tf32 (PTX ISA, "Matrix Fragments for mma.m16n8k8"), one 32-bit element per register:
//   A (16 x 8, row): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
//   B (8 x 8, col):  b0 (k t, n g), b1 (k t+4, n g)
//   C, D: as m16n8k16.
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i, and reg i of lane l holds
// that matrix's row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (.trans: column l / 4, rows
// 2 (l % 4) and 2 (l % 4) + 1).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cocos_kernels {
namespace cuda {

#if !defined(COCOS_KERNELS_HOST_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define COCOS_KERNELS_PTX 1
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Two 16-bit elements in one fragment register, lo in the low half.
__device__ __forceinline__ uint32_t bits(__half x) { return static_cast<__half_raw>(x).x; }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }
template <class T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return bits(lo) | bits(hi) << 16;
}

// dst[0..16) = src[0..16) if valid, else zeros; both 16-byte aligned. Completes at cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::cp_async(dst, src, valid ? 16 : 0);
#elif defined(COCOS_KERNELS_PTX)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#else
  __trap();  // the register-resident kernels are launched on sm_80 and newer only
#endif
}

// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::cp_async_commit();
#elif defined(COCOS_KERNELS_PTX)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (the newest ones).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::cp_async_wait(N);
#elif defined(COCOS_KERNELS_PTX)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8 x 8 matrices of 16-bit elements; this lane's row address is row (lane % 8) of matrix lane / 8.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::ldmatrix_x4(r, row, TRANS);
#elif defined(COCOS_KERNELS_PTX)
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  }
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

// d (16 x 8, float) += a (16 x 16) b (16 x 8), T = __half or __nv_bfloat16.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit inputs");
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::mma_16816(d, a, b, std::is_same_v<T, __nv_bfloat16>);
#elif defined(COCOS_KERNELS_PTX)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)a;
  (void)b;
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  __trap();
#endif
}

__device__ __forceinline__ float float_bits(uint32_t x) {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
#else
  return __uint_as_float(x);
#endif
}

// 32-bit shared-memory loads of float fragments: element i (i + 1 for the pair, i even) of a
// shared tile. The address is the tile's 32-bit shared address plus 4 i, so a lane's loads of a
// tile differ by immediate offsets (no 64-bit pointer per load). As volatile asm, like ldmatrix,
// they stay in program order with the mma.sync between them.
__device__ __forceinline__ float lds(const float* tile, int i) {
#if defined(COCOS_KERNELS_PTX)
  float x;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x) : "r"(shared_address(tile) + 4 * i));
  return x;
#else
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::check_shared(tile + i, 4, "ld.shared: outside the launch's shared memory");
#endif
  return tile[i];
#endif
}
__device__ __forceinline__ void lds_pair(float (&x)[2], const float* tile, int i) {
#if defined(COCOS_KERNELS_PTX)
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(x[0]), "=f"(x[1]) : "r"(shared_address(tile) + 4 * i));
#else
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::check_shared(tile + i, 8, "ld.shared.v2: outside the launch's shared memory");
#endif
  x[0] = tile[i];
  x[1] = tile[i + 1];
#endif
}

// x rounded to tf32 (10 mantissa bits, to nearest, ties away from zero), as a float's bits with
// the low 13 bits zero.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  return emu::to_tf32(x);
#elif defined(COCOS_KERNELS_PTX)
  uint32_t r;
  asm volatile("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  (void)x;
  __trap();
  return 0;
#endif
}

// d (16 x 8, float) += a (16 x 8) b (8 x 8), tf32 inputs.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(COCOS_KERNELS_HOST_EMULATION)
  emu::mma_1688_tf32(d, a, b);
#elif defined(COCOS_KERNELS_PTX)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)a;
  (void)b;
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  __trap();
#endif
}

}  // namespace cuda
}  // namespace cocos_kernels
