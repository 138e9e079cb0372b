"""k x k patch features without the unfold: the window form of the correlation prologue.

The reference builds each position's feature as its zero-padded k x k window of C channels
(D = k*k*C; 2304 for CoCosNet's 3x3 on 256 channels), centres it by its scalar mean and normalises
it. The window form never builds that D-wide copy: with x padded to a (H+2r) x (W+2r) grid
(r = k//2) of C-wide rows, tap (dy, dx) of every centre is one fixed row offset, so

    <p_u - m_u, q_v - n_v> = sum over taps <x(u+t), y(v+t)>  -  D m_u n_v
    |p_u - m_u|^2          = sum over taps |x(u+t)|^2         -  D m_u^2

and a fused backend multiplies C-wide row ranges k*k times per tile, then scales by per-centre
scalars (the window means and 1/(norm + eps)) computed here in float64 from box filters. The
fused backwards (triton, cuda) write one gradient plane per tap, each owned by one program (no
atomics); `sum_tap_planes` adds them at their taps' offsets.

Two exact rewrites keep float32 accurate: each sample is shifted by its global mean c with the
padding set to -c (the windows' centred vectors do not change, but the dot products above no
longer carry a large common offset that the -D m n term would have to cancel), and scaled by a
power of two so its largest entry is in [1, 2) (features of 1e20 or 1e-30 neither overflow nor
underflow in the products). Centring over positions ("spatial") has no window form: the op
keeps the unfold for it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .constants import WINDOW_CENTERS

__all__ = ["WINDOW_CENTERS", "Windows", "from_centres", "sum_tap_planes", "to_centres", "window_count",
           "window_features", "window_features_backward"]


class Windows(NamedTuple):
    rows: torch.Tensor  # (B, Hp*Wp, C) padded, shifted, scaled grid in the compute dtype
    mean: torch.Tensor  # (B, N) window mean per centre (0 at padding centres, and without centring)
    inv: torch.Tensor  # (B, N) score factor per centre: 1/(norm + eps) in the rows' units (0 at padding)
    width: int  # Wp, the padded row width
    scalars: tuple  # float64 pieces the backward needs: (X, unit, norm, mean, inv) on the padded grid


def _box(z: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, Hp, Wp) -> each position's sum over its k x k window (zero outside)."""
    ones = z.new_ones((1, 1, patch_size, patch_size))
    return F.conv2d(z[:, None], ones, padding=patch_size // 2)[:, 0]


def _centres(t: torch.Tensor, H: int, W: int, r: int) -> torch.Tensor:
    """(..., Hp, Wp) -> (..., N): the centre range [lo, lo + N) of the flattened padded grid,
    from interior position (0, 0) to (H-1, W-1), padding columns between rows included."""
    Wp = W + 2 * r
    lo, n = r * Wp + r, (H - 1) * Wp + W
    return t.flatten(-2)[..., lo:lo + n]


def window_count(H: int, W: int, patch_size: int) -> int:
    r = patch_size // 2
    return (H - 1) * (W + 2 * r) + W


def to_centres(x: torch.Tensor, patch_size: int, fill: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, N) on the centre range; padding centres hold `fill`."""
    r = patch_size // 2
    H, W = x.shape[2:]
    return _centres(F.pad(x, (r, r, r, r), value=fill), H, W, r).contiguous()


def from_centres(t: torch.Tensor, H: int, W: int, patch_size: int) -> torch.Tensor:
    """(B, C, N) on the centre range -> (B, C, H, W), dropping the padding centres."""
    r = patch_size // 2
    return _padded(t, H, W, r)[..., r:r + H, r:r + W]


def _padded(t: torch.Tensor, H: int, W: int, r: int) -> torch.Tensor:
    """(..., N) on the centre range -> (..., Hp, Wp) padded grid, 0 off the centre range."""
    Hp, Wp = H + 2 * r, W + 2 * r
    full = t.new_zeros((*t.shape[:-1], Hp * Wp))
    lo = r * Wp + r
    full[..., lo:lo + t.shape[-1]] = t
    return full.view(*t.shape[:-1], Hp, Wp)


def window_features(x: torch.Tensor, center, normalize: bool, patch_size: int, eps: float,
                    dtype: torch.dtype, scalar_dtype: torch.dtype | None = None) -> Windows:
    """The window form of `normalize_features(x, center, normalize, patch_size, eps)`: rows in
    `dtype`, per-centre scalars in `scalar_dtype` (default `dtype`)."""
    B, C, H, W = x.shape
    r, D = patch_size // 2, C * patch_size * patch_size
    x64 = x.detach().double()
    # Shift and scale from the finite entries only: a NaN/Inf entry then spoils just the windows
    # holding it, as it does in the reference, not the whole sample.
    finite = torch.isfinite(x64)
    x_ok = torch.where(finite, x64, 0.0)
    dims = (1, 2, 3)
    shift = (x_ok.sum(dims, keepdim=True) / finite.sum(dims, keepdim=True).clamp_min(1) if center == "channel"
             else torch.zeros_like(x64[:, :1, :1, :1]))
    xs = F.pad(x64, (r, r, r, r)) - shift  # padding = -shift: the centred windows are unchanged
    big = (F.pad(x_ok, (r, r, r, r)) - shift).abs().amax(dim=dims, keepdim=True)
    ok = big > 0
    unit = torch.where(ok, torch.ldexp(torch.ones_like(big), torch.frexp(big)[1] - 1), 1.0)  # 2^e <= big
    X = xs / unit
    S1, S2 = _box(X.sum(1), patch_size), _box(X.square().sum(1), patch_size)
    mean = S1 / D if center == "channel" else torch.zeros_like(S1)
    norm = (S2 - D * mean.square()).clamp_min(0).sqrt()
    u = unit.view(B, 1, 1)
    # score = (raw(X) - D m m') * inv_u * inv_v with inv = unit / (true norm + eps) = 1 / (norm + eps / unit)
    inv = 1.0 / (norm + eps / u) if normalize else u.expand_as(norm)
    interior = torch.zeros_like(norm, dtype=torch.bool)
    interior[:, r:r + H, r:r + W] = True
    mean, inv = mean * interior, inv * interior
    rows = X.permute(0, 2, 3, 1).reshape(B, -1, C).to(dtype).contiguous()
    sd = dtype if scalar_dtype is None else scalar_dtype
    return Windows(rows, _centres(mean, H, W, r).to(sd).contiguous(), _centres(inv, H, W, r).to(sd).contiguous(),
                   W + 2 * r, (X, u, norm, mean, inv))


def sum_tap_planes(planes: torch.Tensor | None, like: torch.Tensor, width: int, patch_size: int) -> torch.Tensor | None:
    """A fused backward's per-tap gradient planes (k*k, B, N, C) on the centre range -> the float32
    gradient (B, L, C) w.r.t. the padded grid of rows `like` (row width `width`): plane t holds what
    centre i gives row lo + i + offset(t), its tap t. None stays None (gradient not requested)."""
    if planes is None:
        return None
    r = patch_size // 2
    lo, n = r * width + r, planes.shape[2]
    rows = torch.zeros(like.shape, device=like.device, dtype=torch.float32)
    for t in range(patch_size * patch_size):
        off = lo + (t // patch_size - r) * width + (t % patch_size - r)
        rows[:, off:off + n] += planes[t]
    return rows


def window_features_backward(w: Windows, d_rows: torch.Tensor, sums: torch.Tensor, x_shape, center,
                             normalize: bool, patch_size: int) -> torch.Tensor:
    """Gradient w.r.t. x given the kernel's `d_rows` (B, Hp*Wp, C; through the window products)
    and per-centre `sums` (2, B, N): [sum_v H_uv m_v, sum_v dS_uv logit_uv] (see csrc)."""
    B, C, H, W = x_shape
    r, D = patch_size // 2, C * patch_size * patch_size
    X, unit, norm, mean, inv = w.scalars
    Hp, Wp = H + 2 * r, W + 2 * r
    full = _padded(sums.double(), H, W, r)  # (2, B, Hp, Wp), 0 off the centres
    d_mean = -D * full[0] if center == "channel" else torch.zeros_like(full[0])
    # inv = 1 / (norm + eps'): d inv / d norm = -inv^2, and dL/d inv = sums[1] / inv.
    d_norm = -inv * full[1] if normalize else torch.zeros_like(full[1])
    safe = torch.where(norm > 0, norm, 1.0)
    # d norm_u / dX(w) = (X(w) - m_u) / norm_u, d m_u / dX(w) = 1 / D, for w in u's window.
    per_channel = _box(torch.where(norm > 0, d_norm / safe, 0.0), patch_size)
    constant = _box(d_mean / D - torch.where(norm > 0, d_norm * mean / safe, 0.0), patch_size)
    dX = d_rows.view(B, Hp, Wp, C).permute(0, 3, 1, 2).double() + constant[:, None] + per_channel[:, None] * X
    return (dX[:, :, r:r + H, r:r + W] / unit.view(B, 1, 1, 1))

