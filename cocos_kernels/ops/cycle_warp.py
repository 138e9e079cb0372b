"""`cycle_warp`: the warp and CoCosNet's cycle (warp back with the softmax over the other axis).

warped[u] = sum_v softmax_v(M(u, v) / T) value[v],  warped_back[v] = sum_u softmax_u(M(u, v) / T) warped[u]

The second pass is the same kernel with the prepared maps swapped (warp_core.py): one op prepares
each map once for both passes, in forward and in backward (with k x k patches on a backend with
window kernels, their window form: no unfold), where two `correspondence_warp` calls would run each
map's prologue twice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..constants import DEFAULT_EPS
from ..dispatch import choose
from ..features import compute_dtype
from ..validation import check_backend, check_finite_values, check_warp_maps
from .warp_core import WarpCore, add_grads
from .warp_options import WarpOptions


@torch.library.custom_op("cocos_kernels::cycle_warp", mutates_args=())
def _cycle_warp(
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
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    core = WarpCore(backend, WarpOptions(temperature, center, normalize, patch_size, eps, precision))
    pq, pk = core.prepare(query), core.prepare(key)
    out, lse = core.forward(pq, pk, value, key_mask, 1.0 / temperature)
    back, lse_back = core.forward(pk, pq, out, None, 1.0 / temperature)  # its keys, the query grid, are all kept
    return out.to(value.dtype), back.to(value.dtype), lse, lse_back


@_cycle_warp.register_fake
def _(query, key, value, key_mask, temperature, center, normalize, patch_size, eps, backend, precision):
    B, Cv = value.shape[:2]
    ct = compute_dtype(query.dtype)
    return (value.new_empty((B, Cv, *query.shape[2:])), value.new_empty(value.shape),
            query.new_empty((B, query.shape[2] * query.shape[3]), dtype=ct),
            query.new_empty((B, key.shape[2] * key.shape[3]), dtype=ct))


@torch.library.custom_op("cocos_kernels::cycle_warp_backward", mutates_args=())
def _cycle_warp_backward(
    grad_out: Tensor,
    grad_back: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_mask: Optional[Tensor],
    out: Tensor,
    back: Tensor,
    lse: Tensor,
    lse_back: Tensor,
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
    scale = 1.0 / temperature
    # Second pass first: its value (the first warp's output) takes a gradient into the first pass.
    gk_back, gq_back, d_out = core.backward(grad_back, pk, pq, out, back, lse_back, None, scale, need_key, need_query,
                                            True)
    gq, gk, dv = core.backward(grad_out.to(d_out.dtype) + d_out, pq, pk, value, out, lse, key_mask, scale,
                               need_query, need_key, need_value)
    pq, pk = pq.released(), pk.released()  # the prologue's backward below is the op's memory peak
    return (core.prepared_backward(add_grads(gq, gq_back), pq) if need_query else query.new_empty(0),
            core.prepared_backward(add_grads(gk, gk_back), pk) if need_key else key.new_empty(0),
            dv.to(value.dtype) if need_value else value.new_empty(0))


@_cycle_warp_backward.register_fake
def _(grad_out, grad_back, query, key, value, key_mask, out, back, lse, lse_back, temperature, center, normalize,
      patch_size, eps, backend, precision, need_query, need_key, need_value):
    def like(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty(0)

    return like(query, need_query), like(key, need_key), like(value, need_value)


def _setup_context(ctx, inputs, output):
    query, key, value, key_mask, *params = inputs
    out, back, lse, lse_back = output
    ctx.save_for_backward(query, key, value, key_mask, out, back, lse, lse_back)
    ctx.params = params
    ctx.mark_non_differentiable(lse, lse_back)


def _backward(ctx, grad_out, grad_back, _grad_lse, _grad_lse_back):
    query, key, value, key_mask, out, back, lse, lse_back = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_back = torch.zeros_like(back) if grad_back is None else grad_back.contiguous()
    grads = torch.ops.cocos_kernels.cycle_warp_backward(
        grad_out, grad_back, query, key, value, key_mask, out, back, lse, lse_back, *ctx.params, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, *([None] * len(ctx.params)))


_cycle_warp.register_autograd(_backward, setup_context=_setup_context)


def cycle_warp(
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
    check_finite: bool = False,
    backend: str = "auto",
    precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(warped, warped_back): `correspondence_warp(query, key, value)` and that result warped back
    to the key grid through the same similarities, softmaxed over the query axis, as CoCosNet's
    correspondence (cycle) regularisation does (it penalises |warped_back - value|).

    Arguments as `correspondence_warp` (no top_k). key_mask applies to the first pass, whose keys
    are the exemplar's positions; the back pass's keys are the query grid, all kept, so every
    exemplar position, masked or not, gets warped_back from the softmax over the query positions
    (the same as `correspondence_warp(key, query, warped)`). Returns (B, Cv, Hq, Wq) and
    (B, Cv, Hk, Wk), both differentiable w.r.t. query, key and value; each map's features are
    prepared once.
    """
    options = WarpOptions(temperature, center, normalize, patch_size, eps, precision)
    check_warp_maps(query, key, value, key_mask)
    check_backend(backend)
    check_finite_values({"query": query, "key": key, "value": value}, check_finite)
    features = () if key_mask is None else ("key_mask",)
    chosen = choose("correspondence_warp", backend, query.device, query.dtype, features)
    if not chosen.fused:
        args = (options.temperature, *options.prologue)
        out = reference.correspondence_warp(query, key, value, *args, key_mask)
        return out, reference.correspondence_warp(key, query, out, *args)
    out, back, _, _ = torch.ops.cocos_kernels.cycle_warp(query, key, value, key_mask, *options.op_args(chosen.name))
    return out, back
