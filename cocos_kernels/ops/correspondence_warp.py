"""`correspondence_warp`: softmax(<x_hat(u), y_hat(v)> / temperature) warp, as one torch.library op.

The public function validates the input and picks a backend; fused backends run behind the
custom op `cocos_kernels::correspondence_warp` (forward: out and the row logsumexp) with its
backward op `cocos_kernels::correspondence_warp_backward`, so torch.compile / torch.export see
two opaque ops. The prologue (unfold, centring, normalisation) runs inside the ops and is
recomputed in backward: the op saves its inputs, output and logsumexp, never an Nq x Nk matrix.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..constants import DEFAULT_EPS
from ..dispatch import choose
from ..features import compute_dtype
from ..validation import check_backend, check_finite_values, check_top_k, check_warp_maps
from .correspondence_topk import topk_warp
from .warp_core import WarpCore
from .warp_options import WarpOptions


@torch.library.custom_op("cocos_kernels::correspondence_warp", mutates_args=())
def _correspondence_warp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Optional[Tensor],
    temperature: float,
    center: Optional[str],
    normalize: bool,
    patch_size: int,
    eps: float,
    backend: str,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor]:
    core = WarpCore(backend, WarpOptions(temperature, center, normalize, patch_size, eps, precision))
    out, lse = core.forward(core.prepare(query), core.prepare(key), value, key_mask, 1.0 / temperature)
    return out.to(value.dtype), lse


@_correspondence_warp.register_fake
def _(query, key, value, key_mask, temperature, center, normalize, patch_size, eps, backend, precision="ieee"):
    B, _, Hq, Wq = query.shape
    out = value.new_empty((B, value.shape[1], Hq, Wq))
    return out, query.new_empty((B, Hq * Wq), dtype=compute_dtype(query.dtype))


@torch.library.custom_op("cocos_kernels::correspondence_warp_backward", mutates_args=())
def _correspondence_warp_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    temperature: float,
    center: Optional[str],
    normalize: bool,
    patch_size: int,
    eps: float,
    backend: str,
    precision: str,
    need_query: bool,
    need_key: bool,
    need_value: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    core = WarpCore(backend, WarpOptions(temperature, center, normalize, patch_size, eps, precision))
    pq, pk = core.prepare(query), core.prepare(key)
    gq, gk, dv = core.backward(grad_out, pq, pk, value, out, lse, key_mask, 1.0 / temperature, need_query, need_key,
                               need_value)
    pq, pk = pq.released(), pk.released()  # the prologue's backward below is the op's memory peak
    return (core.prepared_backward(gq, pq) if need_query else query.new_empty(0),
            core.prepared_backward(gk, pk) if need_key else key.new_empty(0),
            dv.to(value.dtype) if need_value else value.new_empty(0))


@_correspondence_warp_backward.register_fake
def _(grad_out, query, key, value, key_mask, out, lse, temperature, center, normalize, patch_size, eps,
      backend, precision, need_query, need_key, need_value):
    def like(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty(0)

    return like(query, need_query), like(key, need_key), like(value, need_value)


def _setup_context(ctx, inputs, output):
    query, key, value, key_mask, *params = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, key_mask, out, lse)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, key_mask, out, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = torch.ops.cocos_kernels.correspondence_warp_backward(
        grad_out.contiguous(), query, key, value, key_mask, out, lse, *ctx.params, *needs
    )
    return (*(g if need else None for g, need in zip(grads, needs)), None, *([None] * len(ctx.params)))


_correspondence_warp.register_autograd(_backward, setup_context=_setup_context)


def correspondence_warp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    temperature: float = 0.01,
    *,
    center: str | None = "channel",
    normalize: bool = True,
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    key_mask: Tensor | None = None,
    top_k: int | None = None,
    check_finite: bool = False,
    backend: str = "auto",
    precision: str | None = None,
) -> Tensor:
    """Warp `value` from the key grid to the query grid through the softmax of feature similarities.

    out[b, :, u] = sum_v softmax_v(<q_hat(u), k_hat(v)> / temperature) value[b, :, v], where
    q_hat/k_hat are the (patch-unfolded, centred, L2-normalised) query/key features, computed
    without materialising the (Hq*Wq) x (Hk*Wk) matrix on the fused backends.

    Args:
        query: (B, C, Hq, Wq) features of the image being translated.
        key: (B, C, Hk, Wk) features of the exemplar.
        value: (B, Cv, Hk, Wk) what is warped (the exemplar image, one-hot labels, ...).
        temperature: softmax temperature (> 0); CoCosNet uses 0.01.
        center: "channel" (subtract each position's channel mean, CoCosNet's PONO_C),
            "spatial" (subtract each channel's mean over positions) or None.
        normalize: L2-normalise each position's feature (False with center=None and
            temperature=1 gives plain softmax(Q^T K) V attention).
        patch_size: odd k; each position's feature is its zero-padded k x k neighbourhood.
        eps: added to the L2 norm, as the reference code does.
        key_mask: None, or (B, Hk, Wk) bool, False at exemplar positions that must not be
            matched (padding, occlusions): they get softmax weight 0. A query whose keys are all
            masked warps to zeros, with zero gradients (never NaN).
        top_k: None, or k in [1, Hk*Wk]: each query softmaxes over its k most similar keys only
            (sparse correspondence); blockwise PyTorch on every fused backend (materialised on
            the reference), see `correspondence_topk`.
        check_finite: raise ValueError if query, key or value hold NaN/Inf (costs one pass over
            each). By default they are not checked and propagate as in the reference: a bad query
            entry spoils its position's output (its neighbourhood's with patches), a bad key or
            value entry its whole sample.
        backend: "auto", or one of the registered backends ("reference", "cpu", "triton", ...).
        precision: how float32 tile products use tensor cores where a backend has them (triton):
            "ieee" (full float32), "tf32x3" (split tf32, near float32) or "tf32"; None follows
            torch.get_float32_matmul_precision() (highest -> "ieee", high -> "tf32x3",
            medium -> "tf32"). The cpu and reference backends and half inputs ignore it.

    Returns:
        (B, Cv, Hq, Wq) tensor in value's dtype; differentiable w.r.t. query, key and value.
    """
    options = WarpOptions(temperature, center, normalize, patch_size, eps, precision)
    return warp(query, key, value, options, key_mask=key_mask, top_k=top_k, check_finite=check_finite, backend=backend)


def warp(query: Tensor, key: Tensor, value: Tensor, options: WarpOptions, *, key_mask: Tensor | None = None,
         top_k: int | None = None, check_finite: bool = False, backend: str = "auto") -> Tensor:
    """`correspondence_warp` with its matching options in one `WarpOptions` (checked already)."""
    check_warp_maps(query, key, value, key_mask)
    check_backend(backend)
    if top_k is not None:
        check_top_k("top_k", top_k, key)
    check_finite_values({"query": query, "key": key, "value": value}, check_finite)
    features = () if key_mask is None else ("key_mask",)
    chosen = choose("correspondence_warp", backend, query.device, query.dtype, features)
    if not chosen.fused:
        return reference.correspondence_warp(query, key, value, options.temperature, *options.prologue, key_mask, top_k)
    if top_k is not None:
        return topk_warp(query, key, value, top_k, options, key_mask)
    out, _ = torch.ops.cocos_kernels.correspondence_warp(query, key, value, key_mask, *options.op_args(chosen.name))
    return out


def _option(name: str) -> property:
    def get(self):
        return getattr(self.options, name)

    def replace(self, value):
        self.options = dataclasses.replace(self.options, **{name: value})

    return property(get, replace, doc=f"`{name}` of `correspondence_warp` (stored in `options`)")


class CorrespondenceWarp(torch.nn.Module):
    """`correspondence_warp` as a module: `CorrespondenceWarp(temperature=0.01)(query, key, value)`.

    Arguments as `correspondence_warp`; the matching options are checked here, once, and kept in
    `options` (a `WarpOptions`; the attributes of their names read and replace it)."""

    def __init__(
        self,
        temperature: float = 0.01,
        *,
        center: str | None = "channel",
        normalize: bool = True,
        patch_size: int = 1,
        eps: float = DEFAULT_EPS,
        top_k: int | None = None,
        check_finite: bool = False,
        backend: str = "auto",
        precision: str | None = None,
    ):
        super().__init__()
        self.options = WarpOptions(temperature, center, normalize, patch_size, eps, precision)
        self.top_k, self.check_finite, self.backend = top_k, check_finite, backend

    temperature = _option("temperature")
    center = _option("center")
    normalize = _option("normalize")
    patch_size = _option("patch_size")
    eps = _option("eps")
    precision = _option("precision")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return warp(query, key, value, self.options, key_mask=key_mask, top_k=self.top_k,
                    check_finite=self.check_finite, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, center={self.center!r}, normalize={self.normalize}, "
                f"patch_size={self.patch_size}, top_k={self.top_k}, backend={self.backend!r}, precision={self.precision!r}")
