// Host-side launchers of the CUDA kernels of correspondence_warp and its prologue.
//
// Plain CUDA runtime types only (no torch headers): the .cu files that define them compile in
// seconds with nvcc alone, and bindings.cpp (the one file with <torch/extension.h>) does the
// argument checks, allocation and error reporting. Every launcher returns the launch's
// cudaError_t (cudaGetLastError after the launch, or the failing runtime call's error).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace cocos_kernels {
namespace cuda {

// Layouts, all contiguous: q (B, Nq, D), k (B, Nk, D) prepared feature rows; v (B, Cv, Nk);
// out, grad_out (B, Cv, Nq); lse, delta (B, Nq); key_mask (B, Nk) bytes (0: the key gets no
// weight) or null. T is float, __half or __nv_bfloat16; lse, delta and gradients are float.
struct WarpShape {
  int64_t batch, nq, nk;
  int d, cv;
};

// out = softmax(scale * q k^T) v per batch element, lse = the row logsumexp (natural log);
// a row whose keys are all masked gets out = 0 and lse = -inf.
template <class T>
cudaError_t correspondence_warp_forward(const T* q, const T* k, const T* v, const uint8_t* key_mask,
                                        T* out, float* lse, WarpShape shape, float scale,
                                        cudaStream_t stream);

// dq (B, Nq, D), dk (B, Nk, D), dv (B, Cv, Nk), each null where not requested; delta =
// rowsum(grad_out * out) (B, Nq). Every requested gradient is overwritten, never accumulated.
template <class T>
cudaError_t correspondence_warp_backward(const T* grad_out, const T* q, const T* k, const T* v,
                                         const uint8_t* key_mask, const float* lse,
                                         const float* delta, float* dq, float* dk, float* dv,
                                         WarpShape shape, float scale, cudaStream_t stream);

// Prologue for patch_size 1: x (B, C, N) float -> rows (B, N, C) in T, each position centred
// over channels (if center) and divided by (|x - mean| + eps) (if normalize).
template <class T>
cudaError_t prepare_features(const float* x, T* rows, int64_t batch, int64_t channels, int64_t n,
                             bool center, bool normalize, float eps, cudaStream_t stream);

// Its backward: grad_rows (B, N, C) float -> dx (B, C, N) float.
cudaError_t prepare_features_backward(const float* grad_rows, const float* x, float* dx,
                                      int64_t batch, int64_t channels, int64_t n, bool center,
                                      bool normalize, float eps, cudaStream_t stream);

}  // namespace cuda
}  // namespace cocos_kernels
