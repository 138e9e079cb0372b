"""The cross-domain correspondence network (reference: models/networks/correspondence.py, NoVGGCorrespondence).

Two domain adaptors map the input map and the exemplar image to 256-channel features at 1/down of
the image side; a shared residual trunk (with the one-hot maps mixed in under --maskmix) and the
theta/phi 1x1 convs give the matching features; `cocos_kernels.correspondence_warp` (k x k patch
matching, channel centring, temperature 0.01) warps the exemplar and its one-hot mask, and
`cocos_kernels.cycle_warp` also the warped exemplar back for the cycle -- without the (hw x hw)
matrix on a fused backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cocos_kernels as ck

from .blocks import SPADEResnetBlock, conv_norm, recomputed

EPS = ck.DEFAULT_EPS  # sys.float_info.epsilon, added to the norm as the reference does


def feature_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / (||x||_2 over channels + eps), per position."""
    return x / (torch.norm(x, 2, 1, keepdim=True) + EPS)


class AdaptiveFeatureGenerator(nn.Module):
    """Domain adaptor: strided conv encoder to 1/down resolution, then self-conditioned SPADE blocks (512 -> 256 ch)."""

    def __init__(self, opt, input_nc: int):
        super().__init__()
        kw, pw, ndf, nf = 3, 1, opt.ngf, opt.ngf
        ak = opt.adaptor_kernel
        self.layer1 = conv_norm(nn.Conv2d(input_nc, ndf, kw, stride=1, padding=pw), opt.norm_E)
        self.layer2 = conv_norm(nn.Conv2d(ndf, ndf * 2, ak, stride=2, padding=pw), opt.norm_E)
        self.layer3 = conv_norm(nn.Conv2d(ndf * 2, ndf * 4, kw, stride=1, padding=pw), opt.norm_E)
        if opt.warp_stride == 2:
            self.layer4 = conv_norm(nn.Conv2d(ndf * 4, ndf * 8, kw, stride=1, padding=pw), opt.norm_E)
        else:
            self.layer4 = conv_norm(nn.Conv2d(ndf * 4, ndf * 8, ak, stride=2, padding=pw), opt.norm_E)
        self.layer5 = conv_norm(nn.Conv2d(ndf * 8, ndf * 8, kw, stride=1, padding=pw), opt.norm_E)
        self.head_0 = SPADEResnetBlock(8 * nf, 8 * nf, opt, ic=input_nc)
        self.G_middle_0 = SPADEResnetBlock(8 * nf, 8 * nf, opt, ic=input_nc)
        self.G_middle_1 = SPADEResnetBlock(8 * nf, 4 * nf, opt, ic=input_nc)
        self.recompute = getattr(opt, "activation_checkpointing", False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(x)
        for layer in (self.layer2, self.layer3, self.layer4, self.layer5):
            x = layer(F.leaky_relu(x, 0.2))
        return x

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x = recomputed(self, self.encode, x)
        x = self.head_0(x, seg)
        x = self.G_middle_0(x, seg)
        return self.G_middle_1(x, seg)


class ResidualBlock(nn.Module):
    """Trunk block: pad-conv-IN-PReLU-pad-conv-IN, + input, PReLU (one PReLU parameter used twice)."""

    def __init__(self, channels: int, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.padding1 = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.bn1 = nn.InstanceNorm2d(channels)
        self.prelu = nn.PReLU()
        self.padding2 = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        self.bn2 = nn.InstanceNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recomputed(self, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn1(self.conv1(self.padding1(x))))
        out = self.bn2(self.conv2(self.padding2(out)))
        return self.prelu(out + x)


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """Append x, y in [-1, 1] and their radius as three channels (--use_coordconv)."""
    b, _, h, w = x.shape
    xx = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    yy = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat((x, xx, yy, torch.sqrt(xx**2 + yy**2)), dim=1)


class NoVGGCorrespondence(nn.Module):
    """Correspondence network. forward -> dict with 'warp_out' (and 'warp_mask', 'warp_cycle', losses, ...)."""

    inter_channels = 256

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.backend = opt.backend
        self.down = opt.down
        self.adaptive_model_seg = AdaptiveFeatureGenerator(opt, opt.semantic_nc)
        self.adaptive_model_img = AdaptiveFeatureGenerator(opt, 3)
        channels = 4 * opt.ngf + (opt.semantic_nc if opt.maskmix else 0) + (3 if opt.use_coordconv else 0)
        self.layer = nn.Sequential(*(ResidualBlock(channels, getattr(opt, "activation_checkpointing", False)) for _ in range(4)))
        self.phi = nn.Conv2d(channels, self.inter_channels, 1)
        self.theta = nn.Conv2d(channels, self.inter_channels, 1)

    def _matching(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """The three maps in one dtype, and the matching options (k x k patches, centring, temperature aside).

        Under autocast the features arrive in half precision and the exemplar in float32: all go in
        the wider dtype, since logits up to 1/temperature = 100 would carry ~0.4 of bfloat16 error.
        """
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        options = dict(center="channel" if self.opt.PONO_C else "spatial", normalize=True,
                       patch_size=self.opt.match_kernel, eps=EPS, backend=self.backend)
        return (query.to(dtype), key.to(dtype), value.to(dtype)), options

    def warp(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, temperature: float) -> torch.Tensor:
        """softmax over key positions of <q_hat(u), k_hat(v)> / temperature, applied to value (the reference's f_div_C @ value)."""
        maps, options = self._matching(query, key, value)
        return ck.correspondence_warp(*maps, temperature, **options)

    def cycle(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(warp(query, key, value), warp(key, query, that)): the warp and its way back (the reference's
        column softmax), each map's features prepared once."""
        maps, options = self._matching(query, key, value)
        return ck.cycle_warp(*maps, temperature, **options)

    def features(self, ref_img, real_img, seg_map, ref_seg_map) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(theta, phi, out): the input's and the exemplar's matching features on the size/down grid,
        and in training with a ground truth real_img the domain alignment loss out['loss_novgg_featpair']."""
        opt, down = self.opt, self.down
        out = {}
        H, W = ref_img.shape[2:]
        if H % down or W % down:
            raise ValueError(f"image size {H}x{W} must be divisible by the warp stride {down}")
        h, w = H // down, W // down
        seg_input = seg_map
        if opt.mask_noise:
            noise = torch.randn_like(seg_map) * 0.1
            seg_input = seg_map + noise.masked_fill(seg_map == 0, 0)
        feat_seg = feature_normalize(self.adaptive_model_seg(seg_input, seg_input))
        feat_img = feature_normalize(self.adaptive_model_img(ref_img, ref_img))
        if opt.isTrain and opt.novgg_featpair > 0 and real_img is not None:
            feat_pair = feature_normalize(self.adaptive_model_img(real_img, real_img))
            out["loss_novgg_featpair"] = F.l1_loss(feat_seg, feat_pair) * opt.novgg_featpair
        if opt.use_coordconv:
            feat_seg, feat_img = add_coords(feat_seg), add_coords(feat_img)

        if opt.maskmix:
            seg = F.interpolate(seg_map, size=(h, w), mode="nearest")
            ref_seg = F.interpolate(ref_seg_map, size=(h, w), mode="nearest")
            cont_features = self.layer(torch.cat((feat_seg, seg), 1))
            if opt.noise_for_mask and (not opt.isTrain or getattr(opt, "epoch", 0) > opt.mask_epoch):
                ref_seg = torch.randn_like(ref_seg) * 0.01
            ref_features = self.layer(torch.cat((feat_img, ref_seg), 1))
        else:
            cont_features = self.layer(feat_seg)
            ref_features = self.layer(feat_img)
        return self.theta(cont_features), self.phi(ref_features), out

    def forward(self, ref_img, real_img, seg_map, ref_seg_map, temperature: float = 0.01, want_mask: bool = False):
        """ref_img (B,3,H,W) exemplar; real_img ground truth or None; seg_map / ref_seg_map (B,S,H,W) input / exemplar maps.

        want_mask: also warp the exemplar's map ('warp_mask') even when the mask loss does not need it.
        """
        opt, down = self.opt, self.down
        B, _, H, W = ref_img.shape
        h, w = H // down, W // down
        theta, phi, out = self.features(ref_img, real_img, seg_map, ref_seg_map)

        if opt.warp_patch:  # each cell's down x down pixel patch (3*down^2 values), folded back at the image size
            ref = F.unfold(ref_img, down, stride=down).view(B, -1, h, w)
        else:
            ref = F.avg_pool2d(ref_img, down)
        # As the reference: direct for the direct loss or --show_warpmask, else the cycle loss's mask.
        mask_mode = opt.warp_mask_losstype
        if opt.show_warpmask or (want_mask and mask_mode == "none"):
            mask_mode = "direct"
        ref_seg_small = F.interpolate(ref_seg_map, size=(h, w), mode="nearest")
        values = [ref]
        if mask_mode == "direct":  # warp_out and warp_mask share the softmax: one pass over both
            values.append(ref_seg_small)
        want_cycle = opt.isTrain and opt.warp_cycle_w > 0
        if want_cycle:
            # Each channel is warped on its own: the mask channels' way back is computed and dropped.
            warped, back = self.cycle(theta, phi, torch.cat(values, 1), temperature)
        else:
            warped = self.warp(theta, phi, torch.cat(values, 1), temperature)
        y = warped[:, : ref.shape[1]]
        if mask_mode == "direct":
            out["warp_mask"] = warped[:, ref.shape[1]:]
        elif mask_mode == "cycle":  # the input's map to the exemplar (column softmax) and back
            seg_small = F.interpolate(seg_map, size=(h, w), mode="nearest")
            out["warp_mask"] = self.cycle(phi, theta, seg_small, temperature)[1]

        if opt.warp_patch:
            y_full = F.fold(y.reshape(B, -1, h * w), (H, W), down, stride=down)
            out["warp_out"] = y_full
            if not opt.isTrain and opt.show_corr:
                out["warp_out_bi"] = y_full
        else:
            mode = dict(mode="bilinear", align_corners=False) if opt.warp_bilinear else dict(mode="nearest")
            out["warp_out"] = F.interpolate(y, scale_factor=down, **mode)
            if not opt.isTrain and opt.show_corr:
                out["warp_out_bi"] = F.interpolate(y, scale_factor=down, mode="bilinear", align_corners=False)

        if want_cycle:
            # The way back (the same op with query and key swapped) is the column softmax of the reference.
            cycle = back[:, : ref.shape[1]]
            if opt.warp_patch:
                cycle = F.fold(cycle.reshape(B, -1, h * w), (H, W), down, stride=down)
            out["warp_cycle"] = cycle
            if opt.two_cycle and not opt.warp_patch and real_img is not None:
                out["warp_i2r"], out["warp_i2r2i"] = self.cycle(phi, theta, F.avg_pool2d(real_img, down), temperature)
        return out
