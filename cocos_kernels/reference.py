"""The materialised computations, exactly as the CoCosNet reference code does them.

They hold the full (Nq x Nk) matrix: the judge of every backend (evaluated in float64 by the
tests), the baseline of every benchmark, and a user's escape hatch (plain autograd, any device).
One deliberate difference: L2 norms are taken overflow-safe (features.py `_norm`), bit-identical
to the reference code's wherever its float32 sum of squares neither overflows nor underflows.
"""
from __future__ import annotations

import torch

from .features import DEFAULT_EPS, contextual_features, normalize_features


def correspondence_warp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    temperature: float = 0.01,
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    key_mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """softmax(theta^T phi / temperature) @ value, materialised. Shapes as `cocos_kernels.correspondence_warp`."""
    B, _, Hq, Wq = query.shape
    theta = normalize_features(query, center, normalize, patch_size, eps)  # (B, D, Nq)
    phi = normalize_features(key, center, normalize, patch_size, eps)  # (B, D, Nk)
    f = torch.matmul(theta.transpose(1, 2), phi) / temperature  # (B, Nq, Nk)
    v = value.reshape(B, value.shape[1], -1).transpose(1, 2)  # (B, Nk, Cv)
    if key_mask is not None:
        f = f.masked_fill(~key_mask.reshape(B, 1, -1), float("-inf"))
    if top_k is not None:  # only each row's top_k scores take part
        f = f.masked_fill(f < f.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    if key_mask is None:
        a = torch.softmax(f, dim=-1)
    else:
        # A sample with every key masked would softmax a row of -inf (NaN): its rows are 0.
        any_kept = key_mask.reshape(B, 1, -1).any(dim=-1, keepdim=True)
        a = torch.softmax(f.masked_fill(~any_kept, 0.0), dim=-1) * any_kept
    out = torch.matmul(a, v)  # (B, Nq, Cv)
    return out.transpose(1, 2).reshape(B, value.shape[1], Hq, Wq)


# Added to the row's minimum distance before dividing by it (CoCosNet's ContextualLoss_forward).
CONTEXTUAL_LOSS_DIST_EPS = 1e-3


def contextual_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth: float = 0.1,
    center: str = "channel",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Per-sample contextual loss (B,), materialised. Shapes as `cocos_kernels.contextual_loss`."""
    xh, yh = contextual_features(x, y, center, eps)  # (B, C, N) each, centred with y's statistics
    d = 1 - torch.matmul(xh.transpose(1, 2), yh)  # (B, N, N) cosine distances
    d_norm = d / (torch.min(d, dim=-1, keepdim=True)[0] + CONTEXTUAL_LOSS_DIST_EPS)
    w = torch.exp((1 - d_norm) / bandwidth)
    a = w / torch.sum(w, dim=-1, keepdim=True)
    cx = torch.mean(torch.max(a, dim=-1)[0], dim=1)
    return -torch.log(cx)
