"""CoCosNet's losses as the reference computes them (models/pix2pix_model.py, models/networks/loss.py).

Weights are applied by the caller (`Pix2PixModel.compute_generator_loss`); these return the
unweighted terms. The contextual loss runs through `cocos_kernels.contextual_loss` (two streaming
passes, no N x N matrix on a fused backend; backend "reference" is the materialised formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import cocos_kernels as ck

FM_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)  # r12 ... r52
CX_BANDWIDTH = 0.1
GAN_MODES = ("hinge", "ls", "original", "w")


class GANLoss:
    """The reference's GANLoss: per scale the loss of the last output, averaged over scales."""

    def __init__(self, gan_mode: str = "hinge"):
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {gan_mode!r}")
        self.gan_mode = gan_mode

    def loss(self, x: torch.Tensor, target_is_real: bool, for_discriminator: bool) -> torch.Tensor:
        if self.gan_mode == "original":
            return F.binary_cross_entropy_with_logits(x, torch.full_like(x, float(target_is_real)))
        if self.gan_mode == "ls":
            return F.mse_loss(x, torch.full_like(x, float(target_is_real)))
        if self.gan_mode == "hinge":
            if for_discriminator:
                return F.relu(1 - x).mean() if target_is_real else F.relu(1 + x).mean()
            if not target_is_real:
                raise ValueError("the generator's hinge loss must aim for real (target_is_real=True)")
            return -x.mean()
        return -x.mean() if target_is_real else x.mean()  # wgan

    def __call__(self, pred, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.loss(pred, target_is_real, for_discriminator)
        losses = [self.loss(p[-1] if isinstance(p, list) else p, target_is_real, for_discriminator) for p in pred]
        return sum(losses) / len(losses)


def gan_feature_matching(pred_fake, pred_real, lambda_feat: float) -> torch.Tensor:
    """sum over scales and layers (all but the prediction) of L1(D_l(fake), D_l(real)) * lambda_feat / num_D."""
    num_D = len(pred_fake)
    loss = 0.0
    for fake, real in zip(pred_fake, pred_real):
        for f, r in zip(fake[:-1], real[:-1]):
            loss = loss + F.l1_loss(f, r.detach()) * lambda_feat / num_D
    return loss


def pair_weights(self_ref: torch.Tensor) -> torch.Tensor:
    """w_b = s_b / (sum_j s_j + 1e-5), shaped (B, 1, 1, 1): only pseudo-exemplar pairs count."""
    s = self_ref.reshape(self_ref.shape[0], -1)[:, 0]
    return (s / (s.sum() + 1e-5)).view(-1, 1, 1, 1)


def weighted_l1(x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over B, C, H, W of w_b * |x - target| (so it scales with 1 / local batch, as the reference)."""
    return (torch.abs(x - target) * weights).mean()


def feature_matching(fake_features, real_features, weights: torch.Tensor) -> torch.Tensor:
    """sum_l lambda_l * weighted_l1(phi_l(fake), phi_l(real)), lambda = (1/32, 1/16, 1/8, 1/4, 1) over r12..r52."""
    return sum(lw * weighted_l1(f, r.detach(), weights) for lw, f, r in zip(FM_LAYER_WEIGHTS, fake_features, real_features))


def perceptual(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return torch.mean((fake - real.detach()) ** 2)


def contextual(x: torch.Tensor, y: torch.Tensor, pono: bool, backend: str) -> torch.Tensor:
    """Batch mean of -log CX(x, y) (the reference's ContextualLoss_forward, bandwidth 0.1), y detached."""
    loss = ck.contextual_loss(x, y.detach(), CX_BANDWIDTH, center="channel" if pono else "spatial", backend=backend)
    return loss.mean()


def contextual_layers(fake_features, ref_features, pono: bool, backend: str, use_22ctx: bool = False) -> torch.Tensor:
    """8 CX(r52) + 4 CX(r42) + 2 CX(avgpool2 r32) [+ CX(avgpool4 r22)]: generated image vs exemplar."""
    loss = contextual(fake_features[-1], ref_features[-1], pono, backend) * 8
    loss = loss + contextual(fake_features[-2], ref_features[-2], pono, backend) * 4
    loss = loss + contextual(F.avg_pool2d(fake_features[-3], 2), F.avg_pool2d(ref_features[-3], 2), pono, backend) * 2
    if use_22ctx:
        loss = loss + contextual(F.avg_pool2d(fake_features[-4], 4), F.avg_pool2d(ref_features[-4], 4), pono, backend)
    return loss


def warped_mask(warp_mask: torch.Tensor, label: torch.Tensor, ref_label: torch.Tensor) -> torch.Tensor:
    """sum omega * NLL(log(warp_mask + 1e-10), label down 4) / (sum omega + 1e-5).

    label / ref_label: (B, 1, H, W) class ids; downsampled x4 nearest (hard-coded 4 in the
    reference, whatever the warp stride). omega is 0 on class 0 and on classes absent from the
    exemplar's downsampled labels, 1 elsewhere.
    """
    gt = F.interpolate(label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    ref = F.interpolate(ref_label.float(), scale_factor=0.25, mode="nearest").long().squeeze(1)
    if gt.shape[1:] != warp_mask.shape[2:]:
        raise ValueError(f"the mask loss compares warp_mask {tuple(warp_mask.shape[2:])} with the label down 4 "
                         f"{tuple(gt.shape[1:])}: it needs --warp_stride 4, as in the reference")
    n = warp_mask.shape[1]
    present = torch.zeros(gt.shape[0], n, dtype=torch.bool, device=gt.device)
    present.scatter_(1, ref.flatten(1), True)
    omega = torch.gather(present, 1, gt.flatten(1)).view_as(gt) & (gt != 0)
    omega = omega.to(warp_mask.dtype)
    nll = F.nll_loss(torch.log(warp_mask.contiguous() + 1e-10), gt, reduction="none")
    return (nll * omega).sum() / (omega.sum() + 1e-5)
