"""The warp on prepared maps: the layer between the fused ops and a backend's kernels object.

A feature map is prepared once (`WarpCore.prepare`): rows (B, N, D) of its (patch-unfolded,
centred, normalised) features, or, for k x k patches on a backend declaring "windows" with a
centring that has a window form, its window features (windows.py: C-wide rows on a padded grid
and per-centre scalars, no D-wide unfold). `forward` and `backward` take two prepared maps (query
side, key side) and return results on the maps' grids; `backward` returns the gradients w.r.t.
the prepared forms, which add up across several passes over the same map (`add_grads`), and
`prepared_backward` takes such a gradient back to the feature map.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..constants import WINDOW_CENTERS
from ..dispatch import BACKENDS
from ..features import compute_dtype, normalize_features, normalize_features_backward
from ..kernels import WarpKernels
from ..windows import Windows, from_centres, sum_tap_planes, to_centres, window_features, window_features_backward
from .warp_options import WarpOptions


class Prepared(NamedTuple):
    """One feature map, prepared for the kernels."""

    x: Tensor  # the (B, C, H, W) feature map
    rows: Tensor | None  # (B, N, D) contiguous rows in the kernels' input dtype (None: windows)
    windows: Windows | None  # the window form (None: rows)

    def released(self) -> Prepared:
        """This map without its rows: what `prepared_backward` still needs."""
        return self._replace(rows=None)


def add_grads(a, b):
    """The sum of two gradients w.r.t. one prepared map (see `WarpCore.backward`); None is zero."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, Tensor):
        return a + b
    return tuple(x + y for x, y in zip(a, b))


def _flat(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, C, H, W) -> contiguous (B, C, H*W) in `dtype`."""
    return x.reshape(x.shape[0], x.shape[1], -1).to(dtype).contiguous()


class WarpCore:
    """A backend's kernels with one call's options (their precision resolved: not None)."""

    def __init__(self, backend: str, options: WarpOptions):
        declared = BACKENDS[backend].features
        self.kernels: WarpKernels = BACKENDS[backend].kernels()
        self.prologue = options.prologue
        self.center, self.normalize, self.patch_size, self.eps = self.prologue
        # Patches without the unfold where the backend declares the window kernels (see windows.py).
        self.windows = self.patch_size > 1 and self.center in WINDOW_CENTERS and "windows" in declared
        self._precision = {"precision": options.precision} if "precision" in declared else {}

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.kernels.input_dtype(dtype)

    def prepare(self, x: Tensor) -> Prepared:
        it, ct = self.input_dtype(x.dtype), compute_dtype(x.dtype)
        if self.windows:
            return Prepared(x, None, window_features(x, self.center, self.normalize, self.patch_size, self.eps, it, ct))
        rows = self.kernels.prepare_features(x, *self.prologue, it)
        if rows is None:  # the backend leaves this prologue to PyTorch
            rows = normalize_features(x.to(ct), *self.prologue).transpose(1, 2).contiguous().to(it)
        return Prepared(x, rows, None)

    def prepared_backward(self, grad, p: Prepared) -> Tensor:
        """Gradient w.r.t. p.x (in p.x's dtype) given `grad` w.r.t. the prepared form."""
        x = p.x
        if self.windows:
            d_rows, sums = grad
            dx = window_features_backward(p.windows, d_rows, sums, x.shape, self.center, self.normalize,
                                          self.patch_size)
            return dx.to(x.dtype).contiguous()
        dx = self.kernels.prepare_features_backward(grad, x, *self.prologue)
        if dx is None:
            ct = compute_dtype(x.dtype)
            dx = normalize_features_backward(grad.transpose(1, 2).to(ct), x.to(ct), *self.prologue)
        return dx.to(x.dtype)

    def _key_mask(self, pk: Prepared, key_mask: Tensor | None) -> dict:
        if self.windows:
            # (B, N) on the key's centre range: False at padding centres and masked keys.
            keep = torch.ones_like(pk.x[:, :1], dtype=torch.bool) if key_mask is None else key_mask[:, None]
            return {"key_mask": to_centres(keep, self.patch_size, fill=False)[:, 0].contiguous()}
        return {"key_mask": None if key_mask is None else key_mask.reshape(key_mask.shape[0], -1).contiguous()}

    def _to_kernel(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, C, H, W) -> (B, C, N) as the kernels take it: on the centre range for windows."""
        return to_centres(t.to(dtype), self.patch_size) if self.windows else _flat(t, dtype)

    def _from_kernel(self, t: Tensor, like: Tensor) -> Tensor:
        """(B, C, N) from the kernels -> (B, C, H, W) on the grid of `like`."""
        H, W = like.shape[2:]
        return from_centres(t, H, W, self.patch_size).contiguous() if self.windows else t.view(*t.shape[:2], H, W)

    def forward(self, pq: Prepared, pk: Prepared, value: Tensor, key_mask: Tensor | None,
                scale: float) -> tuple[Tensor, Tensor]:
        """out (B, Cv, Hq, Wq) in the kernels' input dtype, lse (B, Hq*Wq): the warp of `value` (B, Cv, Hk, Wk)
        from pk's grid to pq's; keys where key_mask (B, Hk, Wk) is False get no weight."""
        v = self._to_kernel(value, self.input_dtype(pq.x.dtype))
        mask = self._key_mask(pk, key_mask)
        if self.windows:
            wq, wk = pq.windows, pk.windows
            out, lse = self.kernels.correspondence_warp_windows_forward(
                wq.rows, wq.mean, wq.inv, wk.rows, wk.mean, wk.inv, v, self.patch_size, wq.width, wk.width, scale,
                **mask, **self._precision)
            lse = self._from_kernel(lse[:, None], pq.x).reshape(lse.shape[0], -1).contiguous()
        else:
            out, lse = self.kernels.correspondence_warp_forward(pq.rows, pk.rows, v, scale, **mask, **self._precision)
        return self._from_kernel(out, pq.x), lse

    def backward(self, grad_out: Tensor, pq: Prepared, pk: Prepared, value: Tensor, out: Tensor, lse: Tensor,
                 key_mask: Tensor | None, scale: float, need_q: bool, need_k: bool, need_v: bool):
        """(gq, gk, dv) of `forward` given grad_out w.r.t. its out: gq / gk w.r.t. the prepared forms (rows:
        (B, N, D); windows: (d_rows (B, L, C) on the padded grid, per-centre sums (2, B, N))), dv (B, Cv, Hk, Wk),
        float32 (float64 for float64 inputs); None where not requested."""
        it = self.input_dtype(pq.x.dtype)
        mask = self._key_mask(pk, key_mask)
        g, v, o = (self._to_kernel(t, it) for t in (grad_out, value, out))
        if self.windows:
            wq, wk = pq.windows, pk.windows
            B, _, Hq, Wq = pq.x.shape
            # +inf at the padding centres: their P rows are 0 (their grad_out is 0 too)
            lse = to_centres(lse.view(B, 1, Hq, Wq), self.patch_size, fill=float("inf"))[:, 0].contiguous()
            dxq, dxk, dv, rows, cols = self.kernels.correspondence_warp_windows_backward(
                g, wq.rows, wq.mean, wq.inv, wk.rows, wk.mean, wk.inv, v, o, lse, self.patch_size, wq.width,
                wk.width, scale, need_q, need_k, need_v, **mask, **self._precision)
            if self.kernels.window_tap_planes:
                dxq = sum_tap_planes(dxq, wq.rows, wq.width, self.patch_size)
                dxk = sum_tap_planes(dxk, wk.rows, wk.width, self.patch_size)
            gq = (dxq, rows) if need_q else None
            gk = (dxk, cols) if need_k else None
        else:
            gq, gk, dv = self.kernels.correspondence_warp_backward(g, pq.rows, pk.rows, v, o, lse, scale, need_q,
                                                                   need_k, need_v, **mask, **self._precision)
        return gq, gk, None if dv is None else self._from_kernel(dv, pk.x)
