"""The multi-scale PatchGAN discriminator (reference: models/networks/discriminator.py).

The reference also builds a segmentation decoder `dec` that it never calls; it is left out here
(it would get no gradient), and `cocosnet.convert` drops its keys from reference checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, conv_norm


class NLayerDiscriminator(nn.Module):
    """k4 convs: ndf (s2) -> ... -> 512 max (s1) -> 1 (s1); attention before the last strided-1 block."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        kw, padw = 4, 1
        nf = opt.ndf
        input_nc = opt.label_nc + opt.output_nc + (1 if opt.contain_dontcare_label else 0)
        sequence = [[nn.Conv2d(input_nc, nf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2)]]
        for n in range(1, opt.n_layers_D):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == opt.n_layers_D - 1 else 2
            if opt.use_attention and n == opt.n_layers_D - 1:
                self.attn = Attention(nf_prev, "spectral" in opt.norm_D, backend=opt.backend)
            sequence.append([conv_norm(nn.Conv2d(nf_prev, nf, kw, stride=stride, padding=padw), opt.norm_D),
                             nn.LeakyReLU(0.2)])
        sequence.append([nn.Conv2d(nf, 1, kw, stride=1, padding=padw)])
        self.n_models = len(sequence)
        for n, layers in enumerate(sequence):
            self.add_module(f"model{n}", nn.Sequential(*layers))
        self.attn_at = f"model{opt.n_layers_D - 1}"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output (the last is the patch prediction): the feature-matching loss uses the others."""
        results = []
        for n in range(self.n_models):
            name = f"model{n}"
            if name == self.attn_at and self.opt.use_attention:
                x = self.attn(x)
            x = getattr(self, name)(x)
            results.append(x)
        return results


class MultiscaleDiscriminator(nn.Module):
    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        for i in range(opt.num_D):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(opt))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """-> per scale, the list of block outputs (only the prediction with --no_ganFeat_loss)."""
        result = []
        for i in range(self.opt.num_D):
            out = getattr(self, f"discriminator_{i}")(x)
            result.append([out[-1]] if self.opt.no_ganFeat_loss else out)
            x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
        return result
