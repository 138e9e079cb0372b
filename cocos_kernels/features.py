"""The correlation prologue: (patch-unfold), centring and L2 normalisation of features.

`normalize_features` is plain differentiable PyTorch: the reference uses it under autograd,
the fused backends call it without autograd and invert it with `normalize_features_backward`,
an explicit O(N*D) backward, so that the fused op saves only its inputs, output and logsumexp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference code adds this to the L2 norm (not inside the square root).
DEFAULT_EPS = 2.220446049250313e-16
CENTER_MODES = ("channel", "spatial", None)


def _unfold(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*p*p, H*W): each position's zero-padded p x p neighbourhood."""
    if patch_size == 1:
        return x.reshape(x.shape[0], x.shape[1], -1)
    return F.unfold(x, patch_size, padding=patch_size // 2)


def _center(f: torch.Tensor, center: str | None) -> torch.Tensor:
    if center == "channel":
        return f - f.mean(dim=1, keepdim=True)
    if center == "spatial":
        return f - f.mean(dim=2, keepdim=True)
    return f


def normalize_features(
    x: torch.Tensor, center: str | None, normalize: bool, patch_size: int, eps: float
) -> torch.Tensor:
    """(B, C, H, W) -> (B, D, N) with D = C * patch_size**2, as the reference builds theta/phi."""
    f = _center(_unfold(x, patch_size), center)
    if normalize:
        f = f / (f.norm(dim=1, keepdim=True) + eps)
    return f


def normalize_features_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    center: str | None,
    normalize: bool,
    patch_size: int,
    eps: float,
) -> torch.Tensor:
    """Gradient w.r.t. x of `normalize_features(x, ...)` given `grad` (B, D, N) w.r.t. its output."""
    if normalize:
        c = _center(_unfold(x, patch_size), center)
        n = c.norm(dim=1, keepdim=True)
        s = n + eps
        xhat = c / s
        del c  # at most three (B, D, N) temporaries alive: this runs at the op's memory peak
        # d(c/(|c|+eps))/dc = I/s - xhat c^T/(s |c|); at |c| == 0 autograd's norm backward is 0.
        radial = (grad * xhat).sum(dim=1, keepdim=True) / n
        grad = (grad / s).sub_(xhat.mul_(torch.where(n > 0, radial, 0.0)))
        del xhat
    if center == "channel":
        grad = grad - grad.mean(dim=1, keepdim=True)
    elif center == "spatial":
        grad = grad - grad.mean(dim=2, keepdim=True)
    B, C, H, W = x.shape
    if patch_size == 1:
        return grad.reshape(B, C, H, W)
    return F.fold(grad, (H, W), patch_size, padding=patch_size // 2)
