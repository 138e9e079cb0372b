"""The kernels contract: what a fused backend's `kernels()` object implements.

Every fused backend module (`cpu`, `cuda`, `triton`) has a `kernels()` function returning one
object with every method below; the op layer calls them without probing. What a backend supports
is declared on its `dispatch.Backend` (`ops`, `features`), never asked of this object: the op
layer passes the row kernels `key_mask=` a tensor only where the backend declares "key_mask"
(None otherwise), `precision=` (one of `constants.PRECISIONS`) only where it declares
"precision", calls the window methods only where it declares "windows" (always with a key_mask:
the padding centres take no part), and the contextual_loss methods only where it implements that op.

Shapes: prepared feature rows q (B, Nq, D), k (B, Nk, D); value v (B, Cv, Nk); out (B, Cv, Nq);
lse (B, Nq) the row logsumexp of scale * q k^T. Gradients are float32 (float64 for float64
inputs), None where not requested.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class WarpKernels(Protocol):
    """The correspondence_warp kernels."""

    # How the windows backward returns the feature gradients: True, per-tap planes (k*k, B, N, C) on
    # the centre range, which the op layer adds at their taps' offsets (windows.sum_tap_planes);
    # False, already summed on the padded grid of rows (B, L, C).
    window_tap_planes: bool

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the kernels take prepared features, value and grad_out in, for inputs of `dtype`."""

    def prepare_features(self, x: Tensor, center, normalize: bool, patch_size: int, eps: float,
                         dtype: torch.dtype) -> Tensor | None:
        """(B, C, H, W) -> rows (B, N, C) in `dtype`; None where the op layer's PyTorch prologue runs."""

    def prepare_features_backward(self, grad_rows: Tensor, x: Tensor, center, normalize: bool, patch_size: int,
                                  eps: float) -> Tensor | None:
        """Gradient w.r.t. x of `prepare_features`; None exactly where `prepare_features` is None."""

    def correspondence_warp_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                                    key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(out in v's dtype, lse); keys where key_mask ((B, Nk) bool) is False get no weight."""

    def correspondence_warp_backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                     lse: Tensor, scale: float, need_dq: bool, need_dk: bool, need_dv: bool,
                                     key_mask: Tensor | None = None) -> tuple:
        """(dq, dk, dv)."""

    def correspondence_warp_windows_forward(self, xq: Tensor, mq: Tensor, aq: Tensor, xk: Tensor, mk: Tensor,
                                            ak: Tensor, v: Tensor, patch: int, width_q: int, width_k: int,
                                            scale: float, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The forward on k x k windows (windows.py): xq / xk padded grids of rows (B, L, C) of row width
        width_q / width_k, mq / aq and mk / ak per-centre window means and score factors (B, N), v,
        key_mask and the results on the centre ranges."""

    def correspondence_warp_windows_backward(self, grad_out: Tensor, xq: Tensor, mq: Tensor, aq: Tensor, xk: Tensor,
                                             mk: Tensor, ak: Tensor, v: Tensor, out: Tensor, lse: Tensor, patch: int,
                                             width_q: int, width_k: int, scale: float, need_dq: bool, need_dk: bool,
                                             need_dv: bool, key_mask: Tensor | None = None) -> list:
        """[dxq, dxk (see `window_tap_planes`), dv (B, Cv, Nk), rows (2, B, Nq), cols (2, B, Nk)]: per centre
        [sum_j H_ij m_j, sum_j dS_ij logit_ij] (see csrc/cpu/correspondence_warp.h); lse is +inf at
        padding centres."""


class ContextualLossKernels(Protocol):
    """The contextual_loss kernels, on prepared rows (see csrc/cpu/contextual_loss.h)."""

    def contextual_loss_forward(self, x: Tensor, y: Tensor, bandwidth: float,
                                dist_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row (m, argmin, s, t), each (B, Nx), of rows x (B, Nx, C), y (B, Ny, C)."""

    def contextual_loss_backward(self, grad_s: Tensor, x: Tensor, y: Tensor, m: Tensor, argmin: Tensor, s: Tensor,
                                 t: Tensor, bandwidth: float, dist_eps: float, need_dx: bool,
                                 need_dy: bool) -> tuple:
        """(dx, dy) w.r.t. the rows."""


class Kernels(WarpKernels, ContextualLossKernels, Protocol):
    """A fused backend's kernels object."""
