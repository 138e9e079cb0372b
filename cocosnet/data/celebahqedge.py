"""CelebA-HQ edge maps (reference layout: <dataroot>/CelebA-HQ-img/<id>.jpg and the per-part masks
CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png; train.txt / val.txt list ids).

The 15-channel input, as the reference builds it at load_size before the crop:
  0       all edges: part boundaries, plus Canny edges of the photo outside the inner face parts
  1..13   per-part L1 distance to that part's boundary, / 3, clipped at 255, in [0, 1]
  14      part boundaries only"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from cocosnet.data.celebahq import ANNO, celeba_id, celeba_images
from cocosnet.data.drawing import canny, distance_map, label_edges
from cocosnet.data.pix2pix import Pix2pixDataset
from cocosnet.data.transforms import get_params, to_unit_tensor

INNER_PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose", "u_lip", "mouth",
               "l_lip", "eye_g", "hair")


class CelebAHQEdgeDataset(Pix2pixDataset):
    list_name = "celebahq"

    def get_paths(self, opt):
        images = celeba_images(opt)
        return [self.image_to_label_path(p) for p in images], images

    def image_to_label_path(self, image_path):
        i = celeba_id(image_path)
        root = os.path.dirname(os.path.dirname(image_path))
        return os.path.join(root, ANNO, str(int(i) // 2000), i.zfill(5) + "_{}.png")

    def load_label(self, path, rng):
        n = self.opt.load_size
        root = os.path.dirname(os.path.dirname(os.path.dirname(path)))
        idx = os.path.basename(path).split("_")[0]
        img = Image.open(os.path.join(root, "CelebA-HQ-img", str(int(idx)) + ".jpg")).resize((n, n), Image.BILINEAR)
        params = get_params(self.opt, img.size, rng)
        outside_inner = np.ones((n, n), dtype=bool)
        edges = np.zeros((n, n), dtype=bool)
        dists = []
        for part in INNER_PARTS:
            part_edge = np.zeros((n, n), dtype=bool)
            if os.path.exists(path.format(part)):
                mask = np.array(Image.open(path.format(part)).convert("L").resize((n, n), Image.NEAREST))
                outside_inner[mask == 255] = part == "hair"  # hair counts as background for Canny
                label_edges(edges, mask)
                label_edges(part_edge, mask)
            dists.append(to_unit_tensor(self.opt, params, distance_map(part_edge), Image.BILINEAR))
        all_edges = edges | (canny(np.array(img.convert("L"))) & outside_inner)
        as_img = lambda e: Image.fromarray(e.astype(np.uint8) * 255)  # noqa: E731
        label = torch.cat([to_unit_tensor(self.opt, params, as_img(all_edges)), *dists,
                           to_unit_tensor(self.opt, params, as_img(edges))])
        return label, params
