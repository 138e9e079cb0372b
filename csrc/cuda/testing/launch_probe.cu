// Prints the launch plan of correspondence_warp's CUDA launchers: their own dispatch
// (with_forward_kernel, backward_kernels) runs on null tensors with a launch functor that records
// each launch instead of running it. One request a line on stdin, or one in argv:
//   <dtype> <precision> <batch> <nq> <nk> <D> <Cv> <patch> <gradients>
// dtype float32, float16 or bfloat16; precision ieee, tf32x3 or tf32 (16-bit rows ignore it); D
// the row width (windows, patch > 1: the channels C of a tap); gradients those the backward
// computes, any of q, k and v ("qkv"), or "-" for the forward alone. Per request:
//   plan <the request>
//   launch blocks=<B> smem=<bytes> [row_blocks=.. cv_chunks=..] [channels=.. out_d=.. dv_chunk=.. dv_split=..] kernel=<name>
// one launch line per launch in launch order, the forward's, then the backward's: the blocks and
// dynamic shared memory the launcher asks for; row_blocks and cv_chunks, the kernel's MmaGrid
// argument (blocks of resident rows; chunks of value channels or of dQ / dK columns); channels, out_d,
// dv_chunk, dv_split, its MmaBackwardTiles argument (the mma backward's value-like rows, dQ / dK
// columns a block, dV channels a block, dV-only blocks); kernel, the demangled name of the kernel
// launched, from its host stub's symbol (dladdr: the stubs exported, kernel_report.py's
// PROBE_FLAGS). First "contextual_forward float32 <bytes>" and "contextual_backward float32
// <bytes>", the contextual_loss kernels' dynamic shared memory (contextual_loss.cu launches them).
// A host program (nvcc, no GPU): benchmarks/kernel_report.py takes the CUDA launches of its
// estimates from it, tests/test_cuda_build.py checks their shared memory against the cards' limits.
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "contextual_loss.cuh"
#include "correspondence_warp.cuh"

namespace {
using namespace cocos_kernels::cuda;

// The plan a kernel argument carries; other arguments carry none.
template <class A>
void show(const A&) {}
void show(const MmaGrid& grid) {
  std::printf(" row_blocks=%lld cv_chunks=%lld", static_cast<long long>(grid.row_blocks),
              static_cast<long long>(grid.cv_chunks));
}
template <class T, int DT, int CVT>
void show(const MmaBackwardTiles<T, DT, CVT>& tiles) {
  using L = MmaBackwardTiles<T, DT, CVT>;
  std::printf(" channels=%d out_d=%d dv_chunk=%d dv_split=%d", tiles.channels, L::kOutD, L::kDvChunk, L::kDvSplit);
}

std::string kernel_name(const void* stub) {
  Dl_info info{};
  if (dladdr(stub, &info) == 0 || info.dli_sname == nullptr) throw std::runtime_error("a kernel stub without a symbol");
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  const std::string name = status == 0 ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

constexpr auto record = [](auto kernel, int64_t blocks, size_t bytes, const auto&... args) {
  std::printf("launch blocks=%lld smem=%zu", static_cast<long long>(blocks), bytes);
  (show(args), ...);
  std::printf(" kernel=%s\n", kernel_name(reinterpret_cast<const void*>(kernel)).c_str());
  return cudaSuccess;
};

template <class T>
void plan(const WarpShape& s, int patch, Precision precision, const std::string& gradients) {
  // Only the patch and whether the factors are given (windowed) steer the launchers, not the rows' layout.
  static float factor;
  const WarpGeometry g = patch == 1 ? prepared_rows(s)
                                    : window_geometry(s, patch, s.nq, 0, s.nk, 0, &factor, &factor, &factor, &factor);
  with_forward_kernel<T>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, s, g, 1.0f, precision, record);
  if (gradients == "-") return;
  static float grad[3];  // where a gradient is requested: any address but null
  auto wanted = [&](char c, float* p) { return gradients.find(c) != std::string::npos ? p : nullptr; };
  backward_kernels<T>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, wanted('q', grad),
                      wanted('k', grad + 1), wanted('v', grad + 2), nullptr, nullptr, s, g, 1.0f, precision, record);
}

void request(const std::string& line) {
  std::istringstream in(line);
  std::string dtype, precision, gradients;
  long long batch = 0, nq = 0, nk = 0;
  int d = 0, cv = 0, patch = 0;
  if (!(in >> dtype >> precision >> batch >> nq >> nk >> d >> cv >> patch >> gradients)) {
    throw std::runtime_error("not a request: " + line);
  }
  const WarpShape s{batch, nq, nk, d, cv};
  const Precision p = precision == "tf32x3" ? Precision::kTf32x3 : precision == "tf32" ? Precision::kTf32
                      : precision == "ieee"  ? Precision::kIeee
                                             : throw std::runtime_error("no precision " + precision);
  std::printf("plan %s\n", line.c_str());
  if (dtype == "float32") return plan<float>(s, patch, p, gradients);
  if (dtype == "float16") return plan<__half>(s, patch, p, gradients);
  if (dtype == "bfloat16") return plan<__nv_bfloat16>(s, patch, p, gradients);
  throw std::runtime_error("no dtype " + dtype);
}
}  // namespace

int main(int argc, char** argv) {
  std::printf("contextual_forward float32 %zu\n", ContextualForwardSmem::carve(nullptr, nullptr));
  std::printf("contextual_backward float32 %zu\n", ContextualBackwardSmem::carve(nullptr, nullptr));
  try {
    if (argc > 1) {
      std::string line = argv[1];
      for (int i = 2; i < argc; ++i) line.append(" ").append(argv[i]);
      request(line);
    } else {
      for (std::string line; std::getline(std::cin, line);) {
        if (!line.empty()) request(line);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "launch_probe: %s\n", e.what());
    return 1;
  }
}
