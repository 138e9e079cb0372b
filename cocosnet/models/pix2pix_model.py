"""Pix2PixModel: CoCosNet's networks, losses and optimisers, organised as the reference's models/pix2pix_model.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..options import DENSE_LABEL_DATASETS
from .blocks import init_weights
from .correspondence import NoVGGCorrespondence
from .discriminator import MultiscaleDiscriminator
from .generator import SPADEGenerator
from .vgg import LAYERS, build_vgg

MODES = ("generator", "discriminator", "inference")


def set_backend(module: nn.Module, backend: str) -> None:
    """Switch every cocos_kernels call inside `module` (correspondence, attention) to `backend`."""
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend


class Pix2PixModel(nn.Module):
    """forward(data, mode): "generator" -> (losses, outputs), "discriminator" -> losses, "inference" -> outputs.

    Networks: self.net["netG"], self.net["netCorr"] and (training) self.net["netD"], as the
    reference names them (also as the attributes net_G, net_Corr, net_D). See the package
    docstring for the `data` dict.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        nets = {"netG": SPADEGenerator(opt), "netCorr": NoVGGCorrespondence(opt)}
        if opt.isTrain:
            nets["netD"] = MultiscaleDiscriminator(opt)
        for net in nets.values():
            init_weights(net, opt.init_type, opt.init_variance)
        self.net = nn.ModuleDict(nets)
        if opt.isTrain:
            self.vggnet_fix = build_vgg(opt)
            self.criterionGAN = L.GANLoss(opt.gan_mode)
            self.perceptual_layer = -1 if opt.which_perceptual == "5_2" else -2

    @property
    def net_G(self) -> nn.Module:
        return self.net["netG"]

    @property
    def net_Corr(self) -> nn.Module:
        return self.net["netCorr"]

    @property
    def net_D(self) -> nn.Module | None:
        return self.net["netD"] if "netD" in self.net else None

    def set_backend(self, backend: str) -> None:
        self.opt.backend = backend
        set_backend(self, backend)

    # ------------------------------------------------------------------------------------------
    def forward(self, data: dict, mode: str, GforD: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        input_label, input_semantics, real_image, self_ref, ref_image, ref_label, ref_semantics = self.preprocess_input(data)
        if mode == "generator":
            self._require_train(mode)
            g_losses, generated = self.compute_generator_loss(
                input_label, input_semantics, real_image, ref_label, ref_semantics, ref_image, self_ref)
            out = {k: generated.get(k) for k in ("fake_image", "warp_out", "warp_mask", "warp_cycle", "warp_i2r", "warp_i2r2i")}
            out.update(input_semantics=input_semantics, ref_semantics=ref_semantics)
            return g_losses, out
        if mode == "discriminator":
            self._require_train(mode)
            if GforD is None:  # the reference passes the generator step's outputs; otherwise generate here
                with torch.no_grad():
                    GforD = self.generate_fake(input_semantics, real_image, ref_semantics, ref_image, vgg=False)
            return self.compute_discriminator_loss(input_semantics, real_image, GforD)
        with torch.no_grad():
            out = self.inference(input_semantics, ref_semantics, ref_image)
        out.update(input_semantics=input_semantics, ref_semantics=ref_semantics)
        return out

    def _require_train(self, mode: str) -> None:
        if not self.opt.isTrain:
            raise ValueError(f"mode {mode!r} needs a model built with training options (parse(mode='train'))")

    def create_optimizers(self, opt):
        """Adam for G + Corr (lr/2 each under TTUR, eps 1e-3) and for D (lr*2); betas (0, 0.9) under TTUR."""
        G_params = [{"params": self.net["netG"].parameters(), "lr": opt.lr * 0.5},
                    {"params": self.net["netCorr"].parameters(), "lr": opt.lr * 0.5}]
        if opt.no_TTUR:
            beta1, beta2, G_lr, D_lr = opt.beta1, opt.beta2, opt.lr, opt.lr
        else:
            beta1, beta2, G_lr, D_lr = 0.0, 0.9, opt.lr / 2, opt.lr * 2
        optimizer_G = torch.optim.Adam(G_params, lr=G_lr, betas=(beta1, beta2), eps=1e-3)
        optimizer_D = torch.optim.Adam(self.net["netD"].parameters(), lr=D_lr, betas=(beta1, beta2)) if opt.isTrain else None
        return optimizer_G, optimizer_D

    # ------------------------------------------------------------------------------------------
    def preprocess_input(self, data: dict):
        """Move to the model's device/dtype and build the one-hot maps, as the reference's preprocess_input."""
        opt = self.opt
        p = next(self.net["netG"].parameters())
        device, dtype = p.device, p.dtype
        for key in ("label", "image", "ref", "label_ref", "self_ref"):
            if key not in data:
                raise ValueError(f"data has no {key!r}: it needs label, image, ref, label_ref, self_ref (got {sorted(data)})")
        label, label_ref = data["label"].to(device), data["label_ref"].to(device)
        image = data["image"].to(device, dtype)
        ref = data["ref"].to(device, dtype)
        self_ref = torch.as_tensor(data["self_ref"]).to(device, dtype)
        if opt.dataset_mode in DENSE_LABEL_DATASETS:
            # Edge/pose maps condition directly; their first channel(s) stand in for the label.
            input_semantics, ref_semantics = label.to(dtype), label_ref.to(dtype)
            keep = 1 if opt.dataset_mode == "celebahqedge" else 3
            return label[:, :keep], input_semantics, image, self_ref, ref, label_ref[:, :keep], ref_semantics
        glasses = glasses_ref = None
        if opt.dataset_mode == "celebahq" and label.shape[1] == 2:  # (class id, eye-glasses mask)
            glasses, glasses_ref = label[:, 1:2], label_ref[:, 1:2]
            label, label_ref = label[:, :1], label_ref[:, :1]
        # Labels stored as floats (ToTensor * 255) may sit a rounding error below the id.
        label, label_ref = (t.round().long() if t.is_floating_point() else t.long() for t in (label, label_ref))
        input_semantics = self.one_hot(label, dtype)
        ref_semantics = self.one_hot(label_ref, dtype)
        if glasses is not None:  # the glasses mask is one-hot channel -3, which no class id uses
            input_semantics[:, -3:-2] = glasses.to(dtype)
            ref_semantics[:, -3:-2] = glasses_ref.to(dtype)
        return label, input_semantics, image, self_ref, ref, label_ref, ref_semantics

    def one_hot(self, label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        nc = self.opt.semantic_nc
        if label.dim() != 4 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, H, W) class ids for --dataset_mode {self.opt.dataset_mode}, "
                             f"got shape {tuple(label.shape)}")
        self.check_label_ids(label)
        B, _, H, W = label.shape
        return torch.zeros(B, nc, H, W, dtype=dtype, device=label.device).scatter_(1, label, 1.0)

    def check_label_ids(self, label: torch.Tensor) -> None:
        # Data-dependent (benchmarks/bench_train_step.py traces with value-less tensors and skips it).
        nc = self.opt.semantic_nc
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= nc:
            raise ValueError(f"label ids must lie in [0, {nc - 1}] (semantic_nc {nc}), got [{lo}, {hi}]")

    # ------------------------------------------------------------------------------------------
    def generate_fake(self, input_semantics, real_image, ref_semantics, ref_image, vgg: bool = True) -> dict:
        out = {}
        if vgg:
            out["ref_features"] = self.vggnet_fix(ref_image, LAYERS)
            out["real_features"] = self.vggnet_fix(real_image, LAYERS)
        coor_out = self.net["netCorr"](ref_image, real_image, input_semantics, ref_semantics)
        out["fake_image"] = self.net["netG"](self.conditioning(coor_out, input_semantics))
        out.update(coor_out)
        return out

    def conditioning(self, coor_out: dict, input_semantics: torch.Tensor) -> torch.Tensor:
        kind = self.opt.CBN_intype
        if kind == "mask":
            return input_semantics
        if kind == "warp":
            return coor_out["warp_out"]
        return torch.cat((coor_out["warp_out"], input_semantics), dim=1)

    def inference(self, input_semantics, ref_semantics, ref_image) -> dict:
        coor_out = self.net["netCorr"](ref_image, None, input_semantics, ref_semantics, want_mask=True)
        out = {"fake_image": self.net["netG"](self.conditioning(coor_out, input_semantics))}
        out.update(coor_out)
        return out

    def discriminate(self, input_semantics, fake_image, real_image):
        """D on [fake; real] in one batch -> (pred_fake, pred_real), each a per-scale list of block outputs."""
        fake_and_real = torch.cat([torch.cat([input_semantics, fake_image], 1), torch.cat([input_semantics, real_image], 1)], 0)
        pred = self.net["netD"](fake_and_real)
        half = fake_image.shape[0]
        return [[t[:half] for t in p] for p in pred], [[t[half:] for t in p] for p in pred]

    def compute_generator_loss(self, input_label, input_semantics, real_image, ref_label, ref_semantics, ref_image, self_ref):
        opt = self.opt
        G_losses = {}
        out = self.generate_fake(input_semantics, real_image, ref_semantics, ref_image)
        if "loss_novgg_featpair" in out:
            G_losses["no_vgg_feat"] = out["loss_novgg_featpair"]
        if opt.warp_cycle_w > 0:
            target = ref_image if opt.warp_patch else F.avg_pool2d(ref_image, opt.warp_stride)
            G_losses["G_warp_cycle"] = F.l1_loss(out["warp_cycle"], target) * opt.warp_cycle_w
            if opt.two_cycle and "warp_i2r2i" in out:
                real = F.avg_pool2d(real_image, opt.warp_stride)
                G_losses["G_warp_cycle"] = G_losses["G_warp_cycle"] + F.l1_loss(out["warp_i2r2i"], real) * opt.warp_cycle_w
        weights = L.pair_weights(self_ref)
        if opt.warp_self_w > 0:
            G_losses["G_warp_self"] = L.weighted_l1(out["warp_out"], real_image, weights) * opt.warp_self_w

        pred_fake, pred_real = self.discriminate(input_semantics, out["fake_image"], real_image)
        G_losses["GAN"] = self.criterionGAN(pred_fake, True, for_discriminator=False) * opt.weight_gan
        if not opt.no_ganFeat_loss:
            G_losses["GAN_Feat"] = L.gan_feature_matching(pred_fake, pred_real, opt.lambda_feat)

        fake_features = self.vggnet_fix(out["fake_image"], LAYERS)
        G_losses["fm"] = L.feature_matching(fake_features, out["real_features"], weights) * opt.lambda_vgg * opt.fm_ratio
        G_losses["perc"] = L.perceptual(fake_features[self.perceptual_layer],
                                        out["real_features"][self.perceptual_layer]) * opt.weight_perceptual
        G_losses["contextual"] = L.contextual_layers(
            fake_features, out["ref_features"], opt.PONO, opt.backend, opt.use_22ctx) * opt.lambda_vgg * opt.ctx_w
        if opt.warp_mask_losstype != "none":
            G_losses["mask"] = L.warped_mask(out["warp_mask"], input_label, ref_label) * opt.weight_mask
        return G_losses, out

    def compute_discriminator_loss(self, input_semantics, real_image, GforD: dict) -> dict:
        fake_image = GforD["fake_image"].detach()
        pred_fake, pred_real = self.discriminate(input_semantics, fake_image, real_image)
        return {
            "D_Fake": self.criterionGAN(pred_fake, False, for_discriminator=True) * self.opt.weight_gan,
            "D_real": self.criterionGAN(pred_real, True, for_discriminator=True) * self.opt.weight_gan,
        }
