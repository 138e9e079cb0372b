"""The window form of k x k patch features (windows.py): no D-wide unfold on backends with window kernels."""
import contextlib

import pytest
import torch

import cocos_kernels as ck
import cocos_kernels.features as features
from cocos_kernels.testing import assert_close
from cocos_kernels.windows import from_centres, to_centres, window_count, window_features
from test_correspondence_warp import OP, make_inputs, materialised

@contextlib.contextmanager
def unfold_forbidden():
    """Fails the code inside that runs the D-wide patch unfold."""
    real_unfold = features._unfold

    def forbidden(x, patch_size):
        if patch_size > 1:
            raise AssertionError("the D-wide unfold ran")
        return real_unfold(x, patch_size)

    features._unfold = forbidden
    try:
        yield
    finally:
        features._unfold = real_unfold


@pytest.mark.backends(OP, [torch.float32], features=("windows",))
def test_patches_are_never_unfolded(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 17, 5, (6, 5), (4, 7)), dtype, device))
    with unfold_forbidden():
        out = ck.correspondence_warp(q, k, v, patch_size=3, backend=backend)
        out.sum().backward()
    ref = ck.reference.correspondence_warp(*(t.detach().double() for t in (q, k, v)), patch_size=3)
    assert_close(out, ref, materialised(*(t.detach() for t in (q, k, v)), patch_size=3), name="out")


@pytest.mark.parametrize("center", ["channel", None])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("patch_size", [3, 5])
def test_window_scalars_match_the_unfolded_features(center, normalize, patch_size):
    # The window means and factors reproduce the unfolded, centred, normalised features' scores.
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64) + 3.0  # a common offset the shift removes
    y = torch.randn(2, 6, 4, 3, dtype=torch.float64) - 2.0
    wx, wy = (window_features(t, center, normalize, patch_size, 1e-9, torch.float64) for t in (x, y))
    fx, fy = (features.normalize_features(t, center, normalize, patch_size, 1e-9) for t in (x, y))
    expected = fx.transpose(1, 2) @ fy  # (B, Nx, Ny)
    r, D = patch_size // 2, 6 * patch_size ** 2
    taps = [(dy * wx.width + dx, dy * wy.width + dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    nx, ny = window_count(5, 7, patch_size), window_count(4, 3, patch_size)
    lo_x, lo_y = r * wx.width + r, r * wy.width + r
    raw = sum(wx.rows[:, lo_x + a:lo_x + a + nx] @ wy.rows[:, lo_y + b:lo_y + b + ny].transpose(1, 2) for a, b in taps)
    scores = (raw - D * wx.mean[:, :, None] * wy.mean[:, None, :]) * wx.inv[:, :, None] * wy.inv[:, None, :]
    got = from_centres(from_centres(scores, 4, 3, patch_size).flatten(2).transpose(1, 2), 5, 7, patch_size)
    assert_close(got.flatten(2).transpose(1, 2), expected, rtol=1e-12, name="scores")


def test_centre_range_round_trip():
    x = torch.randn(2, 3, 4, 5)
    c = to_centres(x, 3)
    assert c.shape == (2, 3, window_count(4, 5, 3))
    assert torch.equal(from_centres(c, 4, 5, 3), x)
