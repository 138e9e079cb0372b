// Prologue kernels of correspondence_warp for patch_size 1 (the Triton prologue's arithmetic):
// each position's feature is centred over channels and divided by (|x - mean| + eps), in float32.
//
// One thread per position: reads of x (B, C, N) are coalesced across positions; the norm is
// taken in two passes (mean, then the scaled squares) rather than sum(x^2) - C mean^2, which
// cancels when the mean dwarfs the spread, and the squares are of (x - mean) / max|x - mean|, so
// float32 features of magnitude 1e20 (squares 1e40) or 1e-30 (squares 0) still get their norm.
#pragma once

#include "tile.cuh"

namespace cocos_kernels {
namespace cuda {

struct Moments {
  float mean, norm;
};

// x points at channel 0 of one position; channel c is x[c * n].
__device__ inline Moments center_and_norm(const float* x, int64_t channels, int64_t n, bool center) {
  float mean = 0.0f;
  if (center) {
    for (int64_t c = 0; c < channels; ++c) mean += x[c * n];
    mean /= static_cast<float>(channels);
  }
  float big = 0.0f;
  for (int64_t c = 0; c < channels; ++c) big = fmaxf(big, fabsf(x[c * n] - mean));
  const float scale = big > 0.0f ? big : 1.0f;
  float sq = 0.0f;
  for (int64_t c = 0; c < channels; ++c) {
    const float t = (x[c * n] - mean) / scale;
    sq = fmaf(t, t, sq);
  }
  return {mean, sqrtf(sq) * scale};
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    prologue_kernel(const float* __restrict__ x, T* __restrict__ rows, int64_t batch, int64_t channels,
                    int64_t n, bool center, bool normalize, float eps) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pos >= batch * n) return;
  const int64_t b = pos / n, i = pos % n;
  const float* xc = x + b * channels * n + i;
  const Moments m = center_and_norm(xc, channels, n, center);
  const float inv = normalize ? 1.0f / (m.norm + eps) : 1.0f;
  T* row = rows + pos * channels;
  for (int64_t c = 0; c < channels; ++c) row[c] = from_float<T>((xc[c * n] - m.mean) * inv);
}

__global__ void __launch_bounds__(kThreads)
    prologue_backward_kernel(const float* __restrict__ grad_rows, const float* __restrict__ x,
                             float* __restrict__ dx, int64_t batch, int64_t channels, int64_t n, bool center,
                             bool normalize, float eps) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pos >= batch * n) return;
  const int64_t b = pos / n, i = pos % n;
  const float* xc = x + b * channels * n + i;
  const float* g = grad_rows + pos * channels;
  float* dxc = dx + b * channels * n + i;
  const Moments m = center_and_norm(xc, channels, n, center);
  float g_sum = 0.0f, g_dot_c = 0.0f;
  for (int64_t c = 0; c < channels; ++c) {
    g_sum += g[c];
    g_dot_c = fmaf(g[c], xc[c * n] - m.mean, g_dot_c);
  }
  // f = c / s with s = |c| + eps: df/dc = I/s - c c^T / (s^2 |c|), and 0 radially where |c| = 0
  // (autograd's norm backward); centring then subtracts the channel mean of the gradient,
  // whose radial part has mean 0 because c does. Evaluated as inv (g - (c/|c|) (g . c/|c|) |c|/s):
  // every factor stays in float32's range even for |c| ~ 1e30 or 1e-30.
  const float safe_norm = m.norm > 0.0f ? m.norm : 1.0f;
  float inv = 1.0f, radial = 0.0f;
  if (normalize) {
    inv = 1.0f / (m.norm + eps);
    radial = (m.norm > 0.0f ? g_dot_c / safe_norm : 0.0f) * (m.norm * inv);
  }
  const float g_mean = center ? g_sum / static_cast<float>(channels) : 0.0f;
  for (int64_t c = 0; c < channels; ++c) {
    const float direction = (xc[c * n] - m.mean) / safe_norm;
    dxc[c * n] = ((g[c] - g_mean) - direction * radial) * inv;
  }
}

}  // namespace cuda
}  // namespace cocos_kernels
