"""The CUDA backend (`csrc/cuda`, `cocos_kernels/cuda.py`) without a GPU: compile checks and the loader.

No kernel runs on a GPU here (the shared tests in test_correspondence_warp.py and
test_contextual_loss.py run the "cuda" backend with `--device cuda`). What is checked on a CPU machine with nvcc and a CUDA build of torch:

* every .cu compiles for sm_90a (H100) and sm_80 (A100) with the flags torch's extension builder
  passes, warnings as errors (nvcc, ptxas and the host compiler's -Wall -Wextra), in parallel;
* bindings.cpp (the only file with torch headers, ~1 min alone) compiles with -Wall -Wextra
  -Werror, torch's own headers included as system headers (their warnings are not ours);
* every kernel's dynamic shared memory fits the card's opt-in limit per block (sm_90: 227 KiB,
  sm_80: 163 KiB), computed by the kernels' own layout code in a host program
  (`csrc/cuda/testing/launch_probe.cu`: the launchers' own dispatch recording each launch, which
  benchmarks/kernel_report.py takes its CUDA launches from), over shapes that reach every choice, and
  its plans name the kernels expected;
* the kernels' arithmetic, run: `csrc/cuda/testing/host_emulation.h` compiles the kernels with
  the host compiler and runs each block as 256 CPU threads (barriers for __syncthreads, an
  exchange buffer for warp shuffles), with the real launchers' grids (`harness.cpp`; the mma
  backward's cp.async, ldmatrix and shared loads fault outside the launch's shared memory). Forward
  (out, lse), backward (dq, dk, dv) and the prologue (rows, dx) are compared with float64, over
  ragged tiles, several key / query / D / Cv chunks, a key mask with a fully masked batch element,
  and float16/bfloat16 inputs, whose tiles run both through the FMA path and through the WMMA
  branch of `tile_mma` (tile.cuh) with nvcuda::wmma emulated by its documented semantics (the
  emulation cannot tell whether real tensor cores honour them); the window form (3x3 and 5x5
  patches on small padded grids, as the op layer prepares them: forward out, lse; backward dxq,
  dxk summed from the per-tap planes, dv and the per-centre sums rows, cols) likewise, against
  autograd over the unfolded windows of the same rows in float64, the half windows' forward, their
  backward with Cv <= 192 (above 64 the wide value tiles: dQ, dK and dV-only blocks) and those of
  the rows the register-resident kernels do not take (D > 256; the backward also Cv past its tiles)
  on the streamed tensor-core kernels of `correspondence_warp_streamed_mma.cuh`; contextual_loss's forward
  (m, argmin, s, t) and backward (dx, dy, each alone too) likewise, over ragged tiles and exact
  ties in the row minimum (the lowest index must win and carry the minimum's gradient);
* float32 rows and windows with precision tf32x3 and tf32 (mma.sync m16n8k8 on tf32, its lane
  layouts and cvt.rna.tf32 emulated and checked against the PTX ISA's tables; windows, the forward
  of rows wider than 128 and their backward wider than 64 streamed, with Cv <= 64) beside the FMA
  path on the same inputs: tf32x3 near float32, tf32 at the error its 10-bit mantissas give;
* the loader: toolkit discovery through the nvcc wrapper script, and a clear refusal (no build)
  on a machine without a CUDA device.

Behind `-m slow`: the full JIT build of cocos_kernels.cuda (`torch.utils.cpp_extension.load`,
linking included) for both architectures, and the import of the built module.
Skipped, with the reason, where nvcc or a CUDA build of torch is absent.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import cocos_kernels as ck
from cocos_kernels import build
from cocos_kernels.features import DEFAULT_EPS, normalize_features, normalize_features_backward
from cocos_kernels.testing import assert_close
from cocos_kernels.windows import sum_tap_planes, to_centres, window_features

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "csrc" / "cuda"
ARCHS = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}
SMEM_LIMIT = {"sm_90a": 232448, "sm_80": 166912}  # cudaDevAttrMaxSharedMemoryPerBlockOptin
CUDA_HOME = build.cuda_home()

needs_toolkit = pytest.mark.skipif(
    CUDA_HOME is None or torch.version.cuda is None,
    reason=f"needs nvcc (a CUDA toolkit: found {CUDA_HOME}) and a CUDA build of torch (torch {torch.__version__})",
)


@pytest.fixture(autouse=True)
def _cpu_suite_only(request):
    # With --device cuda the shared suite runs the kernels themselves: no GPU time on these checks.
    if request.config.getoption("--device") == "cuda":
        pytest.skip("compile checks and CPU emulation belong to the CPU suite (--device cpu)")


def _nvcc_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # As torch builds the extension, plus warnings as errors everywhere.
    return [*COMMON_NVCC_FLAGS, *build.NVCC_FLAGS, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def _run(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    return cmd, subprocess.run(cmd, capture_output=True, text=True, cwd=SRC)


def _failures(results) -> list[str]:
    return [f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}" for cmd, proc in results
            if proc.returncode != 0 or "warning" in proc.stderr.lower()]


def _ptxas_kernels(stderr: str) -> dict[str, tuple[int, int]]:
    """kernel (mangled) -> (registers, spill store bytes) from `ptxas -v`."""
    kernels, name, spills = {}, None, 0
    for line in stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores", line):
            spills = int(m.group(1))
        elif (m := re.search(r"Used (\d+) registers", line)) and name is not None:
            kernels[name] = (int(m.group(1)), spills)
    return kernels


@needs_toolkit
def test_cuda_sources_compile_without_warnings(tmp_path):
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    jobs = [[nvcc, *_nvcc_flags(), "-Xptxas", "-v", "-gencode", gencode, "-c", str(SRC / name), "-o",
             str(tmp_path / f"{name}.{arch}.o")]
            for name in build.CUDA_SOURCES if name.endswith(".cu") for arch, gencode in ARCHS.items()]
    torch_include = Path(torch.__file__).parent / "include"
    system = [torch_include, torch_include / "torch" / "csrc" / "api" / "include", Path(CUDA_HOME) / "include",
              Path(sysconfig.get_paths()["include"])]
    jobs.append(["c++", "-std=c++20", "-O0", "-fPIC", "-Wall", "-Wextra", "-Werror",
                 "-DTORCH_EXTENSION_NAME=cocos_kernels_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
                 *(f"-isystem{p}" for p in system), "-c", str(SRC / "bindings.cpp"), "-o", str(tmp_path / "bindings.o")])
    # bindings.cpp first: it is the longest job.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(_run, jobs[-1:] + jobs[:-1]))
    failures = _failures(results)
    assert not failures, "\n\n".join(failures)
    kernels = {(cmd[cmd.index("-gencode") + 1], name): use for cmd, proc in results if "-gencode" in cmd
               for name, use in _ptxas_kernels(proc.stderr).items()}
    print("\n".join(f"{arch.split('=')[-1]} {name}: {regs} registers, {spills} bytes spilled"
                    for (arch, name), (regs, spills) in sorted(kernels.items())))
    mma = {key: spills for key, (_, spills) in kernels.items() if "_mma_kernel" in key[1]}
    # Per architecture: per 16-bit dtype the forward's 6 tile widths; the backward's classes
    # (MmaBackwardTiles) at D 64, 128 (Cv 16, 64, 256) and 256 (Cv 16, 64, 256: 256 D-chunked),
    # each a dQ and a dK (or dK/dV) kernel, and dV-only kernels for Cv 256 and for D 256 with
    # Cv 64; float32 (tf32x3 and tf32) the forward's 3, dQ and dK/dV at D 64 and 128 (Cv 16,
    # 256), and the dV-only kernels at Cv 256; per 16-bit dtype and float32 precision the streamed
    # forward's 3 value classes (16, 64, 128) and the streamed backward's 4 (dQ, dK/dV per class), per
    # 16-bit dtype 3 more for its wide value tiles (dQ, dK, dV-only).
    assert len(mma) == 2 * (2 * (6 + 9 + 9 + 4 + 3 + 7) + 2 * (3 + 4 + 4 + 2 + 3 + 4)), sorted(mma)
    assert not any(mma.values()), f"register spills in the register-resident kernels: {mma}"


@needs_toolkit
def test_shared_memory_fits_the_cards():
    from benchmarks import kernel_report as kr

    # The launchers' plans (csrc/cuda/testing/launch_probe.cu, running their dispatch) over shapes that reach
    # every choice: each dtype and precision, D at each tile width and past the widest, every Cv up to the mma
    # backward's widest and past it, rows and windows; the forward and every gradient.
    requests = [kr.probe_request(dtype, precision, 1, 256, d, cv, patch, "qkv")
                for dtype, precision in (("float32", "ieee"), ("float32", "tf32x3"), ("float32", "tf32"),
                                         ("float16", None), ("bfloat16", None))
                for d in (64, 128, 256, 512) for cv in range(1, 258) for patch in (1, 3)]
    contextual, plans = kr.launch_plans(requests)
    sizes = {(launch["layout"], request.split()[0]): launch["shared"]
             for request, launches in plans.items() for launch in launches} | contextual
    print("dynamic shared memory per block (bytes):", sizes)
    for (layout, dtype), size in sizes.items():
        assert size <= min(SMEM_LIMIT.values()), f"{layout} {dtype}: {size} bytes of shared memory > sm_80's limit"
    # The backward on tensor cores up to these Cv per D (16-bit rows; float32 rows with tf32x3), as
    # correspondence_warp_mma.cuh and the docs say.
    widest = {}
    for request, launches in plans.items():
        dtype, precision, _, _, _, d, cv, patch, _ = request.split()
        if patch == "1" and precision != "tf32" and any(k["name"].startswith("backward_dq_mma_kernel") for k in launches):
            widest[int(d), dtype] = max(widest.get((int(d), dtype), 0), int(cv))
    assert widest == {**{(d, dtype): cv for dtype in ("bfloat16", "float16") for d, cv in ((64, 256), (128, 224), (256, 176))},
                      (64, "float32"): 112, (128, "float32"): 80}, widest


BF16, TF32X3 = "__nv_bfloat16, (cocos_kernels::cuda::Precision)0", "float, (cocos_kernels::cuda::Precision)1"
HALF, TF32 = "__half, (cocos_kernels::cuda::Precision)0", "float, (cocos_kernels::cuda::Precision)2"


@needs_toolkit
@pytest.mark.parametrize("case, names", [
    # D 256: Cv 3 in dK/dV blocks; Cv 48 (the widest of the 64-channel tiles) and 151 with dV-only blocks.
    (("bfloat16", None, 256, 3, 1, "qkv"),
     [f"forward_mma_kernel<{BF16}, 256, 16>", f"backward_dq_mma_kernel<{BF16}, 256, 16>",
      f"backward_dkdv_mma_kernel<{BF16}, 256, 16, false>"]),
    (("bfloat16", None, 256, 48, 1, "qkv"),
     [f"forward_mma_kernel<{BF16}, 256, 64>", f"backward_dq_mma_kernel<{BF16}, 256, 64>",
      f"backward_dkdv_mma_kernel<{BF16}, 256, 64, false>", f"backward_dkdv_mma_kernel<{BF16}, 256, 64, true>"]),
    (("bfloat16", None, 256, 151, 1, "qkv"),
     [f"forward_mma_kernel<{BF16}, 256, 64>", f"backward_dq_mma_kernel<{BF16}, 256, 256>",
      f"backward_dkdv_mma_kernel<{BF16}, 256, 256, false>", f"backward_dkdv_mma_kernel<{BF16}, 256, 256, true>"]),
    (("bfloat16", None, 256, 151, 1, "v"),  # dV alone: the dV-only blocks
     [f"forward_mma_kernel<{BF16}, 256, 64>", f"backward_dkdv_mma_kernel<{BF16}, 256, 256, true>"]),
    (("bfloat16", None, 256, 177, 1, "qkv"),  # past the widest at D 256: the streamed backward's wide value tiles
     [f"forward_mma_kernel<{BF16}, 256, 64>", f"backward_streamed_mma_kernel<{BF16}, 192, 3, false>",
      f"backward_streamed_mma_kernel<{BF16}, 192, 3, true>", f"backward_streamed_mma_kernel<{BF16}, 192, 0, true>"]),
    (("bfloat16", None, 256, 193, 1, "qkv"),  # past the streamed backward's too
     [f"forward_mma_kernel<{BF16}, 256, 64>", "backward_dq_kernel<__nv_bfloat16>", "backward_dkdv_kernel<__nv_bfloat16>"]),
    (("float16", None, 128, 48, 1, "qkv"),
     [f"forward_mma_kernel<{HALF}, 128, 64>", f"backward_dq_mma_kernel<{HALF}, 128, 64>",
      f"backward_dkdv_mma_kernel<{HALF}, 128, 64, false>"]),
    (("float32", "tf32x3", 128, 3, 1, "qkv"),
     [f"forward_mma_kernel<{TF32X3}, 128, 16>", f"backward_dq_mma_kernel<{TF32X3}, 128, 16>",
      f"backward_dkdv_mma_kernel<{TF32X3}, 128, 16, false>"]),
    # Float32 at Cv > 16: the tiles sized by Cv, dK blocks, then dV-only blocks.
    (("float32", "tf32x3", 64, 48, 1, "qkv"),
     [f"forward_mma_kernel<{TF32X3}, 64, 64>", f"backward_dq_mma_kernel<{TF32X3}, 64, 256>",
      f"backward_dkdv_mma_kernel<{TF32X3}, 64, 256, false>", f"backward_dkdv_mma_kernel<{TF32X3}, 64, 256, true>"]),
    (("float32", "ieee", 64, 3, 1, "qkv"), ["forward_kernel<float>", "backward_dq_kernel<float>", "backward_dkdv_kernel<float>"]),
    # Windows, and rows wider than the resident kernels take: the streamed forward and, up to Cv 64 (16-bit:
    # 192) on tensor cores, the streamed backward (dQ, then dK/dV; at Cv > 64 the wide value tiles: dQ, dK,
    # then dV-only blocks, group 0); else the FMA backward.
    (("bfloat16", None, 64, 3, 3, "qkv"),
     [f"forward_streamed_mma_kernel<{BF16}, 16, 128>", f"backward_streamed_mma_kernel<{BF16}, 16, 3, false>",
      f"backward_streamed_mma_kernel<{BF16}, 16, 3, true>"]),
    (("float16", None, 300, 48, 1, "qkv"),
     [f"forward_streamed_mma_kernel<{HALF}, 64, 128>", f"backward_streamed_mma_kernel<{HALF}, 64, 3, false>",
      f"backward_streamed_mma_kernel<{HALF}, 64, 3, true>"]),
    # Cv > 64: the forward's wide value class in 64-key blocks; prepared rows past D 256 too.
    (("bfloat16", None, 256, 151, 3, "-"), [f"forward_streamed_mma_kernel<{BF16}, 128, 64>"]),
    (("float16", None, 300, 65, 1, "-"), [f"forward_streamed_mma_kernel<{HALF}, 128, 64>"]),
    # CoCosNet on ADE20K: C 256 a tap, 3 image channels and 151 labels.
    (("bfloat16", None, 256, 154, 3, "qkv"),
     [f"forward_streamed_mma_kernel<{BF16}, 128, 64>", f"backward_streamed_mma_kernel<{BF16}, 192, 3, false>",
      f"backward_streamed_mma_kernel<{BF16}, 192, 3, true>", f"backward_streamed_mma_kernel<{BF16}, 192, 0, true>"]),
    (("bfloat16", None, 256, 154, 3, "k"), [f"forward_streamed_mma_kernel<{BF16}, 128, 64>",
                                            f"backward_streamed_mma_kernel<{BF16}, 192, 3, true>"]),
    (("bfloat16", None, 256, 154, 3, "v"), [f"forward_streamed_mma_kernel<{BF16}, 128, 64>",
                                            f"backward_streamed_mma_kernel<{BF16}, 192, 0, true>"]),
    (("float16", None, 64, 70, 3, "qkv"),
     [f"forward_streamed_mma_kernel<{HALF}, 128, 64>", f"backward_streamed_mma_kernel<{HALF}, 192, 3, false>",
      f"backward_streamed_mma_kernel<{HALF}, 192, 3, true>", f"backward_streamed_mma_kernel<{HALF}, 192, 0, true>"]),
    (("bfloat16", None, 64, 193, 3, "qkv"),
     [f"forward_streamed_mma_kernel<{BF16}, 128, 64>", "backward_dq_kernel<__nv_bfloat16>", "backward_dkdv_kernel<__nv_bfloat16>"]),
    (("float32", "tf32x3", 64, 65, 3, "qkv"),  # float32 past Cv 64: the FMA backward
     [f"forward_streamed_mma_kernel<{TF32X3}, 128, 64>", "backward_dq_kernel<float>", "backward_dkdv_kernel<float>"]),
    (("float32", "tf32", 256, 3, 1, "qkv"),  # D past the float32 mma backward's
     [f"forward_streamed_mma_kernel<{TF32}, 16, 128>", f"backward_streamed_mma_kernel<{TF32}, 16, 2, false>",
      f"backward_streamed_mma_kernel<{TF32}, 16, 2, true>"]),
    (("float32", "tf32x3", 64, 17, 3, "-"),  # float32 windows with a value chunk of 64: key blocks of 64
     [f"forward_streamed_mma_kernel<{TF32X3}, 64, 64>"]),
    (("float32", "ieee", 64, 3, 3, "q"), ["forward_kernel<float>", "backward_dq_kernel<float>"]),
])
def test_launch_probe_names_the_kernels_launched(case, names):
    from benchmarks import kernel_report as kr

    dtype, precision, d, cv, patch, gradients = case
    request = kr.probe_request(dtype, precision, 2, 1000, d, cv, patch, gradients)
    _, plans = kr.launch_plans([request])
    assert [launch["name"] for launch in plans[request]] == names


@needs_toolkit
def test_streamed_forward_value_chunks():
    """The streamed forward's grid: value chunks of 16 or 64 channels up to Cv 64, above it of at most 128,
    ceil(Cv / 128) of them."""
    from benchmarks import kernel_report as kr

    cases = {("bfloat16", 17): 1, ("bfloat16", 64): 1, ("bfloat16", 65): 1, ("bfloat16", 128): 1,
             ("float16", 129): 2, ("bfloat16", 151): 2, ("bfloat16", 256): 2, ("float16", 257): 3,
             ("float32", 65): 1, ("float32", 151): 2}
    requests = {kr.probe_request(dtype, "tf32x3" if dtype == "float32" else None, 2, 1000, 64, cv, 3, "-"): chunks
                for (dtype, cv), chunks in cases.items()}
    _, plans = kr.launch_plans(list(requests))
    assert {request: plans[request][0]["cv_chunks"] for request in requests} == requests


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """tiles ("fma": half tiles on the FMA path; "wmma": on the emulated WMMA branch) -> the kernels
    compiled for the CPU (csrc/cuda/testing), as a ctypes library."""
    if CUDA_HOME is None or shutil.which("c++") is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h) of a toolkit")
    built = {}

    def library(tiles: str):
        if tiles not in built:
            lib = tmp_path_factory.mktemp("emulated") / f"libemulated_{tiles}.so"
            cmd = ["c++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra",
                   "-Wno-unknown-pragmas", "-Werror", *(["-DCOCOS_KERNELS_EMULATE_WMMA"] if tiles == "wmma" else []),
                   "-include", "host_emulation.h", f"-isystem{Path(CUDA_HOME) / 'include'}", "harness.cpp",
                   "-o", str(lib)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=SRC / "testing")
            assert proc.returncode == 0, proc.stderr
            built[tiles] = ctypes.CDLL(str(lib))
        return built[tiles]
    return library


EMULATED_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _i(*xs):
    return [ctypes.c_int64(x) for x in xs]


def _reference_warp(q, k, v, scale, mask):
    """out (B, Cv, Nq) and lse (B, Nq) in float64, autograd-ready; fully masked rows give 0 and -inf."""
    return _softmax_warp(scale * q @ k.transpose(1, 2), v, mask)


def _softmax_warp(s, v, mask):
    """out (B, Cv, Nq) and lse (B, Nq) of the logits s (B, Nq, Nk); fully masked rows give 0 and -inf."""
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    return (p @ v.transpose(1, 2)).transpose(1, 2), lse


EMULATED_CASES = {  # id: (B, Nq, Nk, D, Cv, dtype, masked, tiles)
    # 2 query blocks, 3 key blocks (ragged), 2 D chunks of 32, 2 value-channel chunks; batch 1 fully masked.
    "B2-Nq70-Nk131-D40-Cv70-float32-mask": (2, 70, 131, 40, 70, torch.float32, True, "fma"),
    "B1-Nq5-Nk7-D3-Cv3-float32": (1, 5, 7, 3, 3, torch.float32, False, "fma"),
    "B1-Nq65-Nk64-D80-Cv48-float16-fma": (1, 65, 64, 80, 48, torch.float16, False, "fma"),
    "B1-Nq65-Nk64-D80-Cv48-bfloat16-fma": (1, 65, 64, 80, 48, torch.bfloat16, False, "fma"),
    # The tensor-core branch of the shared-memory kernels, where the mma kernels stop (the backward
    # at Cv > 224 with D <= 128, at Cv > 192 with D > 256): every operand orientation of both backward
    # kernels, D and Cv in several chunks.
    "B2-Nq70-Nk131-D264-Cv200-float16-wmma-mask": (2, 70, 131, 264, 200, torch.float16, True, "wmma"),
    "B1-Nq65-Nk64-D80-Cv240-bfloat16-wmma": (1, 65, 64, 80, 240, torch.bfloat16, False, "wmma"),
    # The half kernels on rows of correspondence_warp_mma.cuh: forward with D <= 256, backward with
    # D <= 256 and Cv up to 256 / 224 / 176 (D <= 64 / 128 / 256). D 80 above (tiles of 128,
    # cp.async copies, 2 forward value chunks, Nk 131 rows element by element); D 3 (element
    # copies, 2-3 resident blocks, ragged streamed blocks, Cv padded to 16); D 200 (forward tiles
    # of 256); D 64 with Cv 17 (chunks of 64); D 128 with Cv 64 (the widest backward holding dOut
    # in registers, cp.async dOut). D 264 (5 chunks, the last of 8 columns) and D 300 below: the
    # streamed forward and backward of correspondence_warp_streamed_mma.cuh.
    "B2-Nq130-Nk200-D3-Cv3-bfloat16-mask": (2, 130, 200, 3, 3, torch.bfloat16, True, "fma"),
    "B1-Nq20-Nk72-D200-Cv16-float16": (1, 20, 72, 200, 16, torch.float16, False, "fma"),
    "B1-Nq65-Nk131-D64-Cv17-bfloat16": (1, 65, 131, 64, 17, torch.bfloat16, False, "fma"),
    "B2-Nq136-Nk64-D128-Cv64-float16-mask": (2, 136, 64, 128, 64, torch.float16, True, "fma"),
    # D 300: 5 chunks of 64 (the last of 44 columns), 16-byte copies, ragged query and key blocks, a
    # fully masked batch element; the backward's plane passes per group of 3 streamed blocks: dQ one
    # group, dK/dV a group of 2. Then 5 and 4 streamed blocks: dQ groups of 3 and 2, dK/dV 3 and 1, with
    # value chunks of 16 and 64.
    "B2-Nq70-Nk131-D300-Cv5-bfloat16-mask": (2, 70, 131, 300, 5, torch.bfloat16, True, "fma"),
    "B1-Nq200-Nk260-D300-Cv5-float16": (1, 200, 260, 300, 5, torch.float16, False, "fma"),
    "B1-Nq200-Nk260-D300-Cv17-bfloat16": (1, 200, 260, 300, 17, torch.bfloat16, False, "fma"),
    # The streamed backward's wide value tiles (Cv > 64): dP in 16-channel steps over Cv padded to 16, dK
    # blocks without dV, dV-only blocks. Cv 154 (160: CoCosNet's ADE20K channels) with a fully masked batch
    # element, ragged blocks; Cv 80 over 5 and 4 streamed blocks (groups of 3 and 2, 3 and 1). The forward's
    # wide value class (64-key blocks): Cv 154 in two chunks of 80, Cv 80 in one; D 264 with Cv 200, two
    # chunks of 112, the second of 88 channels (96 padded), 2 key blocks (64 and 36), masked.
    "B2-Nq70-Nk131-D300-Cv154-bfloat16-mask": (2, 70, 131, 300, 154, torch.bfloat16, True, "fma"),
    "B1-Nq200-Nk260-D300-Cv80-float16": (1, 200, 260, 300, 80, torch.float16, False, "fma"),
    "B2-Nq70-Nk100-D264-Cv200-bfloat16-mask": (2, 70, 100, 264, 200, torch.bfloat16, True, "fma"),
    # The backward's wider plans (MmaBackwardTiles). D 256 with Cv 3: Q and K read per k step,
    # 32-row sub-blocks, dK and dV in one block, a fully masked batch element. D 200 with Cv 48:
    # ragged D at DT 256, dV-only blocks, 2 resident key blocks and 2 query blocks, both ragged.
    # D 256 with Cv 151 (ADE20K's labels on CoCosNet's features): two dQ and dK column chunks,
    # dV-only blocks of 128 and 23 channels, dOut rows (Nq 65) element by element. D 100 with
    # Cv 151: K held (D <= 128), dOut and V per 16-channel step, masked. D 40 with Cv 256: the
    # most channels, every tile at its widest.
    "B2-Nq65-Nk72-D256-Cv3-bfloat16-mask": (2, 65, 72, 256, 3, torch.bfloat16, True, "fma"),
    "B1-Nq70-Nk131-D200-Cv48-float16": (1, 70, 131, 200, 48, torch.float16, False, "fma"),
    "B1-Nq65-Nk136-D256-Cv151-bfloat16": (1, 65, 136, 256, 151, torch.bfloat16, False, "fma"),
    "B2-Nq70-Nk65-D100-Cv151-float16-mask": (2, 70, 65, 100, 151, torch.float16, True, "fma"),
    "B1-Nq65-Nk64-D40-Cv256-bfloat16": (1, 65, 64, 40, 256, torch.bfloat16, False, "fma"),
}


# The PTX operations of csrc/cuda/mma.cuh, lane by lane, against the PTX ISA's tables
# (g = lane // 4, t = lane % 4): the layouts written out here in Python, independently of the emulation.
def _ptx_a(i, k):
    """(lane, register, half) holding element (i, k) of mma.m16n8k16's A (16 x 16, row)."""
    return 4 * (i % 8) + (k % 8) // 2, i // 8 + 2 * (k // 8), k % 2


def _ptx_b(k, n):
    """(lane, register, half) holding element (k, n) of mma.m16n8k16's B (16 x 8, col)."""
    return 4 * n + (k % 8) // 2, k // 8, k % 2


def _ptx_c(i, n):
    """(lane, register) holding element (i, n) of mma.m16n8k16's C and D (16 x 8, float)."""
    return 4 * (i % 8) + n // 2, 2 * (i // 8) + n % 2


def _bits(x):
    """16-bit patterns of a float16/bfloat16 tensor, as Python ints."""
    return (x.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()


@pytest.mark.parametrize("trans", [False, True], ids=["x4", "x4.trans"])
def test_emulated_ldmatrix_follows_the_ptx_layout(emulation, trans):
    lib = emulation("fma")
    stride = 24  # elements per shared row: 48 bytes, rows start 16-byte aligned
    tile = torch.arange(40 * stride, dtype=torch.int64).to(torch.int16)
    g = torch.Generator().manual_seed(0)
    # Any 16-byte aligned row per lane: 32 distinct rows, each at column 0, 8 or 16.
    offsets = (torch.randperm(40, generator=g)[:32] * stride + 8 * torch.randint(0, 3, (32,), generator=g)).to(torch.int32)
    regs32 = torch.zeros(32, 4, dtype=torch.int32)
    assert lib.emu_ldmatrix_x4(_p(tile), tile.numel(), _p(offsets), ctypes.c_bool(trans), _p(regs32)) == 0
    regs = (regs32.to(torch.int64) & 0xFFFFFFFF).tolist()
    elem = tile.to(torch.int64).tolist()
    off = offsets.tolist()
    for lane in range(32):
        a, b = lane // 4, 2 * (lane % 4)
        for m in range(4):
            rows = off[8 * m:8 * m + 8]  # row r of matrix m starts at rows[r]
            if trans:  # column a, rows b and b + 1
                lo, hi = elem[rows[b] + a], elem[rows[b + 1] + a]
            else:  # row a, columns b and b + 1
                lo, hi = elem[rows[a] + b], elem[rows[a] + b + 1]
            assert regs[lane][m] == lo | hi << 16, (lane, m)
    misaligned = offsets.clone()
    misaligned[5] += 4  # 8 bytes into a row
    assert lib.emu_ldmatrix_x4(_p(tile), tile.numel(), _p(misaligned), ctypes.c_bool(trans), _p(regs32)) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_mma_16816_follows_the_ptx_layout(emulation, dtype):
    lib = emulation("fma")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    fa, fb, fc = [[0] * 4 for _ in range(32)], [[0] * 2 for _ in range(32)], torch.zeros(32, 4)
    for (i, k), x in zip(((i, k) for i in range(16) for k in range(16)), _bits(a.flatten())):
        lane, reg, half = _ptx_a(i, k)
        fa[lane][reg] |= x << 16 * half
    for (k, n), x in zip(((k, n) for k in range(16) for n in range(8)), _bits(b.flatten())):
        lane, reg, half = _ptx_b(k, n)
        fb[lane][reg] |= x << 16 * half
    for i in range(16):
        for n in range(8):
            fc[_ptx_c(i, n)] = c[i, n]
    as_int32 = lambda regs: torch.tensor(regs, dtype=torch.int64).to(torch.int32)  # noqa: E731 (bit pattern kept)
    fa32, fb32, fd = as_int32(fa), as_int32(fb), fc.clone()
    assert lib.emu_mma_16816(ctypes.c_bool(dtype == torch.bfloat16), _p(fa32), _p(fb32), _p(fd)) == 0
    d = torch.stack([torch.stack([fd[_ptx_c(i, n)] for n in range(8)]) for i in range(16)])
    assert_close(d, a.double() @ b.double() + c.double(), name="d", rtol=1e-6)


def _ptx_a_tf32(i, k):
    """(lane, register) holding element (i, k) of mma.m16n8k8's A (16 x 8, row, tf32)."""
    return 4 * (i % 8) + k % 4, i // 8 + 2 * (k // 4)


def _ptx_b_tf32(k, n):
    """(lane, register) holding element (k, n) of mma.m16n8k8's B (8 x 8, col, tf32)."""
    return 4 * n + k % 4, k // 4


def _tf32_bits(x):
    """float32 bit patterns of x, as Python ints."""
    return (x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).tolist()


def test_emulated_mma_1688_tf32_follows_the_ptx_layout(emulation):
    lib = emulation("fma")
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g), torch.randn(16, 8, generator=g)
    fa, fb, fc = [[0] * 4 for _ in range(32)], [[0] * 2 for _ in range(32)], torch.zeros(32, 4)
    for (i, k), x in zip(((i, k) for i in range(16) for k in range(8)), _tf32_bits(a.flatten())):
        lane, reg = _ptx_a_tf32(i, k)
        fa[lane][reg] = x
    for (k, n), x in zip(((k, n) for k in range(8) for n in range(8)), _tf32_bits(b.flatten())):
        lane, reg = _ptx_b_tf32(k, n)
        fb[lane][reg] = x
    for i in range(16):
        for n in range(8):
            fc[_ptx_c(i, n)] = c[i, n]
    as_int32 = lambda regs: torch.tensor(regs, dtype=torch.int64).to(torch.int32)  # noqa: E731 (bit pattern kept)
    fd = fc.clone()
    assert lib.emu_mma_1688_tf32(_p(as_int32(fa)), _p(as_int32(fb)), _p(fd)) == 0
    d = torch.stack([torch.stack([fd[_ptx_c(i, n)] for n in range(8)]) for i in range(16)])
    # The operands' low 13 mantissa bits are ignored (truncated): what tensor cores read of a float.
    truncate = lambda x: (x.view(torch.int32) & ~0x1FFF).view(torch.float32).double()  # noqa: E731
    assert_close(d, truncate(a) @ truncate(b) + c.double(), name="d", rtol=1e-6)


def test_emulated_cvt_rna_tf32(emulation):
    lib = emulation("fma")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.arange(-15, 15).repeat(34)[:1000]
    # Exact ties (low 13 bits 0x1000) of both signs, and their neighbours, then infinities and NaN.
    base = torch.tensor([0x3F800000, 0x3FAAA000, 0x4B7FE000], dtype=torch.int32)
    near = torch.cat([base + 0x1000, base + 0xFFF, base + 0x1001]).view(torch.float32)
    x = torch.cat([x, near, -near, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    bits = torch.zeros(x.numel(), dtype=torch.int32)
    assert lib.emu_to_tf32(_p(x), _p(bits), ctypes.c_int(x.numel())) == 0
    got = bits.view(torch.float32)
    for xi, yi in zip(x[:-3].double().tolist(), got[:-3].double().tolist()):
        m, e = math.frexp(xi)  # 11 significant bits, to nearest, ties away from zero
        assert yi == math.copysign(math.floor(abs(m) * 2 ** 11 + 0.5), m) * 2.0 ** (e - 11), (xi, yi)
    assert got[-3] == float("inf") and got[-2] == float("-inf") and torch.isnan(got[-1])


def test_emulated_cp_async_completes_at_wait_group(emulation):
    lib = emulation("fma")
    src = torch.randint(0, 256, (1024,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    snapshots = torch.zeros(3, 1536, dtype=torch.uint8)
    assert lib.emu_cp_async(_p(src), _p(snapshots)) == 0
    untouched, zeros = torch.full((512,), 0xAB, dtype=torch.uint8), torch.zeros(512, dtype=torch.uint8)
    # The emulation completes a group as late as the PTX ISA allows: at the wait_group that needs it.
    expected = [(src[:512], untouched, untouched), (src[:512], src[512:], untouched), (src[:512], src[512:], zeros)]
    for snapshot, parts in zip(snapshots, expected):
        assert torch.equal(snapshot, torch.cat(parts))


PRECISION_CODES = {"ieee": 0, "tf32x3": 1, "tf32": 2}  # csrc/cuda/correspondence_warp.h: Precision


def _emulated_warp(emulated, B, Nq, Nk, D, Cv, dtype, masked, precision="ieee"):
    """The emulated kernels' out, lse, dq, dk, dv and the float64 reference's, for inputs from seed 0."""
    scale = 100.0  # 1 / temperature 0.01 on unit rows: the online softmax's hard case
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, n, D, generator=g, dtype=torch.float64), dim=-1)
            for n in (Nq, Nk))
    v = torch.randn(B, Cv, Nk, generator=g, dtype=torch.float64)
    grad = torch.randn(B, Cv, Nq, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(B, Nk, generator=g) > 0.4
        mask[-1] = False
    q, k, v, grad = (t.to(dtype).contiguous() for t in (q, k, v, grad))  # the kernels' inputs, and the judge's
    code, shape = EMULATED_DTYPES[dtype], (*_i(B, Nq, Nk), D, Cv)
    options = (ctypes.c_float(scale), ctypes.c_int(PRECISION_CODES[precision]))
    out, lse = torch.empty(B, Cv, Nq, dtype=dtype), torch.empty(B, Nq)
    mask_bytes = None if mask is None else mask.to(torch.uint8)
    assert emulated.emu_forward(code, _p(q), _p(k), _p(v), _p(mask_bytes), _p(out), _p(lse), *shape, *options) == 0
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference_warp(q64, k64, v64, scale, mask)
    ref.backward(grad.double())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] < 0).all()
    delta = (grad.float() * out.float()).sum(1).contiguous()
    dq, dk, dv = torch.empty(B, Nq, D), torch.empty(B, Nk, D), torch.empty(B, Cv, Nk)
    assert emulated.emu_backward(code, _p(grad), _p(q), _p(k), _p(v), _p(mask_bytes), _p(lse), _p(delta), _p(dq),
                                 _p(dk), _p(dv), *shape, *options) == 0
    # lse compared in units of the logits' scale; rows whose keys are all masked out as 0.
    mine = dict(out=out, lse=torch.where(finite, lse, 0.0) / scale, dq=dq, dk=dk, dv=dv)
    theirs = dict(out=ref, lse=torch.where(finite, ref_lse, 0.0) / scale, dq=q64.grad, dk=k64.grad, dv=v64.grad)
    return mine, theirs


def _relative_error(mine, theirs):
    """max |mine - theirs| / max(1, max |theirs|), as assert_close measures it."""
    theirs = theirs.detach().double()
    return ((mine.double() - theirs).abs().max() / max(1.0, theirs.abs().max().item())).item()


@pytest.mark.parametrize("case", EMULATED_CASES.values(), ids=EMULATED_CASES.keys())
def test_emulated_kernels_match_float64(emulation, case):
    B, Nq, Nk, D, Cv, dtype, masked, tiles = case
    mine, theirs = _emulated_warp(emulation(tiles), B, Nq, Nk, D, Cv, dtype, masked)
    for name in mine:
        assert_close(mine[name], theirs[name], name=name, rtol=RTOL[dtype] / (100.0 if name == "lse" else 1.0))


# The mma backward's launches for one gradient alone (correspondence_warp_mma.cuh: backward_mma):
# D 40 with Cv 100 (dK blocks and dV-only blocks), D 256 with Cv 3 (dK and dV in one block); D 300
# the streamed backward (correspondence_warp_streamed_mma.cuh: dV without the second pass; with Cv 80
# the wide value tiles: dK blocks alone, dV-only blocks alone).
SUBSET_CASES = {"D40-Cv100-bfloat16": (40, 100, torch.bfloat16), "D256-Cv3-float16": (256, 3, torch.float16),
                "D300-Cv5-bfloat16": (300, 5, torch.bfloat16), "D300-Cv80-bfloat16": (300, 80, torch.bfloat16)}


@pytest.mark.parametrize("case", SUBSET_CASES.values(), ids=SUBSET_CASES.keys())
def test_emulated_backward_of_one_gradient(emulation, case):
    """dq, dk or dv alone: each as the backward of all three writes it, the others untouched."""
    D, Cv, dtype = case
    lib, (B, Nq, Nk) = emulation("fma"), (1, 65, 70)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, n, D, generator=g), dim=-1).to(dtype) for n in (Nq, Nk))
    v, grad = torch.randn(B, Cv, Nk, generator=g).to(dtype), torch.randn(B, Cv, Nq, generator=g).to(dtype)
    shape, options = (*_i(B, Nq, Nk), D, Cv), (ctypes.c_float(100.0), ctypes.c_int(0))
    code = EMULATED_DTYPES[dtype]
    out, lse = torch.empty(B, Cv, Nq, dtype=dtype), torch.empty(B, Nq)
    assert lib.emu_forward(code, _p(q), _p(k), _p(v), None, _p(out), _p(lse), *shape, *options) == 0
    delta = (grad.float() * out.float()).sum(1).contiguous()

    def backward(wanted):
        grads = [torch.full(size, float("nan")) if want else None
                 for want, size in zip(wanted, ((B, Nq, D), (B, Nk, D), (B, Cv, Nk)))]
        assert lib.emu_backward(code, _p(grad), _p(q), _p(k), _p(v), None, _p(lse), _p(delta), *map(_p, grads),
                                *shape, *options) == 0
        return grads

    full = backward((True, True, True))
    assert all(torch.isfinite(t).all() for t in full)
    for i in range(3):
        alone = backward(tuple(j == i for j in range(3)))
        assert torch.equal(alone[i], full[i]), ("dq", "dk", "dv")[i]


# float32 rows on tensor cores (precision tf32x3 / tf32: correspondence_warp_mma.cuh with m16n8k8;
# forward D <= 128, backward D <= 128 with Cv <= 112 at D <= 64, Cv <= 80 at D <= 128), each beside
# the FMA path (ieee) on the same inputs. D 37: element copies, D not a multiple of 8, ragged query
# and key blocks, Cv 3 in a chunk of 16, a fully masked batch element, forward and backward. D 100:
# 16-byte copies, tiles of 128, Cv 48 in 3 forward chunks of 16; the backward with Q and K held in
# registers, 32-row sub-blocks, 3 dV-only blocks. D 64 with Cv 48: dK blocks and 3 dV-only blocks
# of 16 channels per key block, a fully masked batch element. D 64 with Cv 16: the backward's
# tiles, every operand copied with cp.async. D 40 with Cv 64: 4 full dV chunks, 2 resident key
# blocks, ragged query blocks. D 64 with Cv 17: a dV chunk of one channel, the values' rows (Nk 131)
# copied element by element, a masked key block. D 100 with Cv 3: the backward at DT 128 with Q and
# K read per k step, ragged D. D 48 with Cv 112: the backward's most channels, 7 dV-only blocks.
# D 300: the streamed forward and backward (correspondence_warp_streamed_mma.cuh, 10 chunks of 32,
# the last of 12 columns; one group of 2 streamed blocks). D 136 (4 chunks of 32 and one of 8) over 3
# streamed blocks: groups of 2 and 1 (tf32x3 with value chunks of 64: groups of 1), Cv 3 and 17. D 300
# with Cv 130: the streamed forward's wide value class, chunks of 80 and 50 channels (64 padded), key
# blocks of 64 and 8; the FMA backward.
TF32_CASES = {  # id: (B, Nq, Nk, D, Cv, masked)
    "B2-Nq70-Nk131-D37-Cv3-mask": (2, 70, 131, 37, 3, True),
    "B1-Nq130-Nk72-D100-Cv48": (1, 130, 72, 100, 48, False),
    "B2-Nq65-Nk64-D64-Cv48-mask": (2, 65, 64, 64, 48, True),
    "B2-Nq132-Nk68-D64-Cv16-mask": (2, 132, 68, 64, 16, True),
    "B1-Nq70-Nk136-D40-Cv64": (1, 70, 136, 40, 64, False),
    "B2-Nq65-Nk131-D64-Cv17-mask": (2, 65, 131, 64, 17, True),
    "B1-Nq70-Nk72-D100-Cv3": (1, 70, 72, 100, 3, False),
    "B1-Nq65-Nk64-D48-Cv112": (1, 65, 64, 48, 112, False),
    "B1-Nq70-Nk72-D300-Cv3": (1, 70, 72, 300, 3, False),
    "B1-Nq130-Nk150-D136-Cv3": (1, 130, 150, 136, 3, False),
    "B1-Nq130-Nk150-D136-Cv17": (1, 130, 150, 136, 17, False),
    "B1-Nq70-Nk72-D300-Cv130": (1, 70, 72, 300, 130, False),
}


@pytest.mark.parametrize("case", TF32_CASES.values(), ids=TF32_CASES.keys())
def test_emulated_tf32_kernels_match_float64(emulation, case):
    emulated = emulation("fma")
    runs = {p: _emulated_warp(emulated, *case[:5], torch.float32, case[5], p) for p in ("ieee", "tf32x3", "tf32")}
    _assert_tf32_errors(case, runs)


def _assert_tf32_errors(case, runs):
    """runs: precision -> (mine, theirs) of one case's outputs: tf32x3 near the FMA path (ieee), tf32
    far above both and bounded."""
    errors = {p: {name: _relative_error(mine[name], theirs[name]) for name in mine} for p, (mine, theirs) in runs.items()}
    print(case, errors)
    for name, ieee in errors["ieee"].items():
        # tf32x3 drops lo * lo and lo's rounding (~2^-24 of a product) but rounds its float32
        # accumulator three times per product, k8 step after k8 step, where the FMA path sums D in
        # chunks of 32: 1.2-18x the FMA path's error here (~1e-6 relative), the most with the longest
        # sums (D 300; 925 products a score for the 5x5 windows of C 37), 80 times and more below tf32's.
        assert errors["tf32x3"][name] <= 30 * ieee, (name, errors)
        # tf32 rounds every input to 10 mantissa bits (2^-11 ~ 5e-4 relative): ~1e-3 here, far
        # above float32 (so the emulation does round), and bounded by those bits at 1 / temperature = 100.
        assert 50 * errors["tf32x3"][name] < errors["tf32"][name] < 2e-2, (name, errors)


def _tap_rows(patch, width, n):
    """(n, k*k) row of each centre's taps on a padded grid of row width `width` (windows.py)."""
    r = patch // 2
    taps = torch.tensor([(t // patch - r) * width + (t % patch - r) for t in range(patch * patch)])
    return r * width + r + torch.arange(n)[:, None] + taps[None, :]


def _reference_windows(wq, wk, v, patch, scale, mask):
    """out, lse and the scores S (retaining their gradient) of the window form in float64, from the
    unfolded windows of the padded rows: autograd-ready w.r.t. the rows and v."""
    B, _, C = wq.rows.shape
    nq, nk = wq.mean.shape[1], wk.mean.shape[1]
    fq = wq.rows[:, _tap_rows(patch, wq.width, nq)].reshape(B, nq, -1)
    fk = wk.rows[:, _tap_rows(patch, wk.width, nk)].reshape(B, nk, -1)
    mq, aq, mk, ak = (t.double() for t in (wq.mean, wq.inv, wk.mean, wk.inv))
    D = patch * patch * C
    scores = (fq @ fk.transpose(1, 2) - D * mq[:, :, None] * mk[:, None, :]) * aq[:, :, None] * ak[:, None, :]
    scores.retain_grad()
    return (*_softmax_warp(scale * scores, v, mask), scores)


WINDOW_CASES = {  # id: (B, C, query (H, W), key (H, W), Cv, patch, dtype, masked, tiles, backward)
    # 79 query / 86 key centres: 2 ragged blocks each; C 40: 2 chunks of 32 per tap; batch 1 fully masked.
    "B2-C40-q9x7-k8x9-Cv5-k3-float32-mask": (2, 40, (9, 7), (8, 9), 5, 3, torch.float32, True, "fma", True),
    "B1-C20-q9x7-k9x7-Cv3-k5-float32": (1, 20, (9, 7), (9, 7), 3, 5, torch.float32, False, "fma", True),
    # Half windows: forward and backward on tensor cores (correspondence_warp_streamed_mma.cuh).
    # C 20: element copies, one chunk of 64 per tap; a fully masked batch element.
    "B2-C20-q9x7-k8x9-Cv5-k3-float16-mask": (2, 20, (9, 7), (8, 9), 5, 3, torch.float16, True, "fma", True),
    "B1-C20-q9x7-k6x5-Cv3-k5-bfloat16": (1, 20, (9, 7), (6, 5), 3, 5, torch.bfloat16, False, "fma", True),
    # C 72: 16-byte copies, 2 chunks per tap (64 and 8 columns); 154 query centres (2 blocks), 97 keys
    # (one ragged forward block of 128, 2 backward blocks of 64, the second ragged), Cv 17 in a chunk of 64.
    "B1-C72-q12x11-k9x9-Cv17-k3-bfloat16": (1, 72, (12, 11), (9, 9), 17, 3, torch.bfloat16, False, "fma", True),
    # 130 keys: 2 forward blocks of 128, the second of 2 keys; a fully masked batch element.
    "B2-C20-q9x7-k11x10-Cv5-k3-bfloat16-mask": (2, 20, (9, 7), (11, 10), 5, 3, torch.bfloat16, True, "fma", True),
    # 64 keys: half a forward block (one backward block), Cv 17 in a chunk of 64.
    "B1-C72-q9x7-k11x4-Cv17-k3-float16": (1, 72, (9, 7), (11, 4), 17, 3, torch.float16, False, "fma", True),
    # 5x5 windows with C 24 (16-byte copies), a mask with a fully masked batch element; Cv > 64: the
    # forward's wide value class (one chunk of 80 channels) and the backward's wide value tiles (80
    # channels: dQ, dK, dV-only blocks).
    "B2-C24-q9x7-k8x9-Cv70-k5-float16-mask": (2, 24, (9, 7), (8, 9), 70, 5, torch.float16, True, "fma", True),
    # CoCosNet's ADE20K value channels (154, tiles of 160; the forward's two chunks of 80), C 72 (2 chunks
    # per tap), 154 query centres (2 blocks), 97 keys (2 blocks of 64, the second ragged), a fully masked
    # batch element.
    "B2-C72-q12x11-k9x9-Cv154-k3-bfloat16-mask": (2, 72, (12, 11), (9, 9), 154, 3, torch.bfloat16, True, "fma", True),
    # Cv 130: the forward's two chunks of 80, the second of 50 channels (64 padded), 154 keys: 3 key blocks
    # (64, 64, 26).
    "B1-C20-q9x7-k13x10-Cv130-k3-float16": (1, 20, (9, 7), (13, 10), 130, 3, torch.float16, False, "fma", True),
    # Cv 192, the wide tiles' most; then Cv 193, past them: the shared-memory backward. float16: with
    # bfloat16 the rows' sums [sum H m, sum dS s] of either backward lose ~7% here (dP - delta cancels,
    # delta from the rounded out over 192 channels).
    "B1-C20-q9x7-k8x9-Cv192-k3-float16": (1, 20, (9, 7), (8, 9), 192, 3, torch.float16, False, "fma", True),
    "B1-C20-q5x4-k4x5-Cv193-k3-float16": (1, 20, (5, 4), (4, 5), 193, 3, torch.float16, False, "fma", True),
    # The forward alone. ADE20K's 151 labels in bfloat16: two chunks of 80 (the second of 71 channels), 108
    # keys in 64-key blocks (64, 44), a key mask with a fully masked batch element. (Its backward's rows' sums
    # lose 6% here, as at Cv 192 above.)
    "B2-C24-q9x7-k10x9-Cv151-k3-bfloat16-mask": (2, 24, (9, 7), (10, 9), 151, 3, torch.bfloat16, True, "fma", False),
}


def _window_problem(B, C, q_hw, k_hw, Cv, patch, dtype, masked):
    """The window kernels' inputs from seed 0, as the op layer prepares them (ops/correspondence_warp.py:
    _windows_forward): wq, wk (windows.Windows with float32 factors), the key mask on the centres
    (False at padding centres too), v and grad (0 at padding centres) on the centres."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(B, C, *q_hw, generator=g) + 0.5
    key = torch.randn(B, C, *k_hw, generator=g) - 0.5
    wq, wk = (window_features(x, "channel", True, patch, DEFAULT_EPS, dtype, torch.float32) for x in (query, key))
    keep = torch.ones(B, *k_hw, dtype=torch.bool)
    if masked:
        keep = torch.rand(B, *k_hw, generator=g) > 0.4
        keep[-1] = False
    mask = to_centres(keep[:, None], patch, fill=False)[:, 0].contiguous()
    v = to_centres(torch.randn(B, Cv, *k_hw, generator=g), patch).to(dtype)
    grad = to_centres(torch.randn(B, Cv, *q_hw, generator=g), patch).to(dtype)
    return wq, wk, mask, v, grad


def _window_geometry(wq, wk, Cv, patch, scale):
    B, nq, nk = wq.mean.shape[0], wq.mean.shape[1], wk.mean.shape[1]
    C = wq.rows.shape[2]
    return (*_i(B, nq, nk, wq.rows.shape[1], wk.rows.shape[1]), C, Cv, patch, *_i(wq.width, wk.width),
            ctypes.c_float(scale))


def _emulated_window_forward(emulated, problem, patch, precision="ieee"):
    """The emulated window forward's out and lse (/ scale, 0 where every key is masked out) beside the
    float64 reference's; the emulated lse as it is; the reference's scores and leaves rq, rk, v64 (for
    its backward)."""
    wq, wk, mask, v, _ = problem
    scale = 100.0
    B, Cv, nq = v.shape[0], v.shape[1], wq.mean.shape[1]
    out, lse = torch.empty(B, Cv, nq, dtype=v.dtype), torch.empty(B, nq)
    factors = (wq.mean, wq.inv, wk.mean, wk.inv)
    mask_bytes = mask.to(torch.uint8)  # held while the kernel reads it
    assert emulated.emu_windows_forward(EMULATED_DTYPES[v.dtype], _p(wq.rows), _p(factors[0]), _p(factors[1]),
                                        _p(wk.rows), _p(factors[2]), _p(factors[3]), _p(v), _p(mask_bytes),
                                        _p(out), _p(lse),
                                        *_window_geometry(wq, wk, Cv, patch, scale),
                                        ctypes.c_int(PRECISION_CODES[precision])) == 0
    rq, rk, v64 = (t.double().requires_grad_() for t in (wq.rows, wk.rows, v))
    ref, ref_lse, scores = _reference_windows(wq._replace(rows=rq), wk._replace(rows=rk), v64, patch, scale, mask)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] < 0).all()
    # lse compared in units of the logits' scale; rows whose keys are all masked out as 0.
    mine = dict(out=out, lse=torch.where(finite, lse, 0.0) / scale)
    theirs = dict(out=ref, lse=torch.where(finite, ref_lse, 0.0) / scale)
    return mine, theirs, lse, scores, (rq, rk, v64)


def _emulated_window_backward(emulated, problem, patch, q_hw, forward, precision="ieee"):
    """The emulated window backward's dxq, dxk (summed from the per-tap planes), dv and per-centre sums
    rows, cols beside float64 autograd's, after the forward's run (_emulated_window_forward) on a query
    grid of q_hw."""
    wq, wk, mask, v, grad = problem
    mine, theirs, lse, scores, (rq, rk, v64) = forward
    B, C, Cv = v.shape[0], wq.rows.shape[2], v.shape[1]
    theirs["out"].backward(grad.double())
    G = scores.grad  # dL/dscore
    factors = (wq.mean, wq.inv, wk.mean, wk.inv)
    h = G * factors[1].double()[:, :, None] * factors[3].double()[:, None, :]
    ref_rows = torch.stack([(h * factors[2].double()[:, None, :]).sum(2), (G * scores).sum(2)])
    ref_cols = torch.stack([(h * factors[0].double()[:, :, None]).sum(1), (G * scores).sum(1)])
    interior = to_centres(torch.ones(B, 1, *q_hw), patch)[:, 0] > 0
    saved_lse = torch.where(interior, lse, float("inf")).contiguous()  # as the op layer passes it
    delta = (grad.float() * mine["out"].float()).sum(1).contiguous()
    taps, nq, nk = patch * patch, wq.mean.shape[1], wk.mean.shape[1]
    planes_q, planes_k = torch.full((taps, B, nq, C), float("nan")), torch.full((taps, B, nk, C), float("nan"))
    dv, rows, cols = torch.full((B, Cv, nk), float("nan")), torch.empty(2, B, nq), torch.empty(2, B, nk)
    mask_bytes = mask.to(torch.uint8)
    assert emulated.emu_windows_backward(EMULATED_DTYPES[v.dtype], _p(grad), _p(wq.rows), _p(factors[0]),
                                         _p(factors[1]), _p(wk.rows), _p(factors[2]), _p(factors[3]), _p(v),
                                         _p(mask_bytes), _p(saved_lse), _p(delta), _p(planes_q),
                                         _p(planes_k), _p(dv), _p(rows), _p(cols),
                                         *_window_geometry(wq, wk, Cv, patch, 100.0),
                                         ctypes.c_int(PRECISION_CODES[precision])) == 0
    dxq, dxk = sum_tap_planes(planes_q, wq.rows, wq.width, patch), sum_tap_planes(planes_k, wk.rows, wk.width, patch)
    return (dict(dxq=dxq, dxk=dxk, dv=dv, rows=rows, cols=cols),
            dict(dxq=rq.grad, dxk=rk.grad, dv=v64.grad, rows=ref_rows, cols=ref_cols))


def _emulated_window_kernels(emulated, problem, patch, q_hw, precision="ieee", backward=True):
    """The emulated window forward's (and backward's) outputs beside float64's, as two dicts."""
    forward = _emulated_window_forward(emulated, problem, patch, precision)
    if not backward:
        return forward[:2]
    mine, theirs = _emulated_window_backward(emulated, problem, patch, q_hw, forward, precision)
    return {**forward[0], **mine}, {**forward[1], **theirs}


@pytest.mark.parametrize("case", WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
def test_emulated_window_kernels_match_float64(emulation, case):
    q_hw, patch, dtype, tiles, backward = case[2], case[5], case[6], case[8], case[9]
    mine, theirs = _emulated_window_kernels(emulation(tiles), _window_problem(*case[:8]), patch, q_hw,
                                            backward=backward)
    print(case, {name: _relative_error(mine[name], theirs[name]) for name in mine})
    for name in mine:
        assert_close(mine[name], theirs[name], name=name, rtol=RTOL[dtype] / (100.0 if name == "lse" else 1.0))


# float32 windows with precision tf32x3 and tf32 (the kernels of correspondence_warp_streamed_mma.cuh
# with m16n8k8), each beside the FMA path (ieee) on the same inputs. Forward: C 40, 16-byte copies,
# 2 chunks of 32 per tap (32 and 8 columns), ragged query and key blocks, a fully masked batch
# element; C 40 with 130 keys, 2 key blocks of 128 (value chunks of 16), the second of 2 keys; C 37
# with 5x5 windows, element copies, Cv 17 in a chunk of 64 (key blocks of 64). Forward and backward
# (small: the emulated mma.sync are slow; the backward's blocks, chunks and value widths are covered
# on rows, TF32_CASES): C 37, element copies, 2 chunks per tap (32 and 5 columns), one block of 28 query
# and 26 key centres, Cv 5 in a chunk of 16, a mask with a fully masked batch element. Cv 151: the
# wide value class, two chunks of 80 (the second of 71 channels), 108 keys in 64-key blocks (64, 44),
# masked.
TF32_WINDOW_CASES = {  # id: (B, C, query (H, W), key (H, W), Cv, patch, masked, backward)
    "B2-C40-q9x7-k10x9-Cv151-k3-mask": (2, 40, (9, 7), (10, 9), 151, 3, True, False),
    "B2-C40-q9x7-k8x9-Cv5-k3-mask": (2, 40, (9, 7), (8, 9), 5, 3, True, False),
    "B1-C40-q9x7-k11x10-Cv5-k3": (1, 40, (9, 7), (11, 10), 5, 3, False, False),
    "B1-C37-q9x7-k6x5-Cv17-k5": (1, 37, (9, 7), (6, 5), 17, 5, False, False),
    "B2-C37-q5x4-k4x5-Cv5-k3-mask-backward": (2, 37, (5, 4), (4, 5), 5, 3, True, True),
}


@pytest.mark.parametrize("case", TF32_WINDOW_CASES.values(), ids=TF32_WINDOW_CASES.keys())
def test_emulated_tf32_window_kernels_match_float64(emulation, case):
    emulated = emulation("fma")
    problem = _window_problem(*case[:6], torch.float32, case[6])
    _assert_tf32_errors(case, {p: _emulated_window_kernels(emulated, problem, case[5], case[2], p, case[7])
                               for p in ("ieee", "tf32x3", "tf32")})


CONTEXTUAL_DIST_EPS = 1e-3  # the op layer's dist_eps (reference.CONTEXTUAL_LOSS_DIST_EPS)
CONTEXTUAL_CASES = {  # id: (B, Nx, Ny, C, bandwidth, ties, (need_dx, need_dy))
    "B1-Nx5-Ny3-C3-h0.1": (1, 5, 3, 3, 0.1, False, (True, True)),
    # 2 row tiles, 3 column tiles (ragged), 2 chunks of C; exact ties within a thread's columns,
    # across the lanes of a row and across column tiles.
    "B2-Nx70-Ny131-C40-h0.1-ties": (2, 70, 131, 40, 0.1, True, (True, True)),
    "B2-Nx70-Ny131-C40-h0.1-ties-dy-only": (2, 70, 131, 40, 0.1, True, (False, True)),
    "B1-Nx64-Ny64-C32-h0.05-dx-only": (1, 64, 64, 32, 0.05, False, (True, False)),
}
TIED = (3, 35, 40, 100)  # y rows made equal to y row 3: same thread (35), another lane (40), another tile (100)


def _reference_contextual(x, y, bandwidth):
    """Per-row m, argmin, s (t) of float64 rows, autograd-ready: torch.min's first index carries the
    minimum's gradient, as the materialised reference's."""
    d = 1 - x @ y.transpose(1, 2)
    m, argmin = d.min(-1)
    e = torch.exp((m[..., None] - d) / (bandwidth * (m[..., None] + CONTEXTUAL_DIST_EPS)))
    return d, m, argmin, e.sum(-1), (e * d).sum(-1)


@pytest.mark.parametrize("case", CONTEXTUAL_CASES.values(), ids=CONTEXTUAL_CASES.keys())
def test_emulated_contextual_loss_matches_float64(emulation, case):
    B, Nx, Ny, C, bandwidth, ties, (need_dx, need_dy) = case
    emulated = emulation("fma")
    g = torch.Generator().manual_seed(0)
    unit = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
    y = unit(torch.randn(B, Ny, C, generator=g, dtype=torch.float64))
    x = unit(torch.randn(B, Nx, C, generator=g, dtype=torch.float64))
    if ties:
        y[:, TIED[1:]] = y[:, TIED[:1]]
        x[:, :10] = unit(y[:, TIED[:1]] + 0.3 * torch.randn(B, 10, C, generator=g, dtype=torch.float64))
    x, y = x.float().contiguous(), y.float().contiguous()  # the kernels' inputs, and the judge's
    grad_s = (torch.rand(B, Nx, generator=g) + 0.5).contiguous()
    m, s, t = torch.empty(B, Nx), torch.empty(B, Nx), torch.empty(B, Nx)
    argmin = torch.empty(B, Nx, dtype=torch.int64)
    shape = (*_i(B, Nx, Ny), C, ctypes.c_float(bandwidth), ctypes.c_float(CONTEXTUAL_DIST_EPS))
    assert emulated.emu_contextual_loss_forward(_p(x), _p(y), _p(m), _p(argmin), _p(s), _p(t), *shape) == 0
    x64, y64 = (v.double().requires_grad_() for v in (x, y))
    d, ref_m, ref_argmin, ref_s, ref_t = _reference_contextual(x64, y64, bandwidth)
    if ties:  # the ties are exact, and the lowest index wins
        assert (d[:, :10, TIED[0]] == d[:, :10, TIED[1]]).all() and (d[:, :10, TIED[0]] == d[:, :10, TIED[3]]).all()
        assert (ref_argmin[:, :10] == TIED[0]).sum() >= 10
    assert torch.equal(argmin, ref_argmin)
    assert_close(m, ref_m, name="m", rtol=1e-6)
    assert_close(s, ref_s, name="s", rtol=1e-5)
    assert_close(t, ref_t, name="t", rtol=1e-5)
    (ref_s * grad_s.double()).sum().backward()
    dx = torch.full((B, Nx, C), float("nan")) if need_dx else None
    dy = torch.full((B, Ny, C), float("nan")) if need_dy else None
    assert emulated.emu_contextual_loss_backward(_p(grad_s), _p(x), _p(y), _p(m), _p(argmin), _p(s), _p(t), _p(dx),
                                                 _p(dy), *shape) == 0
    for name, mine, theirs in (("dx", dx, x64.grad), ("dy", dy, y64.grad)):
        if mine is not None:
            assert_close(mine, theirs, name=name, rtol=1e-4)


@pytest.mark.parametrize("center", ["channel", None])
@pytest.mark.parametrize("normalize", [True, False])
def test_emulated_prologue_matches_float64(emulation, center, normalize):
    emulated = emulation("fma")
    B, C, H, W = 2, 37, 5, 60  # 300 positions: two blocks, the second ragged
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0)) * 3 + 1
    grad = torch.randn(B, H * W, C, generator=torch.Generator().manual_seed(1))
    xs = x.reshape(B, C, -1).contiguous()
    rows, dx = torch.empty(B, H * W, C), torch.empty(B, C, H * W)
    flags = (ctypes.c_bool(center == "channel"), ctypes.c_bool(normalize), ctypes.c_float(DEFAULT_EPS))
    assert emulated.emu_prepare_features(0, _p(xs), _p(rows), *_i(B, C, H * W), *flags) == 0
    assert emulated.emu_prepare_features_backward(_p(grad), _p(xs), _p(dx), *_i(B, C, H * W), *flags) == 0
    x64 = x.double()
    expected = normalize_features(x64, center, normalize, 1, DEFAULT_EPS).transpose(1, 2)
    assert_close(rows, expected, name="rows", rtol=1e-5)
    expected_dx = normalize_features_backward(grad.double().transpose(1, 2), x64, center, normalize, 1, DEFAULT_EPS)
    assert_close(dx, expected_dx.reshape(B, C, -1), name="dx", rtol=1e-5)


def test_toolkit_found_through_a_wrapper_script(tmp_path):
    root = tmp_path / "cuda-13.0"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin" / "nvcc").write_text("")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    assert build.toolkit_root(wrapper) == root
    assert build.toolkit_root(root / "bin" / "nvcc") == root


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA device")
def test_refuses_without_a_device_and_builds_nothing():
    backend = ck.BACKENDS["cuda"]
    reason = backend.unavailable()
    assert reason is not None and ("no CUDA device" in reason or "not a CUDA build" in reason)
    assert backend.refusal(torch.device("cuda"), torch.float32) == reason
    assert "not cpu" in backend.refusal(torch.device("cpu"), torch.float32)
    assert ck.select("auto", torch.device("cpu"), torch.float32).name != "cuda"
    with pytest.raises(ValueError, match="backend='cuda' cannot run this input"):
        ck.correspondence_warp(*(torch.randn(1, 3, 4, 4) for _ in range(3)), backend="cuda")


def test_refuses_cards_older_than_sm80(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = ck.BACKENDS["cuda"].refusal(torch.device("cuda"), torch.float16)
    assert reason == "its kernels need compute capability 8.0 or newer (A100, H100, ...), this card has 7.5"


JIT_BUILD = """
from cocos_kernels import cuda
module = cuda._jit_build()
print(sorted(n for n in dir(module) if not n.startswith("_")))
"""


@pytest.mark.slow
@needs_toolkit
def test_jit_build_links_and_imports(tmp_path):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="8.0;9.0a", TORCH_EXTENSIONS_DIR=str(tmp_path),
               MAX_JOBS=str(os.cpu_count() or 2), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", JIT_BUILD], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("correspondence_warp_forward", "correspondence_warp_backward", "prepare_features",
                 "prepare_features_backward", "contextual_loss_forward", "contextual_loss_backward"):
        assert name in proc.stdout
