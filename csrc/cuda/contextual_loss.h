// Host-side launchers of the CUDA kernels of contextual_loss (contextual_loss.cuh).
//
// Plain CUDA runtime types only, as correspondence_warp.h: bindings.cpp does the argument checks,
// allocation and error reporting. Every launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cocos_kernels {
namespace cuda {

// Layouts, all contiguous float32: x (B, Nx, C), y (B, Ny, C) prepared rows (centred,
// L2-normalised); per-row statistics m, s, t, grad_s (B, Nx) float, argmin (B, Nx) int64;
// dx (B, Nx, C), dy (B, Ny, C) float.
struct ContextualShape {
  int64_t batch, nx, ny;
  int c;
};

// With d_ij = 1 - <x_i, y_j> and c_i = bandwidth (m_i + dist_eps), per row i (as
// csrc/cpu/contextual_loss.h):
//   m_i = min_j d_ij, argmin_i = the lowest j reaching it,
//   s_i = sum_j e_ij, t_i = sum_j e_ij d_ij, e_ij = exp(min((m_i - d_ij) / c_i, 0)).
// Ny must be > 0.
cudaError_t contextual_loss_forward(const float* x, const float* y, float* m, int64_t* argmin, float* s,
                                    float* t, ContextualShape shape, float bandwidth, float dist_eps,
                                    cudaStream_t stream);

// Gradients w.r.t. the rows of a loss whose gradient w.r.t. s is grad_s: dx, dy (either null
// where not requested) are overwritten, never accumulated. Nx and Ny must be > 0 (with an empty
// side the gradients are zero: the caller fills them).
cudaError_t contextual_loss_backward(const float* grad_s, const float* x, const float* y, const float* m,
                                     const int64_t* argmin, const float* s, const float* t, float* dx,
                                     float* dy, ContextualShape shape, float bandwidth, float dist_eps,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace cocos_kernels
