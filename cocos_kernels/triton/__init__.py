"""The Triton backend ("triton"): kernels in one module per op (`correspondence_warp`,
`contextual_loss`) and helpers both use (`common`). The dispatcher imports it only when the
backend is asked for, so that `import cocos_kernels` works where triton is not installed."""
from __future__ import annotations


def kernels():
    """The backend's kernels object (`backend.TritonKernels`); raises ImportError without triton."""
    from .backend import TritonKernels

    return TritonKernels()
