// Prints the dynamic shared memory each kernel's launcher requests, one line per kernel layout and
// dtype: "<layout> <dtype> <bytes>". The layout is the kernel's function name without "_kernel",
// for the tensor-core kernels with the tiles it is instantiated for (forward_mma_D256_Cv16,
// forward_streamed_mma_Cv64), and backward_dkdv_windows for backward_dkdv_kernel on windows. The
// mma backward sizes its value-like tiles by Cv at run time: its launches (backward_mma's dQ blocks,
// backward_dq; dK/dV blocks, backward_dkdv, or with kDvSplit dK blocks, backward_dk, and dV-only
// blocks, backward_dv) are printed at every Cv it takes, named by the tiles and the value-like rows
// they hold (MmaBackwardTiles::channels): backward_dq_mma_D256_Cv256_c176. Per D and dtype, the
// widest Cv the mma backward takes, "backward_mma_widest_D<D> <dtype> <Cv>", and per tile class
// "backward_mma_widest_D<D>_Cv<CVT> <dtype> <Cv>". The sizes come from the kernels' own layout
// code, the tiles from the launchers' own choice (uses_mma_forward / _backward, with_mma_tiles,
// with_streamed_tiles) over shapes that reach every choice, so a line may repeat. A host program
// (nvcc, no GPU): tests/test_cuda_build.py checks the sizes against the cards' limits,
// benchmarks/kernel_report.py takes them for the occupancy and the widest Cv for its launch plans.
#include <cstdio>
#include <map>

#include "contextual_loss.cuh"
#include "correspondence_warp.cuh"

using namespace cocos_kernels::cuda;

// The tensor-core kernels' tiles do not depend on the precision: 16-bit T takes kIeee, float32 tf32x3 here.
template <class T>
constexpr Precision kProbePrecision = kIsFloat<T> ? Precision::kTf32x3 : Precision::kIeee;

template <class T>
void show_backward(const char* dtype) {
  const Precision p = kProbePrecision<T>;
  for (const int d : {64, 128, 256}) {  // D just at each tile width
    if (d > kMmaBackwardD<T>) continue;
    int widest = 0;
    std::map<int, int> widest_by_class;  // CVT -> Cv
    for (int cv = 1; cv <= kMmaBackwardCv<T>; ++cv) {
      const WarpShape s{1, 1, 1, d, cv};
      if (!uses_mma_backward<T>(s, prepared_rows(s), p)) continue;
      widest = cv;
      with_mma_tiles<T, kMmaBackwardD<T>, kMmaBackwardCv<T>>(s, p, [&](auto, auto dt, auto cvt) {
        using L = MmaBackwardTiles<T, decltype(dt)::value, decltype(cvt)::value>;
        const L tiles(cv);
        auto show = [&](const char* role, size_t bytes) {
          std::printf("backward_%s_mma_D%d_Cv%d_c%d %s %zu\n", role, dt(), cvt(), tiles.channels, dtype, bytes);
        };
        // backward_mma's launches: dQ blocks, dK/dV (or dK) blocks, dV-only blocks with kDvSplit.
        show("dq", tiles.dq_bytes());
        show(L::kDvSplit ? "dk" : "dkdv", tiles.dkdv_bytes());
        if (L::kDvSplit) show("dv", tiles.dkdv_bytes());
        widest_by_class[cvt()] = cv;
      });
    }
    std::printf("backward_mma_widest_D%d %s %d\n", d, dtype, widest);
    for (const auto& [cvt, cv] : widest_by_class) std::printf("backward_mma_widest_D%d_Cv%d %s %d\n", d, cvt, dtype, cv);
  }
}

template <class T>
void show(const char* dtype) {
  if (kIsFloat<T>) std::printf("forward %s %zu\n", dtype, ForwardSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dq %s %zu\n", dtype, BackwardDqSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dkdv %s %zu\n", dtype, BackwardDkDvSmem<T>::carve(nullptr, nullptr));
  std::printf("backward_dkdv_windows %s %zu\n", dtype, BackwardDkDvSmem<T>::carve(nullptr, nullptr, true));
  const Precision p = kProbePrecision<T>;
  for (const int d : {64, 128, 256, 512}) {  // D just at each tile width
    for (const int cv : {16, 64, 256}) {
      const WarpShape s{1, 1, 1, d, cv};
      if (uses_mma_forward<T>(s, prepared_rows(s), p)) {
        with_mma_tiles<T, kMmaForwardD<T>, 64>(s, p, [&](auto, auto dt, auto cvt) {
          using L = MmaTiles<T, decltype(dt)::value, decltype(cvt)::value>;
          std::printf("forward_mma_D%d_Cv%d %s %zu\n", dt(), cvt(), dtype, L::kForwardBytes);
        });
      }
      with_streamed_tiles<T>(s, p, [&](auto, auto cvt) {
        std::printf("forward_streamed_mma_Cv%d %s %zu\n", cvt(), dtype,
                    StreamedForwardTiles<T, decltype(cvt)::value>::kBytes);
        std::printf("backward_streamed_mma_Cv%d %s %zu\n", cvt(), dtype,
                    StreamedBackwardTiles<T, decltype(cvt)::value>::kBackwardBytes);
      });
    }
  }
  show_backward<T>(dtype);
}

int main() {
  show<float>("float32");
  show<__half>("float16");
  show<__nv_bfloat16>("bfloat16");
  std::printf("contextual_forward float32 %zu\n", ContextualForwardSmem::carve(nullptr, nullptr));
  std::printf("contextual_backward float32 %zu\n", ContextualBackwardSmem::carve(nullptr, nullptr));
}
