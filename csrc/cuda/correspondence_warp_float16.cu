// correspondence_warp kernels for float16 inputs (one dtype per translation unit: they build in parallel).
#include "correspondence_warp.cuh"

namespace cocos_kernels {
namespace cuda {
COCOS_KERNELS_INSTANTIATE_WARP(__half)
}  // namespace cuda
}  // namespace cocos_kernels
