"""A frozen VGG-19 feature extractor for the losses, without torchvision.

`features` has torchvision's `vgg19().features` layer indices, so a torchvision state dict
(`features.0.weight` ...; `classifier.*` ignored) loads directly; the reference's Caffe-converted
`vgg19_conv.pth` (`conv1_1.weight` ... `conv5_4.bias`) loads through a key map. The two take
different input:
- caffe (the reference's file): BGR, 0..255, mean-subtracted, no std division. With
  --vgg_normal_correct the [-1, 1] image x goes in as 255 * (BGR((x + 1) / 2) - mean); without it
  the reference feeds 255 * (BGR(x) - mean) (its mis-scaling, kept for parity).
- torchvision: RGB in [0, 1] normalised with the ImageNet mean and std.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..checkpoint import load

# (block, conv) names of VGG-19's 16 convs in order; "M" is a 2x2 max-pool.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
CAFFE_MEAN_BGR = (0.40760392, 0.45795686, 0.48501961)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("r12", "r22", "r32", "r42", "r52")  # relu1_2 ... relu5_2: what the losses use


def _layout():
    """conv name ('conv1_1') -> index in `features`, and relu name ('r12') -> index of its ReLU."""
    convs, relus, block, conv, i = {}, {}, 1, 1, 0
    for v in _CFG:
        if v == "M":
            block, conv, i = block + 1, 1, i + 1
            continue
        convs[f"conv{block}_{conv}"] = i
        relus[f"r{block}{conv}"] = i + 1
        conv, i = conv + 1, i + 2
    return convs, relus


CONV_INDEX, RELU_INDEX = _layout()

MISSING_WEIGHTS = (
    "VGG-19 weights not found at {path!r}. The VGG-based losses need them: put the reference's "
    "Caffe-converted 'vgg19_conv.pth' (keys conv1_1.weight ... conv5_4.bias; the CoCosNet README's "
    "download, saved by the reference as models/vgg19_conv.pth) at that path, or point --vgg_path at a "
    "torchvision VGG-19 state dict ('vgg19-dcbb9e9d.pth', keys features.N.weight). For smoke tests "
    "only, --vgg_random_init uses random weights (every VGG loss is then meaningless)."
)


def detect_convention(state_dict: dict) -> str:
    """'caffe' for conv1_1.* keys, 'torchvision' for features.N.* keys; ValueError otherwise."""
    keys = set(state_dict)
    if "conv1_1.weight" in keys:
        return "caffe"
    if "features.0.weight" in keys:
        return "torchvision"
    sample = sorted(keys)[:4]
    raise ValueError(f"cannot tell the VGG-19 weight convention from keys like {sample}: "
                     "expected conv1_1.weight (caffe) or features.0.weight (torchvision)")


class VGG19Features(nn.Module):
    """VGG-19 convs + ReLUs + max-pools; forward(x in [-1, 1]) -> the requested relu outputs."""

    def __init__(self, convention: str = "caffe", vgg_normal_correct: bool = True):
        super().__init__()
        if convention not in ("caffe", "torchvision"):
            raise ValueError(f"convention must be 'caffe' or 'torchvision', got {convention!r}")
        self.convention = convention
        self.vgg_normal_correct = vgg_normal_correct
        layers, c = [], 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def load_weights(self, state_dict: dict) -> None:
        """Load a torchvision (features.N.*) or Caffe-converted (convB_C.*) VGG-19 state dict, strictly."""
        if detect_convention(state_dict) == "caffe":
            state_dict = {f"features.{CONV_INDEX[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in state_dict.items()}
        else:
            state_dict = {k: v for k, v in state_dict.items() if k.startswith("features.")}
        self.load_state_dict(state_dict, strict=True)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.convention == "torchvision":
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            return ((x + 1) / 2 - mean) / std
        if self.vgg_normal_correct:
            x = (x + 1) / 2
        bgr = x.flip(1)
        return (bgr - x.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)) * 255

    def forward(self, x: torch.Tensor, out_keys=LAYERS) -> list[torch.Tensor]:
        wanted = {RELU_INDEX[k]: k for k in out_keys}
        last = max(wanted)
        out = {}
        h = self.preprocess(x)
        for i, layer in enumerate(self.features[: last + 1]):
            h = layer(h)
            if i in wanted:
                out[wanted[i]] = h
        return [out[k] for k in out_keys]


def build_vgg(opt) -> VGG19Features:
    """The loss network from --vgg_path / --vgg_convention / --vgg_random_init (FileNotFoundError says what to put where)."""
    if opt.vgg_random_init:
        convention = "caffe" if opt.vgg_convention == "auto" else opt.vgg_convention
        return VGG19Features(convention, opt.vgg_normal_correct)
    if not os.path.isfile(opt.vgg_path):
        raise FileNotFoundError(MISSING_WEIGHTS.format(path=opt.vgg_path))
    state = load(opt.vgg_path, f"VGG-19 weights --vgg_path {opt.vgg_path!r}")
    convention = detect_convention(state) if opt.vgg_convention == "auto" else opt.vgg_convention
    net = VGG19Features(convention, opt.vgg_normal_correct)
    net.load_weights(state)
    return net
