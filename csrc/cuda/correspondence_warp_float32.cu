// correspondence_warp kernels for float32 inputs (one dtype per translation unit: they build in parallel).
#include "correspondence_warp.cuh"

namespace cocos_kernels {
namespace cuda {
COCOS_KERNELS_INSTANTIATE_WARP(float)
}  // namespace cuda
}  // namespace cocos_kernels
