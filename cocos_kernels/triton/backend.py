"""The triton backend's kernels object: the entry points of both kernel modules as one
`cocos_kernels.kernels.Kernels`."""
from __future__ import annotations

from . import contextual_loss as _contextual_loss
from . import correspondence_warp as _warp


class TritonKernels:
    """Half inputs stay half in the tile products; the prologue runs in Triton for patch_size 1 with
    channel or no centring; the window backward returns one gradient plane per tap."""

    window_tap_planes = True

    input_dtype = staticmethod(_warp.input_dtype)
    prepare_features = staticmethod(_warp.prepare_features)
    prepare_features_backward = staticmethod(_warp.prepare_features_backward)
    correspondence_warp_forward = staticmethod(_warp.correspondence_warp_forward)
    correspondence_warp_backward = staticmethod(_warp.correspondence_warp_backward)
    correspondence_warp_windows_forward = staticmethod(_warp.correspondence_warp_windows_forward)
    correspondence_warp_windows_backward = staticmethod(_warp.correspondence_warp_windows_backward)
    contextual_loss_forward = staticmethod(_contextual_loss.contextual_loss_forward)
    contextual_loss_backward = staticmethod(_contextual_loss.contextual_loss_backward)
