"""cocos_kernels: memory-efficient dense correspondence (CoCosNet-style exemplar warping).

    import cocos_kernels as ck
    out = ck.correspondence_warp(query, key, value, temperature=0.01)
    warped, back = ck.cycle_warp(query, key, value)           # CoCosNet's cycle
    image = ck.warp_image(query, key, exemplar, stride=4)     # full-resolution patch warp
    idx, sim = ck.correspondence_argmax(query, key)           # best match per query position
    loss = ck.contextual_loss(x_features, y_features, bandwidth=0.1)  # (B,)
"""
from . import reference
from .dispatch import BACKENDS, backend_names, select
from .constants import DEFAULT_EPS
from .ops.contextual_loss import ContextualLoss, contextual_loss
from .ops.correspondence_topk import correspondence_argmax, correspondence_topk
from .ops.correspondence_warp import CorrespondenceWarp, correspondence_warp
from .ops.cycle_warp import cycle_warp
from .ops.warp_image import warp_image

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ContextualLoss",
    "CorrespondenceWarp",
    "DEFAULT_EPS",
    "backend_names",
    "contextual_loss",
    "correspondence_argmax",
    "correspondence_topk",
    "correspondence_warp",
    "cycle_warp",
    "reference",
    "select",
    "warp_image",
]
