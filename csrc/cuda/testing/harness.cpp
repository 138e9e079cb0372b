// C entry points (for ctypes) running the correspondence_warp and contextual_loss kernels under
// host_emulation.h, with the grids of the real launchers. dtype: 0 float32, 1 float16, 2 bfloat16
// (q, k, v, out, grad_out, the prologue's rows); precision (float32 products) 0 ieee, 1 tf32x3,
// 2 tf32 (correspondence_warp.h: Precision); contextual_loss takes float32 only. The emu_windows_*
// entry points take the k x k window geometry (correspondence_warp.h: WarpGeometry).
#include <cstring>
#include <stdexcept>

#include "../contextual_loss.cuh"
#include "../correspondence_warp.cuh"
#include "../mma.cuh"
#include "../prologue.cuh"

namespace cocos_kernels {
namespace cuda {
alignas(128) unsigned char smem[1 << 18];  // the kernels' `extern __shared__` buffer
}  // namespace cuda
}  // namespace cocos_kernels

namespace {
using namespace cocos_kernels::cuda;

void check_smem(size_t bytes) {
  if (bytes > sizeof(smem)) throw std::runtime_error("emulated shared memory too small");
}

// Runs a launch of the kernels on the CPU, as the launchers' launch(kernel, blocks, dynamic shared
// bytes, arguments...) does on the GPU, its shared-memory accesses through cp.async, ldmatrix and
// the mma kernels' shared loads checked against the dynamic shared memory it asks for.
constexpr auto emulated_launch = [](auto kernel, int64_t blocks, size_t bytes, auto... args) {
  check_smem(bytes);
  emu::shared_begin = smem;
  emu::shared_end = smem + bytes;
  emu::launch(blocks, kThreads, [&] { kernel(args...); });
  emu::shared_begin = emu::shared_end = nullptr;
  return cudaSuccess;
};

// The forward kernel and grid the launcher picks (with_forward_kernel). The mma kernels return
// the emulation's first fault (a misaligned or out-of-bounds cp.async or ldmatrix address) as 3.
template <class T>
int forward(const void* q, const void* k, const void* v, const uint8_t* mask, void* out, float* lse, WarpShape s,
            WarpGeometry g, float scale, Precision precision) {
  with_forward_kernel(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), mask,
                      static_cast<T*>(out), lse, s, g, scale, precision, emulated_launch);
  return emu::take_fault() == nullptr ? 0 : 3;
}

// The backward kernels and grids the launcher picks (backward_kernels); 3 as forward.
template <class T>
int backward(const void* grad_out, const void* q, const void* k, const void* v, const uint8_t* mask,
             const float* lse, const float* delta, float* dq, float* dk, float* dv, float* sums_q, float* sums_k,
             WarpShape s, WarpGeometry g, float scale, Precision precision) {
  auto in = [](const void* p) { return static_cast<const T*>(p); };
  backward_kernels(in(grad_out), in(q), in(k), in(v), mask, lse, delta, dq, dk, dv, sums_q, sums_k, s, g, scale,
                   precision, emulated_launch);
  return emu::take_fault() == nullptr ? 0 : 3;
}

template <class T>
void prologue(const float* x, void* rows, int64_t batch, int64_t channels, int64_t n, bool center, bool normalize,
              float eps) {
  emu::launch(ceil_div(batch * n, kThreads), kThreads, [&] {
    prologue_kernel<T>(x, static_cast<T*>(rows), batch, channels, n, center, normalize, eps);
  });
}

// One warp: each lane takes its A (4 registers), B (2) and D (4 floats) fragments from the arrays,
// runs `mma` on them and writes its D back.
template <class Mma>
void run_on_lanes(const uint32_t* a, const uint32_t* b, float* d, Mma mma) {
  emu::launch(1, 32, [&] {
    const int lane = threadIdx.x;
    uint32_t fa[4], fb[2];
    float fd[4];
    std::memcpy(fa, a + 4 * lane, sizeof(fa));
    std::memcpy(fb, b + 2 * lane, sizeof(fb));
    std::memcpy(fd, d + 4 * lane, sizeof(fd));
    mma(fd, fa, fb);
    std::memcpy(d + 4 * lane, fd, sizeof(fd));
  });
}
}  // namespace

extern "C" {
// The PTX operations of mma.cuh alone, on one warp (tests/test_cuda_build.py checks them against
// the PTX ISA's layouts); each returns 3 if the emulation met a misaligned address.
//
// ldmatrix .x4 (trans: .x4.trans) of a shared copy of `tile` (16-bit elements), lane l's row
// address at element offsets[l]; regs (32, 4) gets every lane's four registers.
int emu_ldmatrix_x4(const uint16_t* tile, int elements, const int* offsets, bool trans, uint32_t* regs) {
  check_smem(2 * static_cast<size_t>(elements));
  std::memcpy(smem, tile, 2 * static_cast<size_t>(elements));
  emu::launch(1, 32, [&] {
    const int lane = threadIdx.x;
    const uint16_t* row = reinterpret_cast<const uint16_t*>(smem) + offsets[lane];
    uint32_t r[4];
    if (trans) {
      ldmatrix_x4<true>(r, row);
    } else {
      ldmatrix_x4<false>(r, row);
    }
    std::memcpy(regs + 4 * lane, r, sizeof(r));
  });
  return emu::take_fault() == nullptr ? 0 : 3;
}

// mma.sync m16n8k16 (bf16: bfloat16 inputs, else float16): every lane's d (32, 4) += the product
// of the lanes' A (32, 4) and B (32, 2) fragments.
int emu_mma_16816(bool bf16, const uint32_t* a, const uint32_t* b, float* d) {
  run_on_lanes(a, b, d, [bf16](float (&fd)[4], const uint32_t (&fa)[4], const uint32_t (&fb)[2]) {
    if (bf16) {
      mma_16816<__nv_bfloat16>(fd, fa, fb);
    } else {
      mma_16816<__half>(fd, fa, fb);
    }
  });
  return 0;
}

// mma.sync m16n8k8 on tf32 inputs: as emu_mma_16816, with A (32, 4) and B (32, 2) one element per register.
int emu_mma_1688_tf32(const uint32_t* a, const uint32_t* b, float* d) {
  run_on_lanes(a, b, d, [](float (&fd)[4], const uint32_t (&fa)[4], const uint32_t (&fb)[2]) {
    mma_1688_tf32(fd, fa, fb);
  });
  return 0;
}

// cvt.rna.tf32.f32 of n floats: bits[i] gets the result's bit pattern.
int emu_to_tf32(const float* x, uint32_t* bits, int n) {
  for (int i = 0; i < n; ++i) bits[i] = to_tf32(x[i]);
  return 0;
}

// cp.async commit groups: each of 32 threads copies its 16 bytes of src[0, 512) in group 0, of
// src[512, 1024) in group 1 and a zero-fill (src-size 0) in group 2, into shared bytes [0, 1536)
// filled with 0xab; snapshots (3, 1536) is that shared memory after wait_group 2, 1 and 0.
int emu_cp_async(const unsigned char* src, unsigned char* snapshots) {
  constexpr int kBytes = 1536;
  std::memset(smem, 0xab, kBytes);
  emu::launch(1, 32, [&] {
    const int lane = threadIdx.x;
    cp_async_16(smem + 16 * lane, src + 16 * lane, true);
    cp_async_commit();
    cp_async_16(smem + 512 + 16 * lane, src + 512 + 16 * lane, true);
    cp_async_commit();
    cp_async_16(smem + 1024 + 16 * lane, src, false);
    cp_async_commit();
    auto snapshot = [&](int i) {
      __syncthreads();
      if (lane == 0) std::memcpy(snapshots + i * kBytes, smem, kBytes);
      __syncthreads();
    };
    cp_async_wait<2>();
    snapshot(0);
    cp_async_wait<1>();
    snapshot(1);
    cp_async_wait<0>();
    snapshot(2);
  });
  return emu::take_fault() == nullptr ? 0 : 3;
}

int emu_prepare_features(int dtype, const float* x, void* rows, int64_t batch, int64_t channels, int64_t n,
                         bool center, bool normalize, float eps) {
  switch (dtype) {
    case 0: prologue<float>(x, rows, batch, channels, n, center, normalize, eps); return 0;
    case 1: prologue<__half>(x, rows, batch, channels, n, center, normalize, eps); return 0;
    case 2: prologue<__nv_bfloat16>(x, rows, batch, channels, n, center, normalize, eps); return 0;
  }
  return 1;
}

int emu_prepare_features_backward(const float* grad_rows, const float* x, float* dx, int64_t batch,
                                  int64_t channels, int64_t n, bool center, bool normalize, float eps) {
  emu::launch(ceil_div(batch * n, kThreads), kThreads, [&] {
    prologue_backward_kernel(grad_rows, x, dx, batch, channels, n, center, normalize, eps);
  });
  return 0;
}

int emu_forward(int dtype, const void* q, const void* k, const void* v, const uint8_t* mask, void* out, float* lse,
                int64_t batch, int64_t nq, int64_t nk, int d, int cv, float scale, int precision) {
  const WarpShape s{batch, nq, nk, d, cv};
  const WarpGeometry g = prepared_rows(s);
  const Precision p = static_cast<Precision>(precision);
  switch (dtype) {
    case 0: return forward<float>(q, k, v, mask, out, lse, s, g, scale, p);
    case 1: return forward<__half>(q, k, v, mask, out, lse, s, g, scale, p);
    case 2: return forward<__nv_bfloat16>(q, k, v, mask, out, lse, s, g, scale, p);
  }
  return 1;
}

int emu_backward(int dtype, const void* grad_out, const void* q, const void* k, const void* v, const uint8_t* mask,
                 const float* lse, const float* delta, float* dq, float* dk, float* dv, int64_t batch, int64_t nq,
                 int64_t nk, int d, int cv, float scale, int precision) {
  const WarpShape s{batch, nq, nk, d, cv};
  const WarpGeometry g = prepared_rows(s);
  const Precision p = static_cast<Precision>(precision);
  switch (dtype) {
    case 0: return backward<float>(grad_out, q, k, v, mask, lse, delta, dq, dk, dv, nullptr, nullptr, s, g, scale, p);
    case 1: return backward<__half>(grad_out, q, k, v, mask, lse, delta, dq, dk, dv, nullptr, nullptr, s, g, scale, p);
    case 2:
      return backward<__nv_bfloat16>(grad_out, q, k, v, mask, lse, delta, dq, dk, dv, nullptr, nullptr, s, g, scale,
                                     p);
  }
  return 1;
}

// Windows: xq (B, len_q, C), xk (B, len_k, C) padded grids, mq / aq (B, Nq), mk / ak (B, Nk) float;
// v (B, Cv, Nk), out (B, Cv, Nq) and lse (B, Nq) on the centres.
int emu_windows_forward(int dtype, const void* xq, const float* mq, const float* aq, const void* xk,
                        const float* mk, const float* ak, const void* v, const uint8_t* mask, void* out, float* lse,
                        int64_t batch, int64_t nq, int64_t nk, int64_t len_q, int64_t len_k, int c, int cv,
                        int patch, int64_t width_q, int64_t width_k, float scale, int precision) {
  const WarpShape s{batch, nq, nk, c, cv};
  const WarpGeometry g = window_geometry(s, patch, len_q, width_q, len_k, width_k, mq, aq, mk, ak);
  const Precision p = static_cast<Precision>(precision);
  switch (dtype) {
    case 0: return forward<float>(xq, xk, v, mask, out, lse, s, g, scale, p);
    case 1: return forward<__half>(xq, xk, v, mask, out, lse, s, g, scale, p);
    case 2: return forward<__nv_bfloat16>(xq, xk, v, mask, out, lse, s, g, scale, p);
  }
  return 1;
}

// planes_q (k*k, B, Nq, C), planes_k (k*k, B, Nk, C), dv (B, Cv, Nk), rows (2, B, Nq), cols (2, B, Nk).
int emu_windows_backward(int dtype, const void* grad_out, const void* xq, const float* mq, const float* aq,
                         const void* xk, const float* mk, const float* ak, const void* v, const uint8_t* mask,
                         const float* lse, const float* delta, float* planes_q, float* planes_k, float* dv,
                         float* rows, float* cols, int64_t batch, int64_t nq, int64_t nk, int64_t len_q,
                         int64_t len_k, int c, int cv, int patch, int64_t width_q, int64_t width_k, float scale,
                         int precision) {
  const WarpShape s{batch, nq, nk, c, cv};
  const WarpGeometry g = window_geometry(s, patch, len_q, width_q, len_k, width_k, mq, aq, mk, ak);
  const Precision p = static_cast<Precision>(precision);
  switch (dtype) {
    case 0:
      return backward<float>(grad_out, xq, xk, v, mask, lse, delta, planes_q, planes_k, dv, rows, cols, s, g, scale, p);
    case 1:
      return backward<__half>(grad_out, xq, xk, v, mask, lse, delta, planes_q, planes_k, dv, rows, cols, s, g, scale,
                              p);
    case 2:
      return backward<__nv_bfloat16>(grad_out, xq, xk, v, mask, lse, delta, planes_q, planes_k, dv, rows, cols, s, g,
                                     scale, p);
  }
  return 1;
}

int emu_contextual_loss_forward(const float* x, const float* y, float* m, int64_t* argmin, float* s, float* t,
                                int64_t batch, int64_t nx, int64_t ny, int c, float bandwidth, float dist_eps) {
  check_smem(ContextualForwardSmem::carve(nullptr, nullptr));
  const ContextualShape shape{batch, nx, ny, c};
  const int64_t x_blocks = ceil_div(nx, BM);
  emu::launch(batch * x_blocks, kThreads, [&] {
    contextual_forward_kernel(x, y, m, argmin, s, t, shape, bandwidth, dist_eps, x_blocks);
  });
  return 0;
}

int emu_contextual_loss_backward(const float* grad_s, const float* x, const float* y, const float* m,
                                 const int64_t* argmin, const float* s, const float* t, float* dx, float* dy,
                                 int64_t batch, int64_t nx, int64_t ny, int c, float bandwidth, float dist_eps) {
  check_smem(ContextualBackwardSmem::carve(nullptr, nullptr));
  const ContextualShape shape{batch, nx, ny, c};
  if (dx != nullptr) {
    const int64_t x_blocks = ceil_div(nx, BM);
    emu::launch(batch * x_blocks, kThreads, [&] {
      contextual_backward_dx_kernel(grad_s, x, y, m, argmin, s, t, dx, shape, bandwidth, dist_eps, x_blocks);
    });
  }
  if (dy != nullptr) {
    const int64_t y_blocks = ceil_div(ny, BN);
    emu::launch(batch * y_blocks, kThreads, [&] {
      contextual_backward_dy_kernel(grad_s, x, y, m, argmin, s, t, dy, shape, bandwidth, dist_eps, y_blocks);
    });
  }
  return 0;
}
}
