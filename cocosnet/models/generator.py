"""The translation network (reference: models/networks/generator.py, SPADEGenerator).

Not the paper's constant code: a conv of the conditioning map resized to 1/32 of the image, then
seven SPADE residual blocks (PONO with --PONO) conditioned at every layer on cat(warped exemplar,
one-hot input) (--CBN_intype warp_mask), with the self-attention block at half resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, SPADEResnetBlock


def conditioning_channels(opt) -> int:
    """Channels of G's conditioning map for --CBN_intype (3 for the warp, semantic_nc for the mask)."""
    return (3 if "warp" in opt.CBN_intype else 0) + (opt.semantic_nc if "mask" in opt.CBN_intype else 0)


class SPADEGenerator(nn.Module):
    num_up_layers = 5

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        nf, ic = opt.ngf, conditioning_channels(opt)
        self.fc = nn.Conv2d(ic, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, opt, ic)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, opt, ic)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, opt, ic)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, opt, ic)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, opt, ic)
        if opt.use_attention:
            self.attn = Attention(4 * nf, "spectral" in opt.norm_G, backend=opt.backend)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, opt, ic)
        self.up_3 = SPADEResnetBlock(2 * nf, nf, opt, ic)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        """seg: (B, ic, H, W) conditioning map at the output size; H, W multiples of 32 -> (B, 3, H, W) in [-1, 1].

        The starting grid is the actual size / 32 (the reference derives it from crop_size and
        aspect_ratio, which is the same at the training size).
        """
        H, W = seg.shape[2:]
        scale = 2**self.num_up_layers
        if H % scale or W % scale:
            raise ValueError(f"generator input size {H}x{W} must be a multiple of {scale}")
        x = self.fc(F.interpolate(seg, size=(H // scale, W // scale), mode="nearest"))
        x = self.head_0(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.G_middle_0(x, seg)
        x = self.G_middle_1(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.up_0(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.up_1(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.opt.use_attention:
            x = self.attn(x)
        x = self.up_2(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.up_3(x, seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))
