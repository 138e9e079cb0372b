"""The reference's image transforms (resize, random crop, flip, to tensor), with PIL and numpy only.

One set of random parameters (crop position, flip) is drawn per image and applied to the photo
and to every map made from it, so that label and photo stay aligned. Parameters come from a
`random.Random` the dataset seeds per item, never from the global generator, so that an item's
transform depends on (seed, epoch, index) alone: resumable and the same with any worker count.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "scale_shortside",
                    "scale_shortside_and_crop", "fixed", "none")


def _scaled_size(mode: str, size: tuple[int, int], load: int) -> tuple[int, int]:
    """Size (w, h) after the resize step of `mode`."""
    w, h = size
    if "resize" in mode:
        return load, load
    if "scale_width" in mode:
        return load, int(load * h / w)
    if "scale_shortside" in mode:
        s, long = min(w, h), max(w, h)
        long = int(load * long / s)
        return (load, long) if w <= h else (long, load)
    return w, h


def get_params(opt, size: tuple[int, int], rng: random.Random) -> dict:
    """Crop position and flip for an image of PIL `size` (w, h), as the reference draws them."""
    if opt.preprocess_mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess_mode must be one of {PREPROCESS_MODES}, got {opt.preprocess_mode!r}")
    w, h = _scaled_size(opt.preprocess_mode, size, opt.load_size)
    if "crop" in opt.preprocess_mode and min(w, h) < opt.crop_size:
        raise ValueError(f"crop_size {opt.crop_size} exceeds the {w}x{h} image that preprocess_mode "
                         f"{opt.preprocess_mode!r} makes with load_size {opt.load_size}: use load_size >= crop_size")
    x = rng.randint(0, max(0, w - opt.crop_size))
    y = rng.randint(0, max(0, h - opt.crop_size))
    return {"crop_pos": (x, y), "flip": rng.random() > 0.5}


def transform_pil(opt, params: dict, img: Image.Image, method) -> Image.Image:
    """Resize, crop and flip `img` as the reference's get_transform does (before ToTensor)."""
    mode = opt.preprocess_mode
    size = _scaled_size(mode, img.size, opt.load_size)
    if size != img.size:
        img = img.resize(size, method)
    if "crop" in mode:
        x, y = params["crop_pos"]
        img = img.crop((x, y, x + opt.crop_size, y + opt.crop_size))
    elif mode == "none":  # sides rounded to multiples of 32, as G needs
        w, h = (max(32, round(s / 32) * 32) for s in img.size)
        if (w, h) != img.size:
            img = img.resize((w, h), method)
    elif mode == "fixed":
        img = img.resize((opt.crop_size, round(opt.crop_size / opt.aspect_ratio)), method)
    if opt.isTrain and not opt.no_flip and params["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def to_image_tensor(opt, params: dict, img: Image.Image) -> torch.Tensor:
    """An RGB photo as (3, H, W) float in [-1, 1] (bicubic, Normalize(0.5, 0.5))."""
    arr = np.asarray(transform_pil(opt, params, img.convert("RGB"), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_class_tensor(opt, params: dict, img: Image.Image) -> torch.Tensor:
    """A class-index map as (1, H, W) int64 (nearest: indices are never interpolated)."""
    arr = np.array(transform_pil(opt, params, img, Image.NEAREST), dtype=np.int64)
    return torch.from_numpy(arr)[None]


def to_unit_tensor(opt, params: dict, img: Image.Image, method=Image.NEAREST) -> torch.Tensor:
    """A uint8 map as (C, H, W) float in [0, 1] (torchvision's ToTensor without normalisation)."""
    arr = np.array(transform_pil(opt, params, img, method), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
