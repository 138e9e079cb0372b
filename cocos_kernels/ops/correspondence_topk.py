"""Best matches without the (Nq x Nk) matrix: `correspondence_topk`, `correspondence_argmax`, and
the top-k restricted warp behind `correspondence_warp(..., top_k=k)`.

Scores are computed for a block of query rows against all keys at a time (at most `_BLOCK_SCORES`
of them, 64 MiB in float32), reduced to each row's k best, and dropped: memory O(N * D + N * k)
whatever the grid. The top-k warp gathers each query's k keys and values and softmaxes over
them, one query block at a time under activation checkpointing, so its backward too holds one
block's (rows x k x D) gather at a time. These are plain PyTorch on every device: no backend has
a top-k kernel. backend="reference" is the materialised computation instead (one block holding
each sample's whole score matrix, for `correspondence_topk`; `reference.correspondence_warp` for
the warp).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..constants import DEFAULT_EPS
from ..features import compute_dtype, normalize_features
from ..validation import (
    check_backend,
    check_feature_map,
    check_finite_values,
    check_key_mask,
    check_same_dtype_and_device,
    check_top_k,
)
from .warp_options import WarpOptions

_BLOCK_SCORES = 1 << 24  # score entries per query block


def _rows(x: Tensor, options: WarpOptions) -> Tensor:
    """(B, C, H, W) -> prepared rows (B, N, D) in float32 (float64 stays float64)."""
    return normalize_features(x.to(compute_dtype(x.dtype)), *options.prologue).transpose(1, 2)


def _block_rows(nk: int, width: int = 1) -> int:
    return max(1, _BLOCK_SCORES // max(1, nk * width))


def _topk_rows(qf: Tensor, kf: Tensor, k: int, key_mask: Tensor | None,
               materialised: bool = False) -> tuple[Tensor, Tensor]:
    """Each query row's k largest <q, k_j> over unmasked keys j: (values, indices), each (B, Nq, k).
    Where fewer than k keys are unmasked the remaining slots hold -inf (at an arbitrary index).
    Blockwise, or with `materialised` all query rows in one block."""
    B, Nq, _ = qf.shape
    values = qf.new_empty((B, Nq, k))
    indices = torch.empty((B, Nq, k), dtype=torch.long, device=qf.device)
    step = Nq if materialised else _block_rows(kf.shape[1])
    keep = None if key_mask is None else key_mask.reshape(B, 1, -1)
    for i0 in range(0, Nq, step):
        s = torch.bmm(qf[:, i0:i0 + step], kf.transpose(1, 2))
        if keep is not None:
            s.masked_fill_(~keep, float("-inf"))
        values[:, i0:i0 + step], indices[:, i0:i0 + step] = s.topk(k, dim=-1)
    return values, indices


def _check_pair(query, key, key_mask, backend) -> None:
    maps = {"query": query, "key": key}
    for name, x in maps.items():
        check_feature_map(name, x)
    check_same_dtype_and_device(maps)
    if query.shape[:2] != key.shape[:2]:
        raise ValueError(f"query and key must have the same batch size and channels: query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    check_key_mask(key_mask, key)
    check_backend(backend)


def correspondence_topk(
    query: Tensor,
    key: Tensor,
    k: int,
    *,
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    key_mask: Tensor | None = None,
    check_finite: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The k best exemplar matches of every query position.

    Features are prepared as `correspondence_warp` prepares them (center, normalize, patch_size,
    eps, key_mask and check_finite as there); the similarity is their cosine <q_hat(u), k_hat(v)>
    (before the temperature), largest first. backend: "reference" scores each sample's whole
    (Hq*Wq) x (Hk*Wk) matrix at once; "auto" and the other registered names all run the same
    blockwise PyTorch search (no backend has a top-k kernel), holding at most 64 MiB of scores.

    Returns:
        (indices, similarity), each (B, Hq, Wq, k): indices are flat positions v = y * Wk + x in
        the key grid (int64); similarity in float32 (float64 for float64 inputs), not
        differentiable. Masked keys are never returned while k unmasked ones remain; slots beyond
        them hold similarity -inf. Among equal similarities the order is unspecified.
    """
    options = WarpOptions(center=center, normalize=normalize, patch_size=patch_size, eps=eps)
    _check_pair(query, key, key_mask, backend)
    check_top_k("k", k, key)
    check_finite_values({"query": query, "key": key}, check_finite)
    B, _, Hq, Wq = query.shape
    with torch.no_grad():
        values, indices = _topk_rows(_rows(query, options), _rows(key, options), int(k), key_mask,
                                     materialised=backend == "reference")
    return indices.view(B, Hq, Wq, -1), values.view(B, Hq, Wq, -1)


def correspondence_argmax(
    query: Tensor,
    key: Tensor,
    *,
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    key_mask: Tensor | None = None,
    check_finite: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Each query position's best exemplar match: (indices (B, Hq, Wq) int64 flat key positions,
    similarity (B, Hq, Wq)). `correspondence_topk` with k = 1; arguments as there."""
    indices, values = correspondence_topk(query, key, 1, center=center, normalize=normalize, patch_size=patch_size,
                                          eps=eps, key_mask=key_mask, check_finite=check_finite, backend=backend)
    return indices[..., 0], values[..., 0]


def _topk_warp_block(q: Tensor, kf: Tensor, v: Tensor, idx: Tensor, sel_ok: Tensor | None, scale: float) -> Tensor:
    """One query block: softmax over its k gathered keys, weighted sum of the gathered values."""
    b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1)
    s = torch.einsum("bcd,bckd->bck", q, kf[b, idx]) * scale
    if sel_ok is not None:  # masked keys among the k: weight 0; a row with none left: zeros
        any_ok = sel_ok.any(dim=-1, keepdim=True)
        s = s.masked_fill(~sel_ok, float("-inf")).masked_fill(~any_ok, 0.0)
        a = torch.softmax(s, dim=-1) * any_ok
    else:
        a = torch.softmax(s, dim=-1)
    return torch.einsum("bck,bckv->bcv", a, v[b, idx])


def topk_warp(query, key, value, top_k, options: WarpOptions, key_mask) -> Tensor:
    """`correspondence_warp` restricted to each query's `top_k` most similar keys (see module doc)."""
    B, Cv = value.shape[:2]
    _, _, Hq, Wq = query.shape
    qf, kf = _rows(query, options), _rows(key, options)  # differentiable
    with torch.no_grad():
        values, idx = _topk_rows(qf.detach(), kf.detach(), int(top_k), key_mask)
    sel_ok = None if key_mask is None else torch.isfinite(values)
    v = value.reshape(B, Cv, -1).transpose(1, 2).to(qf.dtype)  # (B, Nk, Cv)
    step = _block_rows(int(top_k), qf.shape[2])
    blocks = []
    for i0 in range(0, qf.shape[1], step):
        args = (qf[:, i0:i0 + step], kf, v, idx[:, i0:i0 + step],
                None if sel_ok is None else sel_ok[:, i0:i0 + step], 1.0 / options.temperature)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qf, kf, v))
        blocks.append(checkpoint(_topk_warp_block, *args, use_reentrant=False) if grad else _topk_warp_block(*args))
    out = torch.cat(blocks, dim=1)
    return out.transpose(1, 2).reshape(B, Cv, Hq, Wq).to(value.dtype)
