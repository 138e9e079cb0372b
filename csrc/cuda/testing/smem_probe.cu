// Prints the dynamic shared memory each kernel's launcher requests, one line per kernel layout and
// dtype: "<layout> <dtype> <bytes>". The layout is the kernel's function name without "_kernel",
// for the tensor-core kernels with the tiles it is instantiated for (forward_mma_D256_Cv16,
// forward_streamed_mma_Cv64), and backward_dkdv_windows for backward_dkdv_kernel on windows. The
// sizes come from the kernels' own layout code, the tiles from the launchers' own choice
// (uses_mma_forward / _backward, with_mma_tiles, with_streamed_tiles) over shapes that reach every
// choice, so a line may repeat. A host program (nvcc, no GPU): tests/test_cuda_build.py checks the
// sizes against the cards' limits, benchmarks/kernel_report.py takes them for the occupancy.
#include <cstdio>

#include "contextual_loss.cuh"
#include "correspondence_warp.cuh"

using namespace cocos_kernels::cuda;

template <class T>
void show(const char* dtype) {
  if (kIsFloat<T>) std::printf("forward %s %zu\n", dtype, ForwardSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dq %s %zu\n", dtype, BackwardDqSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dkdv %s %zu\n", dtype, BackwardDkDvSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dkdv_windows %s %zu\n", dtype, BackwardDkDvSmem<T>::carve(nullptr, nullptr, true));
  // The tensor-core kernels' tiles do not depend on the precision: 16-bit T takes kIeee, float32 tf32x3 here.
  const Precision p = kIsFloat<T> ? Precision::kTf32x3 : Precision::kIeee;
  for (const int d : {64, 128, 256, 512}) {  // D just at each tile width
    for (const int cv : {16, 64, 256}) {
      const WarpShape s{1, 1, 1, d, cv};
      const WarpGeometry g = prepared_rows(s);
      if (uses_mma_forward<T>(s, g, p)) {
        with_mma_tiles<T, kMmaForwardD<T>, 64>(s, p, [&](auto, auto dt, auto cvt) {
          using L = MmaTiles<T, decltype(dt)::value, decltype(cvt)::value>;
          std::printf("forward_mma_D%d_Cv%d %s %zu\n", dt(), cvt(), dtype, L::kForwardBytes);
        });
      }
      if (uses_mma_backward<T>(s, g, p)) {
        with_mma_tiles<T, kMmaBackwardD<T>, kMmaBackwardCv<T>>(s, p, [&](auto, auto dt, auto cvt) {
          using L = MmaTiles<T, decltype(dt)::value, decltype(cvt)::value>;
          std::printf("backward_dq_mma_D%d_Cv%d %s %zu\n", dt(), cvt(), dtype, L::kDqBytes);
          std::printf("backward_dkdv_mma_D%d_Cv%d %s %zu\n", dt(), cvt(), dtype, L::kDkDvBytes);
        });
      }
      with_streamed_tiles<T>(s, p, [&](auto, auto cvt) {
        std::printf("forward_streamed_mma_Cv%d %s %zu\n", cvt(), dtype, StreamedTiles<T, decltype(cvt)::value>::kBytes);
        std::printf("backward_streamed_mma_Cv%d %s %zu\n", cvt(), dtype,
                    StreamedTiles<T, decltype(cvt)::value>::kBackwardBytes);
      });
    }
  }
}

int main() {
  show<float>("float32");
  show<__half>("float16");
  show<__nv_bfloat16>("bfloat16");
  std::printf("contextual_forward float32 %zu\n", ContextualForwardSmem::carve(nullptr, nullptr));
  std::printf("contextual_backward float32 %zu\n", ContextualBackwardSmem::carve(nullptr, nullptr));
}
