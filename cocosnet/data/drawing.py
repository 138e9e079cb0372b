"""Maps the reference builds with OpenCV and scikit-image, in numpy and PIL (neither is a dependency).

- `l1_distance`: cv2.distanceTransform(src, DIST_L1, 3), which is the exact city-block distance.
- `label_edges`: the reference's get_edges (both pixels on either side of a label change).
- `canny`: skimage.feature.canny with its defaults (sigma 1, thresholds 0.1 / 0.2 of the [0, 1]
  range, Sobel magnitude, non-maximum suppression, 8-connected hysteresis). Directions are
  quantised to 4 instead of interpolated, so a few edge pixels differ from scikit-image's.
- `render_pose`: the OpenPose skeleton (18 joints, 17 limbs) and the per-limb masks that the
  reference draws with cv2.circle / ellipse2Poly / fillConvexPoly / addWeighted.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# OpenPose's 1-based joint pairs and colours, as the reference uses them (first 17 limbs drawn).
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
         [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
# The reference draws these on an OpenCV (BGR) canvas and converts to RGB at the end, so each
# triple is (B, G, R); we draw on an RGB canvas with the triples reversed.
_BGR_COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
               [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
               [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
_RGB_COLORS = [tuple(c[::-1]) for c in _BGR_COLORS]
JOINT_RADIUS = 4
STICK_WIDTH = 4


def _l1_passes(d: np.ndarray, axis: int) -> np.ndarray:
    d = np.moveaxis(d, axis, 0).copy()
    for i in range(1, d.shape[0]):
        np.minimum(d[i], d[i - 1] + 1, out=d[i])
    for i in range(d.shape[0] - 2, -1, -1):
        np.minimum(d[i], d[i + 1] + 1, out=d[i])
    return np.moveaxis(d, 0, axis)


def l1_distance(src: np.ndarray) -> np.ndarray:
    """City-block distance of every pixel to the nearest zero pixel of `src` (2-D), float32.

    The L1 distance is separable: a forward and a backward pass per axis give it exactly. With
    no zero pixel at all every distance is "infinite" (a large number, as OpenCV returns).
    """
    big = float(src.shape[0] + src.shape[1]) * 255.0
    d = np.where(src == 0, 0.0, big).astype(np.float32)
    return _l1_passes(_l1_passes(d, 0), 1)


def distance_map(mask: np.ndarray) -> Image.Image:
    """The reference's per-part map: L1 distance to `mask`'s pixels, / 3, clipped to 255, uint8."""
    dist = l1_distance(np.where(mask > 0, 0, 255).astype(np.uint8))
    return Image.fromarray(np.clip(dist / 3, 0, 255).astype(np.uint8))


def label_edges(edge: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Mark (in place, as a boolean OR) both pixels of every horizontal and vertical change of t."""
    dx = t[:, 1:] != t[:, :-1]
    dy = t[1:, :] != t[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(4 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    # scikit-image blurs with zero padding and divides by the blurred all-ones mask, so that the
    # border is not darkened; the same here.
    def blur(a):
        a = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 0, a)
        return np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, a)
    return blur(img) / blur(np.ones_like(img))


def _sobel(a: np.ndarray, axis: int) -> np.ndarray:
    p = np.pad(a, 1, mode="reflect")
    d = p[2:, :] - p[:-2, :] if axis == 0 else p[:, 2:] - p[:, :-2]
    if axis == 0:
        return d[:, :-2] + 2 * d[:, 1:-1] + d[:, 2:]
    return d[:-2, :] + 2 * d[1:-1, :] + d[2:, :]


def canny(gray: np.ndarray, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Canny edges (bool) of a uint8 grayscale image, as skimage.feature.canny's defaults."""
    img = _gaussian_blur(gray.astype(np.float64) / 255.0, sigma)
    gi, gj = _sobel(img, 0), _sobel(img, 1)
    mag = np.hypot(gi, gj)
    # Non-maximum suppression along the gradient direction quantised to 0/45/90/135 degrees.
    angle = (np.rad2deg(np.arctan2(gi, gj)) + 180.0) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int64)
    p = np.pad(mag, 1)
    h, w = mag.shape
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1)]  # (di, dj) for sectors 0..3
    keep = np.zeros_like(mag, dtype=bool)
    for s, (di, dj) in enumerate(offsets):
        n1 = p[1 + di:1 + di + h, 1 + dj:1 + dj + w]
        n2 = p[1 - di:1 - di + h, 1 - dj:1 - dj + w]
        keep |= (sector == s) & (mag >= n1) & (mag >= n2)
    keep[0, :] = keep[-1, :] = keep[:, 0] = keep[:, -1] = False  # scikit-image erodes the border
    strong = keep & (mag >= high)
    weak = keep & (mag >= low)
    edges = strong
    while True:  # grow the strong edges through 8-connected weak pixels until nothing changes
        q = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                grown |= q[1 + di:1 + di + h, 1 + dj:1 + dj + w]
        grown &= weak
        if (grown == edges).all():
            return edges
        edges = grown | edges


def _ellipse_polygon(center, axes, angle_deg: int) -> list[tuple[int, int]]:
    """cv2.ellipse2Poly(center, axes, angle, 0, 360, 1): integer points every degree."""
    a, b = axes
    ca, sa = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    pts = []
    for t in range(0, 361):
        x, y = a * math.cos(math.radians(t)), b * math.sin(math.radians(t))
        p = (round(center[0] + x * ca - y * sa), round(center[1] + x * sa + y * ca))
        if not pts or p != pts[-1]:
            pts.append(p)
    return pts


def _blend(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cv2.addWeighted(a, 0.4, b, 0.6, 0) on uint8 (round half to even, saturate)."""
    return np.clip(np.rint(a.astype(np.float64) * 0.4 + b.astype(np.float64) * 0.6), 0, 255).astype(np.uint8)


def render_pose(candidate: np.ndarray, subset: np.ndarray, size: tuple[int, int]):
    """The skeleton image (RGB PIL, `size` = (w, h)) and the 17 limb masks (uint8 0/255 arrays).

    `candidate` rows are (x, y, score, id); `subset`'s first 18 entries index candidate rows
    per joint, -1 where the joint was not detected (pytorch-openpose's output files).
    """
    w, h = size
    canvas = Image.new("RGB", size)
    draw = ImageDraw.Draw(canvas)
    for i in range(18):
        index = int(subset[i])
        if index == -1:
            continue
        x, y = int(candidate[index][0]), int(candidate[index][1])
        r = JOINT_RADIUS
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_RGB_COLORS[i])
    canvas = np.array(canvas)
    limbs = []
    for i, pair in enumerate(LIMBS):
        index = subset[np.array(pair) - 1]
        if -1 in index:
            limbs.append(np.zeros((h, w), dtype=np.uint8))
            continue
        xs = candidate[index.astype(int), 0]
        ys = candidate[index.astype(int), 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = _ellipse_polygon((int(xs.mean()), int(ys.mean())), (int(length / 2), STICK_WIDTH), int(angle))
        stick = Image.fromarray(canvas)
        ImageDraw.Draw(stick).polygon(poly, fill=_RGB_COLORS[i])
        canvas = _blend(canvas, np.array(stick))
        limb = Image.new("L", size)
        ImageDraw.Draw(limb).polygon(poly, fill=255)
        limbs.append(np.array(limb))
    return Image.fromarray(canvas), limbs
