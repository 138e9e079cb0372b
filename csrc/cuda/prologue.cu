// Launchers of the prologue kernels (prologue.cuh).
#include "correspondence_warp.h"
#include "prologue.cuh"

namespace cocos_kernels {
namespace cuda {
namespace {

int64_t blocks_for(int64_t positions) { return (positions + kThreads - 1) / kThreads; }

}  // namespace

template <class T>
cudaError_t prepare_features(const float* x, T* rows, int64_t batch, int64_t channels, int64_t n,
                             bool center, bool normalize, float eps, cudaStream_t stream) {
  const int64_t blocks = blocks_for(batch * n);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  prologue_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, rows, batch, channels, n,
                                                                                 center, normalize, eps);
  return cudaGetLastError();
}

cudaError_t prepare_features_backward(const float* grad_rows, const float* x, float* dx, int64_t batch,
                                      int64_t channels, int64_t n, bool center, bool normalize, float eps,
                                      cudaStream_t stream) {
  const int64_t blocks = blocks_for(batch * n);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  prologue_backward_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      grad_rows, x, dx, batch, channels, n, center, normalize, eps);
  return cudaGetLastError();
}

template cudaError_t prepare_features<float>(const float*, float*, int64_t, int64_t, int64_t, bool, bool, float,
                                             cudaStream_t);
template cudaError_t prepare_features<__half>(const float*, __half*, int64_t, int64_t, int64_t, bool, bool,
                                              float, cudaStream_t);
template cudaError_t prepare_features<__nv_bfloat16>(const float*, __nv_bfloat16*, int64_t, int64_t, int64_t,
                                                     bool, bool, float, cudaStream_t);

}  // namespace cuda
}  // namespace cocos_kernels
