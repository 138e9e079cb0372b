"""`warp_image`: an exemplar image warped to the query at full resolution through the fused warp.

Features live on a grid `stride` times coarser than the images (CoCosNet: 1/4). Two ways to bring
the exemplar's pixels along, as the reference code has them:
  "patch": each feature cell carries its stride x stride pixel patch (unfold, 3*s*s channels); the
           warped patches are folded back to full resolution (the reference's --warp_patch, which
           hard-codes a 256 output side; here the side follows the inputs).
  "pool":  the exemplar average-pooled to the feature grid (3 channels), warped, then upsampled
           (nearest by default, bilinear as --warp_bilinear, or left on the feature grid).
unfold/fold/pool are O(N) and stay in PyTorch; the (Nq x Nk) part is `correspondence_warp`.
"""
from __future__ import annotations

import numbers

import torch.nn.functional as F
from torch import Tensor

from ..constants import DEFAULT_EPS
from ..validation import check_choice, check_feature_map
from .correspondence_warp import warp
from .warp_options import WarpOptions

WARP_MODES = ("patch", "pool")
UPSAMPLE_MODES = ("nearest", "bilinear", None)


def warp_image(
    query: Tensor,
    key: Tensor,
    exemplar: Tensor,
    temperature: float = 0.01,
    *,
    stride: int = 4,
    mode: str = "patch",
    upsample: str | None = "nearest",
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    key_mask: Tensor | None = None,
    check_finite: bool = False,
    backend: str = "auto",
    precision: str | None = None,
) -> Tensor:
    """Warp `exemplar` (B, Ce, Hk*stride, Wk*stride) onto the query's grid.

    Args:
        query, key: (B, C, Hq, Wq) and (B, C, Hk, Wk) features, as for `correspondence_warp`.
        exemplar: the exemplar image (or any map) at `stride` times the key grid's resolution.
        stride: image pixels per feature cell along each side (CoCosNet: 4).
        mode: "patch" (full-resolution patches, 3*s*s channels warped) or "pool" (see module doc).
        upsample: for mode "pool": "nearest", "bilinear" or None (stay on the feature grid).
        The rest: as `correspondence_warp`.

    Returns:
        (B, Ce, Hq*stride, Wq*stride), or (B, Ce, Hq, Wq) for mode "pool" with upsample None.
    """
    options = WarpOptions(temperature, center, normalize, patch_size, eps, precision)
    check_feature_map("exemplar", exemplar)
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    check_choice("mode", mode, WARP_MODES)
    check_choice("upsample", upsample, UPSAMPLE_MODES)
    if key.dim() == 4 and tuple(exemplar.shape[2:]) != (key.shape[2] * stride, key.shape[3] * stride):
        raise ValueError(f"exemplar must be stride={stride} times the key grid {tuple(key.shape[2:])}: expected "
                         f"spatial size {(key.shape[2] * stride, key.shape[3] * stride)}, got {tuple(exemplar.shape[2:])}")
    B, Ce = exemplar.shape[:2]
    Hk, Wk = key.shape[2:]
    Hq, Wq = query.shape[2:]
    call = dict(key_mask=key_mask, check_finite=check_finite, backend=backend)
    if mode == "patch":
        patches = F.unfold(exemplar, stride, stride=stride).view(B, Ce * stride * stride, Hk, Wk)
        warped = warp(query, key, patches, options, **call)
        return F.fold(warped.reshape(B, Ce * stride * stride, Hq * Wq), (Hq * stride, Wq * stride), stride,
                      stride=stride)
    warped = warp(query, key, F.avg_pool2d(exemplar, stride), options, **call)
    if upsample is None:
        return warped
    return F.interpolate(warped, scale_factor=stride, mode=upsample)
