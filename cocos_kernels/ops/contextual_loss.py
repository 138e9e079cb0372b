"""`contextual_loss`: CoCosNet's contextual loss (Mechrez et al. 2018) as one torch.library op.

The public function validates the input and picks a backend; fused backends run behind the
custom op `cocos_kernels::contextual_loss` (forward: per-sample losses and per-row statistics)
with its backward op `cocos_kernels::contextual_loss_backward`. The prologue (centring both maps
with the exemplar's statistics, L2 normalisation) runs in PyTorch inside the ops and is
recomputed in backward with its explicit O(N*C) backward: the op saves its inputs and four
per-row vectors, never an N x N matrix.

Tie-breaking: where several j reach a row's minimum distance exactly, the lowest j is the
argmin, and only it carries the minimum's gradient (as torch.min's first index does in the
materialised reference).
"""
from __future__ import annotations


import torch
from torch import Tensor

from .. import reference
from ..dispatch import BACKENDS, choose
from ..constants import DEFAULT_EPS
from ..features import compute_dtype, contextual_features, contextual_features_backward
from ..validation import (
    check_backend,
    check_choice,
    check_eps,
    check_feature_map,
    check_finite_values,
    check_positive,
    check_same_dtype_and_device,
)

OP = "contextual_loss"
CENTER_MODES = ("channel", "spatial")
REDUCTIONS = ("none", "mean", "sum")
DIST_EPS = reference.CONTEXTUAL_LOSS_DIST_EPS


def _rows(x: Tensor, y: Tensor, center: str, eps: float) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) x 2 -> prepared rows (B, N, C) x 2, contiguous, in the compute dtype."""
    ct = compute_dtype(x.dtype)
    xh, yh = contextual_features(x.to(ct), y.to(ct), center, eps)
    return xh.transpose(1, 2).contiguous(), yh.transpose(1, 2).contiguous()


@torch.library.custom_op("cocos_kernels::contextual_loss", mutates_args=())
def _contextual_loss(
    x: Tensor, y: Tensor, bandwidth: float, center: str, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = BACKENDS[backend].kernels()
    xr, yr = _rows(x, y, center, eps)
    m, argmin, s, t = kernels.contextual_loss_forward(xr, yr, bandwidth, DIST_EPS)
    # CX = mean_i max_j A_ij = mean_i 1 / s_i
    loss = -torch.log(s.reciprocal().mean(dim=1))
    return loss.to(x.dtype), m, argmin, s, t


@_contextual_loss.register_fake
def _(x, y, bandwidth, center, eps, backend):
    B, N = x.shape[0], x.shape[2] * x.shape[3]
    row = x.new_empty((B, N), dtype=compute_dtype(x.dtype))
    return x.new_empty((B,)), row, x.new_empty((B, N), dtype=torch.int64), torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("cocos_kernels::contextual_loss_backward", mutates_args=())
def _contextual_loss_backward(
    grad_loss: Tensor,
    x: Tensor,
    y: Tensor,
    m: Tensor,
    argmin: Tensor,
    s: Tensor,
    t: Tensor,
    bandwidth: float,
    center: str,
    eps: float,
    backend: str,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor]:
    kernels = BACKENDS[backend].kernels()
    xr, yr = _rows(x, y, center, eps)
    # loss_b = -log(mean_i 1/s_i)  =>  d loss_b / d s_i = 1 / (s_i^2 sum_k 1/s_k)
    r = s.reciprocal()
    grad_s = (grad_loss.to(s.dtype)[:, None] * r.square() / r.sum(dim=1, keepdim=True)).contiguous()
    # y's statistics centre x too, so y's gradient needs x's row gradient as well.
    dxr, dyr = kernels.contextual_loss_backward(
        grad_s, xr, yr, m, argmin, s, t, bandwidth, DIST_EPS, need_x or need_y, need_y
    )
    del xr, yr  # the prologue's backward below is the op's memory peak
    gx, gy = contextual_features_backward(
        dxr.transpose(1, 2), None if dyr is None else dyr.transpose(1, 2),
        x.to(s.dtype), y.to(s.dtype), center, eps,
    )
    return (gx.to(x.dtype) if need_x else x.new_empty(0), gy.to(y.dtype) if need_y else y.new_empty(0))


@_contextual_loss_backward.register_fake
def _(grad_loss, x, y, m, argmin, s, t, bandwidth, center, eps, backend, need_x, need_y):
    def like(v, needed):
        return torch.empty_like(v, memory_format=torch.contiguous_format) if needed else v.new_empty(0)

    return like(x, need_x), like(y, need_y)


def _setup_context(ctx, inputs, output):
    x, y, *params = inputs
    _, m, argmin, s, t = output
    ctx.save_for_backward(x, y, m, argmin, s, t)
    ctx.params = params
    ctx.mark_non_differentiable(m, argmin, s, t)


def _backward(ctx, grad_loss, *_grad_stats):
    need_x, need_y = ctx.needs_input_grad[:2]
    gx, gy = torch.ops.cocos_kernels.contextual_loss_backward(
        grad_loss.contiguous(), *ctx.saved_tensors, *ctx.params, need_x, need_y
    )
    return (gx if need_x else None, gy if need_y else None, *([None] * len(ctx.params)))


_contextual_loss.register_autograd(_backward, setup_context=_setup_context)


def _check_arguments(x, y, bandwidth, center, eps, backend) -> None:
    check_feature_map("x", x)
    check_feature_map("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (B, C, H, W), got x {tuple(x.shape)}, y {tuple(y.shape)}")
    check_same_dtype_and_device({"x": x, "y": y})
    check_positive("bandwidth", bandwidth)
    check_choice("center", center, CENTER_MODES)
    check_eps(eps)
    check_backend(backend)


def contextual_loss(
    x: Tensor,
    y: Tensor,
    bandwidth: float = 0.1,
    *,
    center: str = "channel",
    eps: float = DEFAULT_EPS,
    check_finite: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Per-sample contextual loss between feature maps x (generated) and y (exemplar).

    As CoCosNet's ContextualLoss_forward: both maps are centred with y's statistics and
    L2-normalised per position; with d_ij = 1 - <x_i, y_j>,
    loss = -log(mean_i max_j A_ij), A_ij = softmax_j((1 - d_ij / (min_k d_ik + 1e-3)) / bandwidth),
    computed on the fused backends without materialising the N x N matrix (N = H*W). Where
    several j reach a row's minimum exactly, the lowest j carries the minimum's gradient.

    Args:
        x: (B, C, H, W) features of the generated image.
        y: (B, C, H, W) features of the exemplar, same shape as x.
        bandwidth: h > 0; CoCosNet uses 0.1.
        center: "channel" (subtract y's channel mean at each position, CoCosNet's --PONO) or
            "spatial" (subtract y's per-channel mean over positions).
        eps: added to the L2 norm, as the reference code does.
        check_finite: raise ValueError if x or y hold NaN/Inf (by default they propagate as in
            the reference).
        backend: "auto", or one of the registered backends implementing this op ("reference", "cpu", ...).

    Returns:
        (B,) losses in x's dtype; differentiable w.r.t. x and y.
    """
    _check_arguments(x, y, bandwidth, center, eps, backend)
    check_finite_values({"x": x, "y": y}, check_finite)
    chosen = choose(OP, backend, x.device, x.dtype)
    if not chosen.fused:
        return reference.contextual_loss(x, y, bandwidth, center, eps)
    loss, *_ = torch.ops.cocos_kernels.contextual_loss(x, y, float(bandwidth), center, float(eps), chosen.name)
    return loss


class ContextualLoss(torch.nn.Module):
    """`contextual_loss` as a module: `ContextualLoss(bandwidth=0.1)(x, y)`.

    reduction: "mean" (over the batch, as CoCosNet uses it), "sum" or "none" (per-sample (B,)).
    """

    def __init__(
        self,
        bandwidth: float = 0.1,
        *,
        center: str = "channel",
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        reduction: str = "mean",
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.bandwidth, self.center, self.eps, self.backend, self.reduction = bandwidth, center, eps, backend, reduction

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        loss = contextual_loss(x, y, self.bandwidth, center=self.center, eps=self.eps, backend=self.backend)
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss

    def extra_repr(self) -> str:
        return (f"bandwidth={self.bandwidth}, center={self.center!r}, backend={self.backend!r}, "
                f"reduction={self.reduction!r}")
