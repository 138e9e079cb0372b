"""cocos_kernels: memory-efficient dense correspondence (CoCosNet-style exemplar warping).

    import cocos_kernels as ck
    out = ck.correspondence_warp(query, key, value, temperature=0.01)
    loss = ck.contextual_loss(x_features, y_features, bandwidth=0.1)  # (B,)
"""
from . import reference
from .dispatch import BACKENDS, backend_names, select
from .features import DEFAULT_EPS
from .ops.contextual_loss import ContextualLoss, contextual_loss
from .ops.correspondence_warp import CorrespondenceWarp, correspondence_warp

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ContextualLoss",
    "CorrespondenceWarp",
    "DEFAULT_EPS",
    "backend_names",
    "contextual_loss",
    "correspondence_warp",
    "reference",
    "select",
]
