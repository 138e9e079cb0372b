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
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import cocos_kernels as ck

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "cocosnet-samples"
DATASETS = ("celebahq", "ade20k")
TEMPERATURE = 0.01  # CoCosNet's

# CelebAMask-HQ part names by class index (0 = background) in the merged
# `all_parts_except_glasses` maps; eye_g (glasses) is left out of those maps.
CELEBA_PARTS = ("background", "skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear",
                "nose", "u_lip", "mouth", "l_lip", "neck", "cloth", "hat", "eye_g", "ear_r", "neck_l")
# The per-part masks overlap (skin lies under nose, eyes, ...): painting them in CelebAMask-HQ's own
# order, small parts last, gives the merged maps. Used for the samples that only ship per-part masks.
CELEBA_PAINT_ORDER = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
                      "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")

# Feature design (see `label_features`). With tau = 0.01 a cosine step of 0.01 is one nat of logit.
SMOOTH_SIGMA = 0.015  # label blur, as a fraction of the image side
POS_FREQS = (1, 2, 4)
POS_ENERGY = 1.0
# Above this the reference backend's (Nq x Nk) float32 matrix (it holds several) is refused.
REFERENCE_LIMIT_BYTES = 1 << 30


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
                   help="correspondence_warp backend; 'auto' takes the fastest fused one available "
                        "('reference' materialises the matrix, so only small --size fits) "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo.png"),
                   help="where to write the PNG grid, one row per pair (default: %(default)s)")
    args = p.parse_args(argv)
    if args.size < 16 or args.size % 4:
        p.error(f"--size must be a multiple of 4 and at least 16, got {args.size}")
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")
    return args


# ---------------------------------------------------------------------------------------- data

def read_pairs(root: Path, dataset: str) -> list[tuple[str, str]]:
    """(input, exemplar) file names from the pairing list; extra exemplars on a line are ignored."""
    lines = (root / "lists" / f"{dataset}_ref_test.txt").read_text().split()
    return [tuple(line.split(",")[:2]) for line in lines]


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
            label = None
            for part, path in parts.items():
                if path.is_file():
                    mask = np.array(Image.open(path).convert("L")) > 127
                    label = np.zeros(mask.shape, np.uint8) if label is None else label
                    label[mask] = CELEBA_PARTS.index(part)
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
    H, W = label.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    coords = torch.zeros(2, H, W)
    for k in label.unique():
        mask = label == k
        for c, grid in enumerate((xs, ys)):
            lo, hi = grid[mask].min(), grid[mask].max()
            coords[c][mask] = (grid[mask] - lo) / (hi - lo).clamp(min=1)
    return coords


def label_features(label: torch.Tensor, classes: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, len(classes) + 8, grid, grid) features of a full-size label map, made by hand.

    - One-hot of the classes present in either image of the pair, area-pooled to the grid and
      blurred: same class is cosine ~1, different classes ~0, i.e. ~100 logits apart at tau = 0.01,
      so colours only ever come from the matching region. The blur makes pixels near a border
      prefer exemplar pixels near the same kind of border (skin by the hairline, not mid-cheek).
    - Where each pixel sits within its class's bounding box, as sin/cos of pi * [0, 1], so that
      distinct positions have distinct features at equal norm: without it every pixel of a
      region ties with every other and gets the region's flat mean colour; with it the warp
      stretches the exemplar's region onto the input's, keeping shading and layout (left hair
      stays left). Box-relative rather than absolute, because regions differ in place and size
      between the two images. POS_WEIGHT = 0.5 makes it weak: for two same-class pixels it costs
      about (d / 0.064)^2 / 2 logits at box-relative distance d, a soft window a few percent of
      the region wide, and even opposite corners (~100 logits) never beat a class mismatch.
      Each channel also appears negated, so the channel sum is zero and the op's channel
      centring (CoCosNet's PONO_C) leaves this part alone.
    """
    size = label.shape[-1]
    onehot = (label[None] == classes[:, None, None]).float()[None]
    onehot = F.adaptive_avg_pool2d(onehot, grid)
    onehot = gaussian_blur(onehot, SMOOTH_SIGMA * grid)

    angles = torch.cat([region_coordinates(label) * math.pi * f for f in POS_FREQS])
    pos = torch.cat([angles.cos(), angles.sin()])[None]
    # Nearest-in-box coordinates at the grid: pooling them would mix boxes of different classes.
    pos = F.interpolate(pos, size=(grid, grid), mode="nearest") if grid != size else pos
    pos = torch.cat([pos, -pos], dim=1) * math.sqrt(POS_ENERGY / pos.shape[1])
    return torch.cat([onehot, pos], dim=1)


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
    font = ImageFont.load_default(size=max(8, size // 16))
    pad, header = max(2, size // 64), max(12, size // 6)
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
    backend = ck.select(args.backend, torch.device("cpu"), torch.float32)
    matrix_bytes = 4 * size**4
    if not backend.fused and matrix_bytes > REFERENCE_LIMIT_BYTES:
        sys.exit(f"backend {backend.name!r} materialises the {size * size} x {size * size} matrix "
                 f"({matrix_bytes / 2**30:.0f} GiB) for the full-resolution warp: use a fused backend "
                 f"or --size {int((REFERENCE_LIMIT_BYTES / 4) ** 0.25) // 4 * 4} or less")
    pairs = read_pairs(args.data, args.dataset)[: args.pairs]
    load = LOADERS[args.dataset]
    colours = palette(256)

    rows, full_times = [], []
    for input_name, exemplar_name in tqdm(pairs, desc=f"warping {args.dataset} pairs", unit="pair"):
        input_label, input_photo = load(args.data, input_name)
        exemplar_label, exemplar_photo = load(args.data, exemplar_name)
        input_label, exemplar_label = resize_label(input_label, size), resize_label(exemplar_label, size)
        exemplar = load_photo(exemplar_photo, size)
        classes = torch.cat([input_label.unique(), exemplar_label.unique()]).unique()

        # CoCosNet's warp: features on a size/4 grid, the exemplar average-pooled to that grid.
        warped_grid = ck.correspondence_warp(
            label_features(input_label, classes, grid), label_features(exemplar_label, classes, grid),
            F.avg_pool2d(exemplar, 4), TEMPERATURE, backend=args.backend,
        )
        warped_grid = F.interpolate(warped_grid, size=(size, size), mode="bilinear", align_corners=False)

        query, key = label_features(input_label, classes, size), label_features(exemplar_label, classes, size)
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
    print(f"wrote {args.out} ({len(rows)} pairs)")
    return args.out


if __name__ == "__main__":
    main()
