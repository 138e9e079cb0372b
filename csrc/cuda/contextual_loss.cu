// Launchers of the contextual_loss kernels (contextual_loss.cuh); float32 rows only: the op layer
// prepares half inputs in float32 (their distances are divided by down to 5e-5).
#include "contextual_loss.cuh"

namespace cocos_kernels {
namespace cuda {

cudaError_t contextual_loss_forward(const float* x, const float* y, float* m, int64_t* argmin, float* s,
                                    float* t, ContextualShape shape, float bandwidth, float dist_eps,
                                    cudaStream_t stream) {
  if (shape.ny <= 0) return cudaErrorInvalidValue;
  const int64_t x_blocks = ceil_div(shape.nx, BM);
  return launch(contextual_forward_kernel, shape.batch * x_blocks, ContextualForwardSmem::carve(nullptr, nullptr),
                stream, x, y, m, argmin, s, t, shape, bandwidth, dist_eps, x_blocks);
}

cudaError_t contextual_loss_backward(const float* grad_s, const float* x, const float* y, const float* m,
                                     const int64_t* argmin, const float* s, const float* t, float* dx,
                                     float* dy, ContextualShape shape, float bandwidth, float dist_eps,
                                     cudaStream_t stream) {
  if (shape.nx <= 0 || shape.ny <= 0) return cudaErrorInvalidValue;
  const size_t bytes = ContextualBackwardSmem::carve(nullptr, nullptr);
  if (dx != nullptr) {
    const int64_t x_blocks = ceil_div(shape.nx, BM);
    const cudaError_t err = launch(contextual_backward_dx_kernel, shape.batch * x_blocks, bytes, stream, grad_s, x,
                                   y, m, argmin, s, t, dx, shape, bandwidth, dist_eps, x_blocks);
    if (err != cudaSuccess) return err;
  }
  if (dy != nullptr) {
    const int64_t y_blocks = ceil_div(shape.ny, BN);
    return launch(contextual_backward_dy_kernel, shape.batch * y_blocks, bytes, stream, grad_s, x, y, m, argmin, s,
                  t, dy, shape, bandwidth, dist_eps, y_blocks);
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace cocos_kernels
