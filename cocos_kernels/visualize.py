"""Where do query points match in the exemplar? A picture instead of an index table.

`plot_matches` draws the input and the exemplar side by side with an arrow from each chosen query
point to its best match (`correspondence_argmax`), and under them one heat map per point: that
point's softmax weights over the exemplar (what `correspondence_warp` averages with), computed for
those few rows only, never the whole matrix.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .extras import require
from .features import DEFAULT_EPS, normalize_features
from .ops.correspondence_topk import correspondence_argmax


def _as_image(x: torch.Tensor, name: str):
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be a (3, H, W) or (1, 3, H, W) image in [0, 1], got shape {tuple(x.shape)}")
    return x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _grid_points(hq: int, wq: int, n: int) -> list[tuple[int, int]]:
    """About n points spread over the query grid, away from the border."""
    rows = max(1, round(n ** 0.5))
    cols = -(-n // rows)
    ys = torch.linspace(0, hq - 1, rows + 2)[1:-1].round().long().tolist()
    xs = torch.linspace(0, wq - 1, cols + 2)[1:-1].round().long().tolist()
    return [(y, x) for y in ys for x in xs][:n]


def plot_matches(
    query_image: torch.Tensor,
    exemplar_image: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    points: list[tuple[int, int]] | None = None,
    *,
    n_points: int = 6,
    temperature: float = 0.01,
    center: str | None = "channel",
    patch_size: int = 1,
    eps: float = DEFAULT_EPS,
    out: str | Path | None = None,
    title: str | None = None,
):
    """Figure of the best matches and softmax heat maps of a few query points (batch of one).

    Args:
        query_image, exemplar_image: (3, H, W) images in [0, 1] (any resolution; points are
            drawn at the matching place).
        query, key: (1, C, Hq, Wq) and (1, C, Hk, Wk) features.
        points: (row, col) positions on the query grid; default `n_points` spread over it.
        out: write a PNG there as well.

    Returns:
        the matplotlib Figure.
    """
    require("cocos_kernels.visualize.plot_matches", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import ConnectionPatch

    if query.dim() != 4 or key.dim() != 4 or query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"query and key must be single (1, C, H, W) feature maps, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    qi, ei = _as_image(query_image, "query_image"), _as_image(exemplar_image, "exemplar_image")
    hq, wq = query.shape[2:]
    hk, wk = key.shape[2:]
    points = _grid_points(hq, wq, n_points) if points is None else list(points)
    for y, x in points:
        if not (0 <= y < hq and 0 <= x < wq):
            raise ValueError(f"point {(y, x)} lies outside the query grid {(hq, wq)}")
    indices, similarity = correspondence_argmax(query, key, center=center, patch_size=patch_size, eps=eps)

    # Softmax rows of the chosen points only: (P, Nk).
    with torch.no_grad():
        qf = normalize_features(query.double(), center, True, patch_size, eps)[0]  # (D, Nq)
        kf = normalize_features(key.double(), center, True, patch_size, eps)[0]  # (D, Nk)
        rows = torch.tensor([y * wq + x for y, x in points])
        weights = torch.softmax(qf[:, rows].T @ kf / temperature, dim=-1).view(-1, 1, hk, wk)
        weights = F.interpolate(weights.float(), size=ei.shape[:2], mode="nearest")[:, 0].cpu().numpy()

    cols = max(2, len(points))
    fig = plt.figure(figsize=(2.2 * cols, 2.2 * cols / 2 + 2.6), dpi=100)
    grid = fig.add_gridspec(2, cols, height_ratios=[cols / 2, 1])
    ax_q = fig.add_subplot(grid[0, : cols // 2])
    ax_e = fig.add_subplot(grid[0, cols // 2:])
    ax_q.imshow(qi)
    ax_e.imshow(ei)
    ax_q.set_title("input: query points")
    ax_e.set_title("exemplar: best match (argmax)")
    colours = plt.cm.tab10.colors

    def to_pixels(y, x, grid_hw, image):
        return (x + 0.5) * image.shape[1] / grid_hw[1], (y + 0.5) * image.shape[0] / grid_hw[0]

    for i, (y, x) in enumerate(points):
        v = int(indices[0, y, x])
        src = to_pixels(y, x, (hq, wq), qi)
        dst = to_pixels(v // wk, v % wk, (hk, wk), ei)
        colour = colours[i % len(colours)]
        ax_q.plot(*src, "o", color=colour, markersize=7, markeredgecolor="white")
        ax_e.plot(*dst, "o", color=colour, markersize=7, markeredgecolor="white")
        fig.add_artist(ConnectionPatch(xyA=src, coordsA=ax_q.transData, xyB=dst, coordsB=ax_e.transData,
                                       color=colour, arrowstyle="->", linewidth=1.5))
        ax_h = fig.add_subplot(grid[1, i]) if i < cols else None
        if ax_h is not None:
            ax_h.imshow(ei)
            ax_h.imshow(weights[i], cmap="magma", alpha=0.7)
            ax_h.plot(*dst, "+", color=colour, markersize=10)
            ax_h.set_title(f"point {i}: sim {float(similarity[0, y, x]):.2f}", fontsize=8, color=colour)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"softmax weights at temperature {temperature} (bottom row)", fontsize=10)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    return fig
