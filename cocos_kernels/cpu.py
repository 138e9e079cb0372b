"""Loader of the compiled CPU extension (`csrc/cpu`), built with ninja on first use and cached."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

_SOURCES = ("correspondence_warp.cpp", "contextual_loss.cpp", "bindings.cpp")


def _csrc_dir() -> Path | None:
    here = Path(__file__).resolve().parent
    # A wheel carries the sources inside the package (setup.py copies them); a checkout beside it.
    for candidate in (here / "csrc" / "cpu", here.parent / "csrc" / "cpu"):
        if all((candidate / s).is_file() for s in _SOURCES):
            return candidate
    return None


def _simd_flags() -> list[str]:
    # Build for the vector units this machine has: the exp loops vectorise with AVX2/FMA.
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


@functools.cache
def extension():
    """The compiled module. Raises RuntimeError (with the build log's tail) if it cannot be built."""
    src = _csrc_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/cpu) are not installed next to cocos_kernels")
    from torch.utils.cpp_extension import load

    verbose = os.environ.get("COCOS_KERNELS_VERBOSE_BUILD") == "1"
    print("cocos_kernels: loading the CPU extension (the first build takes about a minute)",
          file=sys.stderr, flush=True)
    try:
        return load(
            name="cocos_kernels_cpu",
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", *_simd_flags()],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )
    except Exception as e:  # noqa: BLE001 -- reported as the backend's refusal reason
        raise RuntimeError(f"building the CPU extension failed: {e}") from e
