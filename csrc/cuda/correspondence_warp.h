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

// Where each centre's feature is (the Triton backend's _Geometry). patch 1: prepared rows, as
// above. patch k > 1, k x k windows without the unfold (cocos_kernels/windows.py): q (B, len_q, C)
// and k (B, len_k, C) are zero-padded grids of C-wide rows (shape.d = C) of row width width_q /
// width_k, centre i at row lo + i (lo = (k/2) (width + 1)) and its tap (dy, dx) at row
// lo + i + (dy - k/2) width + (dx - k/2); a score is (sum over the k*k taps of <q row, k row>
// - dwin m_i m_j) a_i a_j, with dwin = k*k*C and the float per-centre window means m and score
// factors a: mq, aq (B, Nq), mk, ak (B, Nk). Nq, Nk (shape.nq, shape.nk) count centres.
struct WarpGeometry {
  int patch;
  int64_t len_q, len_k;      // rows per batch element
  int64_t lo_q, lo_k;        // row of centre 0
  int64_t width_q, width_k;  // padded row width
  float dwin;
  const float *mq, *aq, *mk, *ak;  // null for prepared rows
};

inline WarpGeometry prepared_rows(const WarpShape& s) {
  return WarpGeometry{1, s.nq, s.nk, 0, 0, 0, 0, 0.0f, nullptr, nullptr, nullptr, nullptr};
}

inline WarpGeometry window_geometry(const WarpShape& s, int patch, int64_t len_q, int64_t width_q, int64_t len_k,
                                    int64_t width_k, const float* mq, const float* aq, const float* mk,
                                    const float* ak) {
  const int64_t r = patch / 2;
  return WarpGeometry{patch, len_q, len_k, r * width_q + r, r * width_k + r, width_q, width_k,
                      static_cast<float>(patch * patch) * static_cast<float>(s.d), mq, aq, mk, ak};
}

// How float32 tile products are computed (the Triton backend's precision=): kIeee float32 FMAs;
// kTf32x3 tensor cores on tf32 inputs split in two, a = hi + lo, each product hi hi + hi lo + lo hi
// (near float32); kTf32 tensor cores on the inputs rounded to tf32. 16-bit inputs ignore it.
enum class Precision : int { kIeee = 0, kTf32x3 = 1, kTf32 = 2 };

// out = softmax(scale * scores) v per batch element, lse = the row logsumexp (natural log);
// a row whose keys are all masked gets out = 0 and lse = -inf.
template <class T>
cudaError_t correspondence_warp_forward(const T* q, const T* k, const T* v, const uint8_t* key_mask,
                                        T* out, float* lse, WarpShape shape, WarpGeometry geometry,
                                        float scale, Precision precision, cudaStream_t stream);

// dq, dk, dv (B, Cv, Nk), each null where not requested; delta = rowsum(grad_out * out) (B, Nq).
// Prepared rows: dq (B, Nq, D), dk (B, Nk, D); sums_q, sums_k unused. Windows: dq (k*k, B, Nq, C)
// and dk (k*k, B, Nk, C), plane t holding what each centre's tap t gets (sum_j H_ij k(j + tap t)
// for query i, H = dL/dscore a_i a_j; the caller adds each plane at its tap's row offset), and
// sums_q (2, B, Nq) = per query [sum_j H_ij m_j, sum_j dL/dscore_ij score_ij], written with dq;
// sums_k (2, B, Nk) the same summed over i for each key, written with dk. Rows with lse = +inf
// (padding centres) get P = 0. Every requested output is overwritten, never accumulated.
template <class T>
cudaError_t correspondence_warp_backward(const T* grad_out, const T* q, const T* k, const T* v,
                                         const uint8_t* key_mask, const float* lse,
                                         const float* delta, float* dq, float* dk, float* dv,
                                         float* sums_q, float* sums_k, WarpShape shape,
                                         WarpGeometry geometry, float scale, Precision precision,
                                         cudaStream_t stream);

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
