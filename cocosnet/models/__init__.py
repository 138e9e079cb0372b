"""CoCosNet's networks and model (reference: microsoft/CoCosNet models/).

    from cocosnet.options import parse
    from cocosnet.models import Pix2PixModel
    opt = parse(["--recipe", "ade20k", "--vgg_path", "models/vgg19_conv.pth"], mode="train")
    model = Pix2PixModel(opt)
    optimizer_G, optimizer_D = model.create_optimizers(opt)
    g_losses, generated = model(data, "generator")          # dict of loss tensors, dict of outputs
    d_losses = model(data, "discriminator", GforD=generated)  # dict of loss tensors
    out = model(data, "inference")                           # no_grad

The `data` dict (what the reference's datasets return, batched by the DataLoader):

| key | shape, dtype | meaning |
|---|---|---|
| 'label' | (B, 1, H, W) class ids (any int or float dtype holding integers), ids in [0, semantic_nc) | input semantic map (ade20k: 0..150 with 150 = unknown; celebahq: 0..18) |
|  | celebahq: (B, 2, H, W): channel 0 class ids, channel 1 the 0/1 eye-glasses mask | the glasses mask becomes one-hot channel -3, as in the reference |
|  | celebahqedge: (B, 15, H, W) float; deepfashion: (B, 20, H, W) float | dense input maps used as they are (edges + distance maps; pose render + limb distance maps) |
| 'image' | (B, 3, H, W) float in [-1, 1] | ground-truth photo x_B |
| 'ref' | (B, 3, H, W) float in [-1, 1] | exemplar photo y_B |
| 'label_ref' | as 'label' | the exemplar's map |
| 'self_ref' | (B,) or (B, ...) float; element [b, 0, 0, ...] is read | 1 where the exemplar is the pseudo exemplar of the input itself (the reference passes ones/zeros shaped like 'ref') |

H and W: multiples of 32 (G starts at 1/32), e.g. 256, 512, 1024; `opt.crop_size` is not consulted by the
networks (the actual size is used). Other keys (e.g. 'path') are ignored. Tensors are moved to the
model's device and floating tensors cast to its dtype.

Outputs: "generator" returns ({loss name: scalar tensor}, {'fake_image', 'warp_out', 'warp_mask',
'warp_cycle', 'warp_i2r', 'warp_i2r2i', 'input_semantics', 'ref_semantics'}) with None for what the
options do not compute. Loss names as the reference: 'no_vgg_feat', 'G_warp_cycle', 'G_warp_self',
'GAN', 'GAN_Feat', 'fm', 'perc', 'contextual', 'mask'; the total is their plain sum.
"discriminator" returns {'D_Fake', 'D_real'}. "inference" returns {'fake_image', 'warp_out' (B, 3, H, W),
'warp_mask' (B, semantic_nc, H/down, W/down), 'input_semantics', 'ref_semantics'} (+ 'warp_out_bi'
with --show_corr).

With --noise_for_mask the trunk replaces the exemplar mask by noise once `opt.epoch > opt.mask_epoch`:
the training loop sets `opt.epoch` (0 when unset).
"""
from .correspondence import NoVGGCorrespondence
from .discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from .generator import SPADEGenerator
from .pix2pix_model import Pix2PixModel, set_backend
from .vgg import VGG19Features, build_vgg

__all__ = [
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "NoVGGCorrespondence",
    "Pix2PixModel",
    "SPADEGenerator",
    "VGG19Features",
    "build_vgg",
    "set_backend",
]
