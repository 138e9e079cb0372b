"""Exemplar-based warping on real CoCosNet samples, with hand-made features instead of trained networks.

    python -m cocos_kernels.demo                      # CelebA-HQ masks -> faces, outputs/demo.png
    python -m cocos_kernels.demo --dataset ade20k --pairs 5

CoCosNet learns two networks that map a label map and a photo into one feature space, then
warps the exemplar photo onto the label map's layout through softmax(cosine similarity / 0.01).
The bundled samples come with label maps for the exemplar photos too, so features built from the
labels alone stand in for the trained networks, and the picture shows what the warp itself does:
at the feature grid CoCosNet uses (1/4 of the image side) and at full resolution, where the
similarity matrix would not fit in memory without a fused backend.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cocos_kernels.extras import require

require("python -m cocos_kernels.demo", "PIL", "tqdm", "matplotlib")
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cocos_kernels as ck  # noqa: E402
from cocos_kernels.visualize import plot_matches  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "cocosnet-samples"
DATASETS = ("celebahq", "ade20k")
TEMPERATURE = 0.01  # CoCosNet's

# CelebAMask-HQ part names by class index (0 = background) in the merged
# `all_parts_except_glasses` maps; eye_g (glasses) is left out of those maps.
CELEBA_PARTS = ("background", "skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear",
                "nose", "u_lip", "mouth", "l_lip", "neck", "cloth", "hat", "eye_g", "ear_r", "neck_l")
# The per-part masks overlap (skin lies under nose, eyes, ...): painting them in CelebAMask-HQ's own
# order (its g_mask.py; later parts win) gives the merged maps, for samples with per-part masks only.
CELEBA_PAINT_ORDER = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
                      "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")

# Feature design: see `label_features`.
SMOOTH_SIGMA = 0.015  # label blur, as a fraction of the image side
BOX_FREQS, BOX_ENERGY = (1, 2, 4), 1.0  # position within the class's box, against the one-hot's 1
ABSOLUTE_FREQS, ABSOLUTE_ENERGY = (1,), 0.25  # position in the image
# Largest --size for the reference backend: its full-resolution warp holds several float32
# (size^2 x size^2) matrices, 1 GiB each at 128.
REFERENCE_MAX_SIZE = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cocos_kernels.demo",
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="the sample folder, laid out as the CoCosNet reference code reads it, with "
                        "lists/<dataset>_ref_test.txt pairing lists (default: %(default)s)")
    p.add_argument("--dataset", choices=DATASETS, default="celebahq",
                   help="celebahq: CelebAMask-HQ face part masks -> CelebA-HQ faces; ade20k: ADE20K "
                        "scene label maps -> photos (default: %(default)s)")
    p.add_argument("--size", type=int, default=256,
                   help="image side in pixels, a multiple of 4; the coarse warp runs on a size/4 "
                        "feature grid as in CoCosNet, the full-resolution warp on size x size "
                        "(default: %(default)s)")
    p.add_argument("--pairs", type=int, default=3,
                   help="how many input/exemplar pairs to show, from the top of the pairing list "
                        "(default: %(default)s)")
    p.add_argument("--backend", choices=ck.backend_names(), default="auto",
                   help="correspondence_warp backend for the demo's CPU tensors; 'auto' picks the fused "
                        "CPU kernel (built on first use) where it can, 'reference' materialises the "
                        "matrix, so only --size 128 or less fits (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo.png"),
                   help="where to write the PNG grid, one row per pair (default: %(default)s)")
    args = p.parse_args(argv)
    if args.size < 16 or args.size % 4:
        p.error(f"--size must be a multiple of 4 and at least 16, got {args.size}")
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")
    pairs = args.data / "lists" / f"{args.dataset}_ref_test.txt"
    if not pairs.is_file():
        p.error(f"--data {args.data}: no pairing list {pairs} (the folder must be laid out as "
                "data/cocosnet-samples is)")
    return args


# ---------------------------------------------------------------------------------------- data

def read_pairs(root: Path, dataset: str) -> list[tuple[str, str]]:
    """(input, exemplar) file names from the pairing list; extra exemplars on a line are ignored."""
    lines = (root / "lists" / f"{dataset}_ref_test.txt").read_text().splitlines()
    return [tuple(line.split(",")[:2]) for line in lines if line.strip()]


def load_celebahq(root: Path, name: str) -> tuple[np.ndarray, Path]:
    """Part label map and photo path of CelebA-HQ image `name` (e.g. "29922.jpg")."""
    idx = int(Path(name).stem)
    # Samples with merged maps live in celebahq/; those with per-part masks only in celebahqedge/.
    for folder in (root / "celebahq", root / "celebahqedge"):
        masks = folder / "CelebAMask-HQ-mask-anno"
        merged = masks / "all_parts_except_glasses" / f"{idx:05d}.png"
        if merged.is_file():
            return np.array(Image.open(merged).convert("L")), folder / "CelebA-HQ-img" / name
        parts = {p: masks / str(idx // 2000) / f"{idx:05d}_{p}.png" for p in CELEBA_PAINT_ORDER}
        if parts["skin"].is_file():
            label = np.zeros(Image.open(parts["skin"]).size[::-1], np.uint8)
            for part, path in parts.items():
                if path.is_file():
                    label[np.array(Image.open(path).convert("L")) > 127] = CELEBA_PARTS.index(part)
            return label, folder / "CelebA-HQ-img" / name
    raise FileNotFoundError(f"no CelebAMask-HQ masks for {name} under {root}")


def load_ade20k(root: Path, name: str) -> tuple[np.ndarray, Path]:
    """Class label map (0 = other, 1..150) and photo path of ADE20K image `name`."""
    for split in ("validation", "training"):
        photo = root / "ade20k" / split / name
        if photo.is_file():
            return np.array(Image.open(photo.with_suffix(".png")).convert("L")), photo
    raise FileNotFoundError(f"no ADE20K image {name} under {root / 'ade20k'}")


LOADERS = {"celebahq": load_celebahq, "ade20k": load_ade20k}


def resize_label(label: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.fromarray(label).resize((size, size), Image.NEAREST))).long()


def load_photo(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


# ------------------------------------------------------------------------------------ features

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(-1, 1, 1, 2 * radius + 1), groups=x.shape[1])
    return F.conv2d(x, k.view(-1, 1, 2 * radius + 1, 1), groups=x.shape[1])


def region_coordinates(label: torch.Tensor) -> torch.Tensor:
    """(2, H, W): each pixel's x and y in [0, 1] across the bounding box of its own class."""
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in label.shape), indexing="ij")
    coords = torch.zeros(2, *label.shape)
    for k in label.unique():
        mask = label == k
        for c, axis in enumerate((xs, ys)):
            lo, hi = axis[mask].min(), axis[mask].max()
            coords[c][mask] = (axis[mask] - lo) / (hi - lo).clamp(min=1)
    return coords


def fourier(coords: torch.Tensor, freqs: tuple[int, ...], energy: float) -> torch.Tensor:
    """cos/sin of pi * f * coords: distinct positions get distinct features of one norm, sqrt(energy).

    Each channel also appears negated, so the channel sum is zero and the op's channel centring
    (CoCosNet's PONO_C) leaves the positional part alone.
    """
    angles = torch.cat([coords * math.pi * f for f in freqs])
    enc = torch.cat([angles.cos(), angles.sin()])
    return torch.cat([enc, -enc]) * math.sqrt(energy / (4 * len(freqs)))


def label_features(label: torch.Tensor, classes: torch.Tensor, shared: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, D, grid, grid) features of a full-size label map, made by hand.

    At tau = 0.01 a cosine step of 0.01 is one logit, so the wanted matches must be tens of 0.01
    steps more similar than the rest. Costs below are in logits, measured on these features.
    - One-hot of the classes present in either image, area-pooled to the grid and blurred: a
      class mismatch costs ~50, so colours come from the matching region. The blur makes pixels
      near a border prefer exemplar pixels near the same kind of border (skin by the hairline).
    - Where a pixel sits within its class's bounding box, for the classes both images have
      (`shared`): without it every pixel of a region ties with every other and gets the region's
      flat mean colour; with it the warp stretches the exemplar's region onto the input's,
      keeping its shading and layout (left hair stays left). Box-relative rather than absolute,
      as regions differ in place and size between the images. Frequencies 1, 2, 4 give a
      Gaussian-like window of sigma ~2.5% of the box (one frequency: ~7%, visibly blurrier; more
      frequencies copy exemplar details such as make-up into odd places), and a same-class pixel
      30% of the box away (~27) still beats every other class.
    - A weak absolute position: a class the exemplar lacks (ADE20K's "field" against "grass") has
      no box to match, and takes the colours found at the same place in the exemplar instead of
      a mix of every region. For matched pixels it costs only ~3 at a third of the image.
    """
    size = label.shape[-1]
    onehot = (label[None] == classes[:, None, None]).float()[None]
    onehot = F.adaptive_avg_pool2d(onehot, grid)
    onehot = gaussian_blur(onehot, SMOOTH_SIGMA * grid)

    in_box = fourier(region_coordinates(label), BOX_FREQS, BOX_ENERGY) * torch.isin(label, shared)
    xy = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, size)] * 2, indexing="xy"))
    pos = torch.cat([in_box, fourier(xy, ABSOLUTE_FREQS, ABSOLUTE_ENERGY)])[None]
    # Nearest, not pooled, to the grid: pooling would mix the boxes of neighbouring classes.
    pos = F.interpolate(pos, size=(grid, grid), mode="nearest") if grid != size else pos
    return torch.cat([onehot, pos], dim=1)


def pair_features(input_label: torch.Tensor, exemplar_label: torch.Tensor, grid: int):
    """Query and key features of a pair, on one channel layout."""
    classes = torch.cat([input_label.unique(), exemplar_label.unique()]).unique()
    shared = input_label.unique()[torch.isin(input_label.unique(), exemplar_label.unique())]
    return tuple(label_features(label, classes, shared, grid) for label in (input_label, exemplar_label))


# ------------------------------------------------------------------------------------- drawing

def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (as CoCosNet colourises label maps): (n, 3) uint8."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def draw_grid(rows: list[list[Image.Image]], titles: list[str], size: int) -> Image.Image:
    """Tiles in rows under a header of column titles."""
    font_size = max(8, size // 16)
    font = ImageFont.load_default(size=font_size)
    pad, header = max(2, size // 64), 3 * font_size  # two-line titles
    width = len(titles) * (size + pad) + pad
    sheet = Image.new("RGB", (width, header + len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        x = pad + c * (size + pad) + size // 2
        draw.multiline_text((x, header // 2), title, fill="black", font=font, anchor="mm", align="center")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (pad + c * (size + pad), header + r * (size + pad)))
    return sheet


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> Path:
    args = parse_args(argv)
    size, grid = args.size, args.size // 4
    try:
        backend = ck.select(args.backend, torch.device("cpu"), torch.float32)
    except ValueError as e:
        sys.exit(str(e))
    matrix_bytes = 4 * size**4
    if not backend.fused and size > REFERENCE_MAX_SIZE:
        sys.exit(f"backend {backend.name!r} materialises the {size * size} x {size * size} matrix "
                 f"({matrix_bytes / 2**30:.0f} GiB) for the full-resolution warp: use a fused backend "
                 f"or --size {REFERENCE_MAX_SIZE} or less")
    pairs = read_pairs(args.data, args.dataset)[: args.pairs]
    load = LOADERS[args.dataset]
    colours = palette(256)

    rows, full_times = [], []
    matches_out = args.out.with_name(f"{args.out.stem}_matches.png")
    for i, (input_name, exemplar_name) in enumerate(tqdm(pairs, desc=f"warping {args.dataset} pairs", unit="pair")):
        input_label, input_photo = load(args.data, input_name)
        exemplar_label, exemplar_photo = load(args.data, exemplar_name)
        input_label, exemplar_label = resize_label(input_label, size), resize_label(exemplar_label, size)
        exemplar = load_photo(exemplar_photo, size)

        # CoCosNet's warp: features on a size/4 grid, the exemplar average-pooled to that grid.
        query, key = pair_features(input_label, exemplar_label, grid)
        warped_grid = ck.correspondence_warp(query, key, F.avg_pool2d(exemplar, 4), TEMPERATURE,
                                             backend=args.backend)
        warped_grid = F.interpolate(warped_grid, size=(size, size), mode="bilinear", align_corners=False)

        if i == 0:  # where a few input positions match in the exemplar, for the first pair
            input_image = torch.from_numpy(colours[input_label.numpy()]).permute(2, 0, 1).float() / 255
            plot_matches(input_image, exemplar[0], query, key, temperature=TEMPERATURE, out=matches_out,
                         title=f"{args.dataset}: {input_name} -> {exemplar_name}, {grid}x{grid} feature grid")

        query, key = pair_features(input_label, exemplar_label, size)
        start = time.perf_counter()
        warped_full = ck.correspondence_warp(query, key, exemplar, TEMPERATURE, backend=args.backend)
        full_times.append(time.perf_counter() - start)

        truth = (Image.open(input_photo).convert("RGB").resize((size, size), Image.BICUBIC)
                 if input_photo.is_file() else Image.new("RGB", (size, size), "lightgray"))
        rows.append([Image.fromarray(colours[input_label.numpy()]), to_image(exemplar),
                     to_image(warped_grid), to_image(warped_full), truth])

    titles = ["input label map", "exemplar photo", f"warped, {grid}x{grid}\ngrid upsampled",
              f"warped, full res\n{size}x{size}", "ground truth\n(input's photo)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(rows, titles, size).save(args.out)

    n = size * size
    print(f"backend: {backend.name} ({'fused' if backend.fused else 'materialised'})")
    print(f"full-resolution warp, {n:,} x {n:,} positions: {np.mean(full_times):.2f} s per pair "
          f"(the materialised float32 similarity matrix alone would take {matrix_bytes / 2**30:.2f} GiB)")
    print(f"wrote {args.out} ({len(rows)} pairs) and {matches_out} (best matches of a few points)")
    return args.out


if __name__ == "__main__":
    main()
