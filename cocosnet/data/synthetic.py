"""A synthetic exemplar dataset, generated on the fly: no download, any size, any resolution.

Scene i belongs to class mix i % synthetic_mixes; each mix is a fixed subset of the
semantic_nc classes (label_nc, + 1 with contain_dontcare_label; the first is the background). A scene is a label map of random ellipses, rectangles
and triangles of the mix's classes, and a photo rendered from it: every class has its own
texture (a colour and oriented stripes of a class-specific frequency), with per-scene lighting
and pixel noise. The retrieved exemplar of scene i is another scene of the same mix (its
"easy" one the next scene of that mix, its "hard" one a random scene of that mix); the pseudo
exemplar is the same scene re-cropped and flipped, as the reference makes them.

Scenes depend on (seed, index) only; crops, flips and the exemplar draw on (seed, epoch, index),
like the real datasets. The label is a (1, H, W) int64 class map (ADE20K-like), ids 0..semantic_nc-1.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from cocosnet.data.pix2pix import Pix2pixDataset
from cocosnet.data.transforms import get_params, to_class_tensor, to_image_tensor


def _palette(n_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    return rng.uniform(30, 225, size=(n_classes, 3))


class SyntheticDataset(Pix2pixDataset):
    list_name = "synthetic"

    def __init__(self, opt):
        for name in ("synthetic_size", "synthetic_mixes", "label_nc"):
            v = getattr(opt, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if opt.synthetic_size < 2 * opt.synthetic_mixes:
            raise ValueError(f"synthetic_size ({opt.synthetic_size}) must be at least 2 * synthetic_mixes "
                             f"({opt.synthetic_mixes}) so that every scene has another scene of its mix")
        # Class ids 0..n-1 fill the one-hot map exactly: label_nc, + 1 with contain_dontcare_label.
        self.n_classes = opt.label_nc + (1 if opt.contain_dontcare_label else 0)
        if self.n_classes < 2:
            raise ValueError(f"synthetic data needs at least 2 classes, got label_nc={opt.label_nc} "
                             f"(contain_dontcare_label={opt.contain_dontcare_label})")
        self.palette = _palette(self.n_classes, getattr(opt, "seed", 0))
        super().__init__(opt)

    def get_paths(self, opt):
        names = [f"synthetic/{i:06d}" for i in range(opt.synthetic_size)]
        return names, names

    def get_ref(self, opt):
        return {}  # exemplars are picked by mix, below

    def mix(self, i: int) -> list[int]:
        k = self.opt.synthetic_mixes
        rng = random.Random(f"{getattr(self.opt, 'seed', 0)}/mix/{i % k}")
        n = min(self.n_classes, rng.randint(3, 6))
        return rng.sample(range(self.n_classes), n)

    def scene(self, i: int) -> tuple[Image.Image, Image.Image]:
        """Label map ('L') and photo ('RGB') of scene i at load_size (or crop_size without resizing)."""
        side = self.opt.load_size if self.opt.preprocess_mode != "fixed" else self.opt.crop_size
        seed = getattr(self.opt, "seed", 0)
        rng = random.Random(f"{seed}/scene/{i}")
        classes = self.mix(i)
        label = Image.new("L", (side, side), classes[0])
        draw = ImageDraw.Draw(label)
        for _ in range(rng.randint(3, 8)):
            c = rng.choice(classes[1:])
            x0, y0 = rng.uniform(-0.2, 0.9) * side, rng.uniform(-0.2, 0.9) * side
            w, h = rng.uniform(0.15, 0.6) * side, rng.uniform(0.15, 0.6) * side
            shape = rng.choice(("ellipse", "rectangle", "triangle"))
            if shape == "ellipse":
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=c)
            elif shape == "rectangle":
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=c)
            else:
                draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + rng.uniform(0, w), y0)], fill=c)
        lab = np.array(label)
        nrng = np.random.default_rng([seed, 11, i])
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) / side
        photo = np.zeros((side, side, 3))
        for c in np.unique(lab):
            crng = np.random.default_rng([seed, 13, int(c)])  # the class's texture, the same in every scene
            theta, freq = crng.uniform(0, np.pi), crng.uniform(4, 24)
            stripes = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
            tex = self.palette[c][None, None, :] * (1 + 0.25 * stripes[..., None])
            photo[lab == c] = tex[lab == c]
        light = nrng.uniform(0.8, 1.2) * (1 + 0.2 * (xx - 0.5))[..., None]
        photo = np.clip(photo * light + nrng.normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
        return label, Image.fromarray(photo)

    def __getitem__(self, index: int) -> dict:
        opt, rng = self.opt, self.item_rng(index)
        label_img, photo = self.scene(index)
        params = get_params(opt, label_img.size, rng)
        item = {"label": to_class_tensor(opt, params, label_img), "image": photo, "path": self.image_paths[index]}
        r = rng.random()
        if r < self.real_reference_probability:
            k, n = opt.synthetic_mixes, len(self)
            same_mix = list(range(index % k, n, k))
            pos = same_mix.index(index)
            if r < self.hard_reference_probability:
                j = rng.choice(same_mix[:pos] + same_mix[pos + 1:])
            else:
                j = same_mix[(pos + 1) % len(same_mix)]
            ref_label, ref_photo = self.scene(j)
            self_ref = 0.0
        else:
            ref_label, ref_photo = label_img, photo
            self_ref = 1.0
        ref_params = get_params(opt, ref_label.size, rng)
        item["image"] = to_image_tensor(opt, params, item["image"])
        item["ref"] = to_image_tensor(opt, ref_params, ref_photo)
        item["label_ref"] = to_class_tensor(opt, ref_params, ref_label)
        item["self_ref"] = torch.tensor(self_ref)
        return item
