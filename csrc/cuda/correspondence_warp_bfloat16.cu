// correspondence_warp kernels for bfloat16 inputs (one dtype per translation unit: they build in parallel).
#include "correspondence_warp.cuh"

namespace cocos_kernels {
namespace cuda {
COCOS_KERNELS_INSTANTIATE_WARP(__nv_bfloat16)
}  // namespace cuda
}  // namespace cocos_kernels
