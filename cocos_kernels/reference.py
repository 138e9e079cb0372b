"""The materialised computations, exactly as the CoCosNet reference code does them.

They hold the full (Nq x Nk) matrix: the judge of every backend (evaluated in float64 by the
tests), the baseline of every benchmark, and a user's escape hatch (plain autograd, any device).
"""
from __future__ import annotations

import torch

from .features import DEFAULT_EPS, normalize_features


def correspondence_warp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    temperature: float = 0.01,
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """softmax(theta^T phi / temperature) @ value, materialised. Shapes as `cocos_kernels.correspondence_warp`."""
    B, _, Hq, Wq = query.shape
    theta = normalize_features(query, center, normalize, patch_size, eps)  # (B, D, Nq)
    phi = normalize_features(key, center, normalize, patch_size, eps)  # (B, D, Nk)
    f = torch.matmul(theta.transpose(1, 2), phi) / temperature  # (B, Nq, Nk)
    v = value.reshape(B, value.shape[1], -1).transpose(1, 2)  # (B, Nk, Cv)
    out = torch.matmul(torch.softmax(f, dim=-1), v)  # (B, Nq, Cv)
    return out.transpose(1, 2).reshape(B, value.shape[1], Hq, Wq)
