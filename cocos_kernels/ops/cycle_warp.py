"""`cycle_warp`: the warp and CoCosNet's cycle (warp back with the softmax over the other axis).

warped[u] = sum_v softmax_v(M(u, v) / T) value[v],  warped_back[v] = sum_u softmax_u(M(u, v) / T) warped[u]

The second pass is the same fused kernel with query and key swapped; one op prepares each map's
features once for both passes (forward and backward), where two `correspondence_warp` calls would
run the prologue (with 3x3 patches, a 9C-wide unfold) twice per map.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..features import compute_dtype
from ..dispatch import BACKENDS, choose
from ..constants import DEFAULT_EPS
from ..validation import check_finite_values
from .correspondence_warp import (
    _check_arguments,
    _default_precision,
    _features,
    _features_backward,
    _flat,
    _input_dtype,
    _precision_kwargs,
)


@torch.library.custom_op("cocos_kernels::cycle_warp", mutates_args=())
def _cycle_warp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    temperature: float,
    center: Optional[str],
    normalize: bool,
    patch_size: int,
    eps: float,
    backend: str,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = BACKENDS[backend].kernels()
    it = _input_dtype(kernels, query.dtype)
    qf = _features(kernels, query, center, normalize, patch_size, eps, it)
    kf = _features(kernels, key, center, normalize, patch_size, eps, it)
    extra = _precision_kwargs(backend, precision)
    out, lse = kernels.correspondence_warp_forward(qf, kf, _flat(value, it), 1.0 / temperature, **extra)
    back, lse_back = kernels.correspondence_warp_forward(kf, qf, out.to(it).contiguous(), 1.0 / temperature, **extra)
    B, Cv = value.shape[:2]
    return (out.view(B, Cv, *query.shape[2:]).to(value.dtype), back.view(value.shape).to(value.dtype),
            lse, lse_back)


@_cycle_warp.register_fake
def _(query, key, value, temperature, center, normalize, patch_size, eps, backend, precision):
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
    kernels = BACKENDS[backend].kernels()
    it = _input_dtype(kernels, query.dtype)
    prologue = (center, normalize, patch_size, eps)
    qf = _features(kernels, query, *prologue, it)
    kf = _features(kernels, key, *prologue, it)
    extra = _precision_kwargs(backend, precision)
    scale = 1.0 / temperature
    out_rows = _flat(out, it)
    # Second pass first: its value (the first warp's output) takes a gradient into the first pass.
    dkf, dqf, dout = kernels.correspondence_warp_backward(
        _flat(grad_back, it), kf, qf, out_rows, _flat(back, it), lse_back, scale,
        need_key, need_query, True, **extra)
    g_out = (_flat(grad_out, dout.dtype) + dout).to(it).contiguous()
    dqf1, dkf1, dv = kernels.correspondence_warp_backward(
        g_out, qf, kf, _flat(value, it), out_rows, lse, scale,
        need_query, need_key, need_value, **extra)
    del qf, kf, out_rows

    def grad_input(a, b, x):  # the two passes' gradients w.r.t. x's prepared rows -> w.r.t. x
        if a is None:
            return x.new_empty(0)
        return _features_backward(kernels, a + b, x, *prologue).to(x.dtype)

    dv = value.new_empty(0) if dv is None else dv.view(value.shape).to(value.dtype)
    return grad_input(dqf, dqf1, query), grad_input(dkf, dkf1, key), dv


@_cycle_warp_backward.register_fake
def _(grad_out, grad_back, query, key, value, out, back, lse, lse_back, temperature, center, normalize,
      patch_size, eps, backend, precision, need_query, need_key, need_value):
    def like(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty(0)

    return like(query, need_query), like(key, need_key), like(value, need_value)


def _setup_context(ctx, inputs, output):
    query, key, value, *params = inputs
    out, back, lse, lse_back = output
    ctx.save_for_backward(query, key, value, out, back, lse, lse_back)
    ctx.params = params
    ctx.mark_non_differentiable(lse, lse_back)


def _backward(ctx, grad_out, grad_back, _grad_lse, _grad_lse_back):
    query, key, value, out, back, lse, lse_back = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_back = torch.zeros_like(back) if grad_back is None else grad_back.contiguous()
    grads = torch.ops.cocos_kernels.cycle_warp_backward(
        grad_out, grad_back, query, key, value, out, back, lse, lse_back, *ctx.params, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), *([None] * len(ctx.params)))


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
    check_finite: bool = False,
    backend: str = "auto",
    precision: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(warped, warped_back): `correspondence_warp(query, key, value)` and that result warped back
    to the key grid through the same similarities, softmaxed over the query axis, as CoCosNet's
    correspondence (cycle) regularisation does (it penalises |warped_back - value|).

    Arguments as `correspondence_warp` (no key_mask or top_k). Returns (B, Cv, Hq, Wq) and (B, Cv, Hk, Wk),
    both differentiable w.r.t. query, key and value; each map's features are prepared once.
    """
    _check_arguments(query, key, value, None, temperature, center, normalize, patch_size, eps, backend, precision)
    check_finite_values({"query": query, "key": key, "value": value}, check_finite)
    chosen = choose("correspondence_warp", backend, query.device, query.dtype)
    if not chosen.fused:
        args = (temperature, center, normalize, patch_size, eps)
        out = reference.correspondence_warp(query, key, value, *args)
        return out, reference.correspondence_warp(key, query, out, *args)
    out, back, _, _ = torch.ops.cocos_kernels.cycle_warp(
        query, key, value, float(temperature), center, normalize, int(patch_size), float(eps), chosen.name,
        _default_precision() if precision is None else precision,
    )
    return out, back
