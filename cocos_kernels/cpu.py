"""The CPU C++ backend ("cpu"): loader of the extension built from `csrc/cpu` (with ninja on first
use and cached, in a folder of its own per torch install, flags and sources: see
`cocos_kernels/build.py`), and its kernels object."""
from __future__ import annotations

import functools

import torch

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


class CpuKernels:
    """The `cocos_kernels.kernels.Kernels` contract over the compiled module: float32 or float64
    throughout (half inputs are prepared in float32), the PyTorch prologue, and window backwards
    that sum the taps themselves (each thread accumulates on its own copy of the padded grid)."""

    window_tap_planes = False

    def __init__(self, module):
        self._ext = module

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def prepare_features(self, x, center, normalize, patch_size, eps, dtype):
        return None

    def prepare_features_backward(self, grad_rows, x, center, normalize, patch_size, eps):
        return None

    def correspondence_warp_forward(self, q, k, v, scale, key_mask=None):
        return self._ext.correspondence_warp_forward(q, k, v, float(scale), key_mask)

    def correspondence_warp_backward(self, grad_out, q, k, v, out, lse, scale, need_dq, need_dk, need_dv,
                                     key_mask=None):
        return self._ext.correspondence_warp_backward(grad_out, q, k, v, out, lse, float(scale), bool(need_dq),
                                                      bool(need_dk), bool(need_dv), key_mask)

    def correspondence_warp_windows_forward(self, xq, mq, aq, xk, mk, ak, v, patch, width_q, width_k, scale,
                                            key_mask=None):
        return self._ext.correspondence_warp_windows_forward(xq, mq, aq, xk, mk, ak, v, int(patch), int(width_q),
                                                             int(width_k), float(scale), key_mask)

    def correspondence_warp_windows_backward(self, grad_out, xq, mq, aq, xk, mk, ak, v, out, lse, patch, width_q,
                                             width_k, scale, need_dq, need_dk, need_dv, key_mask=None):
        return self._ext.correspondence_warp_windows_backward(
            grad_out, xq, mq, aq, xk, mk, ak, v, out, lse, int(patch), int(width_q), int(width_k), float(scale),
            bool(need_dq), bool(need_dk), bool(need_dv), key_mask)

    def contextual_loss_forward(self, x, y, bandwidth, dist_eps):
        return self._ext.contextual_loss_forward(x, y, float(bandwidth), float(dist_eps))

    def contextual_loss_backward(self, grad_s, x, y, m, argmin, s, t, bandwidth, dist_eps, need_dx, need_dy):
        return self._ext.contextual_loss_backward(grad_s, x, y, m, argmin, s, t, float(bandwidth), float(dist_eps),
                                                  bool(need_dx), bool(need_dy))


def kernels() -> CpuKernels:
    """The backend's kernels object; builds the extension on first use (RuntimeError saying why it cannot)."""
    return CpuKernels(extension())
