// Device-side helpers of WarpGeometry (correspondence_warp.h) for the k x k window form: tap
// offsets and per-centre factors, shared by the FMA kernels (correspondence_warp.cuh) and the
// streamed tensor-core kernels (correspondence_warp_streamed_mma.cuh).
#pragma once

#include "correspondence_warp.h"

namespace cocos_kernels {
namespace cuda {

// Windows: whether the geometry carries per-centre factors (prepared rows have none).
__host__ __device__ __forceinline__ bool windowed(const WarpGeometry& g) { return g.mq != nullptr; }

// Row offset of tap t (row-major over the patch x patch window) from its centre's row.
__device__ __forceinline__ int64_t tap_offset(int patch, int64_t width, int t) {
  return (t / patch - patch / 2) * width + (t % patch - patch / 2);
}

// Per-centre factor n of one batch element (f already offset to it); 0 past the centres.
__device__ __forceinline__ float centre_factor(const float* f, int64_t count, int64_t n) {
  return n < count ? f[n] : 0.0f;
}

// One batch element's per-centre factors (null for prepared rows).
struct Factors {
  const float *mq, *aq, *mk, *ak;
  float dwin;
  __device__ Factors(const WarpGeometry& g, int64_t b, int64_t nq, int64_t nk)
      : mq(g.mq ? g.mq + b * nq : nullptr), aq(g.aq ? g.aq + b * nq : nullptr),
        mk(g.mk ? g.mk + b * nk : nullptr), ak(g.ak ? g.ak + b * nk : nullptr), dwin(g.dwin) {}
};

}  // namespace cuda
}  // namespace cocos_kernels
