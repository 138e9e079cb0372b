"""Loader of the compiled CPU extension (`csrc/cpu`), built with ninja on first use and cached (in a
folder of its own per torch install, flags and sources: see `cocos_kernels/build.py`)."""
from __future__ import annotations

import functools

from . import build


@functools.cache
def extension():
    """The compiled module. Raises RuntimeError (with the build log's tail) if it cannot be built."""
    src = build.source_dir("cpu")
    if src is None:
        raise RuntimeError("the C++ sources (csrc/cpu) are not installed next to cocos_kernels")
    build.say("loading the CPU extension (the first build takes about a minute)")
    try:
        return build.load("cocos_kernels_cpu", src, build.CPU_SOURCES, cflags=build.cpu_cflags(),
                          ldflags=build.CPU_LDFLAGS)
    except Exception as e:  # noqa: BLE001 -- reported as the backend's refusal reason
        raise RuntimeError(f"building the CPU extension failed: {e}") from e
