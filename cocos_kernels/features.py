"""The correlation prologue: (patch-unfold), centring and L2 normalisation of features.

`normalize_features` is plain differentiable PyTorch: the reference uses it under autograd,
the fused backends call it without autograd and invert it with `normalize_features_backward`,
an explicit O(N*D) backward, so that the fused op saves only its inputs, output and logsumexp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import CENTER_MODES, DEFAULT_EPS

__all__ = ["CENTER_MODES", "DEFAULT_EPS", "compute_dtype", "contextual_features", "contextual_features_backward", "normalize_features",
           "normalize_features_backward"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused ops prepare features and accumulate in: half inputs in float32; float64
    stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _norm(f: torch.Tensor) -> torch.Tensor:
    """|f| over dim 1 (keepdim), without overflow or underflow in the sum of squares.

    Each position is divided by a power of two s (just below its max-abs entry) before the norm
    and the norm multiplied back: exact scalings, so the result is bit-identical to `f.norm(dim=1)`
    wherever that one neither overflows nor underflows, and finite where it would (float32
    features of magnitude 1e20 square to 1e40; 1e-23 squares to 0). s is a constant to autograd,
    so the gradient is autograd's norm gradient f/|f| (0 where |f| == 0). Where the max is 0, NaN
    or Inf, s = 1: the plain formula, so NaN/Inf propagate exactly as they do there.
    """
    with torch.no_grad():
        m = torch.linalg.vector_norm(f.detach(), float("inf"), dim=1, keepdim=True)  # max |f|, NaN-propagating
        ok = torch.isfinite(m) & (m > 0)
        # m = mantissa * 2**e with mantissa in [0.5, 1): 2**(e-1) <= m, so s never overflows.
        s = torch.where(ok, torch.ldexp(torch.ones_like(m), torch.frexp(m)[1] - 1), 1.0)
    return (f / s).norm(dim=1, keepdim=True) * s


def normalize_features(
    x: torch.Tensor, center: str | None, normalize: bool, patch_size: int, eps: float
) -> torch.Tensor:
    """(B, C, H, W) -> (B, D, N) with D = C * patch_size**2, as the reference builds theta/phi."""
    f = _center(_unfold(x, patch_size), center)
    if normalize:
        f = f / (_norm(f) + eps)
    return f


def _l2_normalize_backward(grad: torch.Tensor, c: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient w.r.t. c of c / (|c| + eps) (norms over dim 1) given `grad` w.r.t. its output."""
    n = _norm(c)
    s = n + eps
    xhat = c / s
    del c  # at most three (B, D, N) temporaries alive: this runs at the op's memory peak
    # d(c/(|c|+eps))/dc = I/s - xhat c^T/(s |c|); at |c| == 0 autograd's norm backward is 0.
    radial = (grad * xhat).sum(dim=1, keepdim=True) / n
    return (grad / s).sub_(xhat.mul_(torch.where(n > 0, radial, 0.0)))


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
        grad = _l2_normalize_backward(grad, _center(_unfold(x, patch_size), center), eps)
    if center == "channel":
        grad = grad - grad.mean(dim=1, keepdim=True)
    elif center == "spatial":
        grad = grad - grad.mean(dim=2, keepdim=True)
    B, C, H, W = x.shape
    if patch_size == 1:
        return grad.reshape(B, C, H, W)
    return F.fold(grad, (H, W), patch_size, padding=patch_size // 2)


# --- contextual loss prologue ------------------------------------------------------------------
# The contextual loss centres BOTH maps with the second map's (the exemplar's) statistics, so
# its prologue differs from the correlation's, where each map is centred with its own.

def _exemplar_mean(y: torch.Tensor, center: str) -> torch.Tensor:
    # "channel": Y's channel mean at each position (CoCosNet's --PONO); "spatial": Y's
    # per-channel mean over positions.
    return y.mean(dim=1 if center == "channel" else 2, keepdim=True)


def contextual_features(
    x: torch.Tensor, y: torch.Tensor, center: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) x 2 -> (B, C, N) x 2: both maps centred with y's statistics, L2-normalised."""
    xf, yf = _unfold(x, 1), _unfold(y, 1)
    mu = _exemplar_mean(yf, center)
    xc, yc = xf - mu, yf - mu
    return xc / (_norm(xc) + eps), yc / (_norm(yc) + eps)


def contextual_features_backward(
    grad_x: torch.Tensor | None,
    grad_y: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    center: str,
    eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. x and y of `contextual_features(x, y, ...)` given those w.r.t. its two
    outputs (None: no gradient). y's gradient takes x's output gradient too, through the mean."""
    B, C, H, W = x.shape
    yf = _unfold(y, 1)
    mu = _exemplar_mean(yf, center)
    gxc = None if grad_x is None else _l2_normalize_backward(grad_x, _unfold(x, 1) - mu, eps)
    gyc = None if grad_y is None else _l2_normalize_backward(grad_y, yf - mu, eps)
    del mu
    # x~ = x - mu(y), y~ = y - mu(y): d/dy gets -(sum of both over the mean's axis) / its length.
    axis = 1 if center == "channel" else 2
    total = gxc if gyc is None else (gyc if gxc is None else gxc + gyc)
    gy = None
    if total is not None:
        gy = -total.mean(dim=axis, keepdim=True)
        gy = gy + gyc if gyc is not None else gy.expand_as(total).clone()
    return (None if gxc is None else gxc.reshape(B, C, H, W),
            None if gy is None else gy.reshape(B, C, H, W))
