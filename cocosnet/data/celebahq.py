"""CelebA-HQ with CelebAMask-HQ masks (reference layout): <dataroot>/CelebA-HQ-img/<id>.jpg,
CelebAMask-HQ-mask-anno/all_parts_except_glasses/<id:05d>.png (class indices) and
CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_eye_g.png (glasses); train.txt / val.txt list ids.

The label is (2, H, W) float as the reference builds it: channel 0 the class index, channel 1
the glasses mask in {0, 1} (the model turns it into one-hot channel -3)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from cocosnet.data.pix2pix import Pix2pixDataset, read_id_list
from cocosnet.data.transforms import get_params, to_class_tensor, to_unit_tensor

ANNO = "CelebAMask-HQ-mask-anno"


def celeba_id(image_path: str) -> str:
    return os.path.splitext(os.path.basename(image_path))[0]


def celeba_images(opt) -> list[str]:
    """The photos of the phase's id list (train.txt / val.txt), as both CelebA-HQ datasets read them."""
    ids = read_id_list(os.path.join(opt.dataroot, "train.txt" if opt.phase == "train" else "val.txt"))
    return [os.path.join(opt.dataroot, "CelebA-HQ-img", i + ".jpg") for i in ids]


class CelebAHQDataset(Pix2pixDataset):
    list_name = "celebahq"

    def get_paths(self, opt):
        images = celeba_images(opt)
        return [self.image_to_label_path(p) for p in images], images

    def image_to_label_path(self, image_path):
        root = os.path.dirname(os.path.dirname(image_path))
        return os.path.join(root, ANNO, "all_parts_except_glasses", celeba_id(image_path).zfill(5) + ".png")

    def load_label(self, path, rng):
        parts = Image.open(path).convert("L")
        idx = os.path.splitext(os.path.basename(path))[0]
        glasses_path = os.path.join(os.path.dirname(os.path.dirname(path)), str(int(idx) // 2000), idx + "_eye_g.png")
        if os.path.exists(glasses_path):
            glasses = Image.open(glasses_path).convert("L")
        else:
            glasses = Image.fromarray(np.zeros((parts.size[1], parts.size[0]), dtype=np.uint8))
        params = get_params(self.opt, parts.size, rng)
        label = torch.cat([to_class_tensor(self.opt, params, parts).float(),
                           to_unit_tensor(self.opt, params, glasses)])
        return label, params
