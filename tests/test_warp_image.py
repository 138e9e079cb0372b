"""warp_image: full-resolution patch warp and pooled warp, built on correspondence_warp."""
import pytest
import torch
import torch.nn.functional as F

import cocos_kernels as ck
from cocos_kernels.testing import assert_close
from test_correspondence_warp import OP, make_inputs


def _inputs(dtype, device, stride=4):
    q, k, _ = make_inputs((2, 17, 1, (5, 6), (4, 7)), dtype, device)
    exemplar = torch.randn(2, 3, 4 * stride, 7 * stride, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    return q, k, exemplar


def _reference_patch_warp(q, k, exemplar, s):
    # The reference code's warp_patch: unfold s x s patches, warp the 3*s*s channels, fold.
    B = q.shape[0]
    patches = F.unfold(exemplar, s, stride=s).view(B, -1, *k.shape[2:])
    warped = ck.reference.correspondence_warp(q, k, patches)
    return F.fold(warped.flatten(2), (q.shape[2] * s, q.shape[3] * s), s, stride=s)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_patch_mode_matches_float64(backend, dtype, stride, device):
    q, k, e = (t.requires_grad_() for t in _inputs(dtype, device, stride))
    out = ck.warp_image(q, k, e, stride=stride, backend=backend)
    assert out.shape == (2, 3, 5 * stride, 6 * stride)
    ref = _reference_patch_warp(*(t.detach().double() for t in (q, k, e)), stride)
    same = None if dtype == torch.float64 else ck.warp_image(*(t.detach() for t in (q, k, e)), stride=stride,
                                                             backend="reference")
    assert_close(out, ref, same, name="out")
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, e))


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", None])
def test_pool_mode(upsample, device):
    q, k, e = _inputs(torch.float64, device)
    out = ck.warp_image(q, k, e, mode="pool", upsample=upsample, backend="cpu")
    coarse = ck.reference.correspondence_warp(q, k, F.avg_pool2d(e, 4))
    expected = coarse if upsample is None else F.interpolate(coarse, scale_factor=4, mode=upsample)
    assert_close(out, expected, name="out")


def test_patch_warp_of_a_constant_exemplar_is_constant(device):
    # Softmax rows sum to one: every output pixel is a convex combination of exemplar pixels.
    q, k, e = _inputs(torch.float64, device)
    out = ck.warp_image(q, k, torch.full_like(e, 0.25), backend="cpu")
    assert_close(out, torch.full_like(out, 0.25), rtol=1e-12, name="constant")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(stride=0), ValueError, "stride must be an integer >= 1, got 0"),
    (dict(stride=3), ValueError, r"exemplar must be stride=3 times the key grid \(4, 7\): expected spatial size \(12, 21\), got \(16, 28\)"),
    (dict(mode="full"), ValueError, "mode must be one of .* got 'full'"),
    (dict(mode="pool", upsample="cubic"), ValueError, "upsample must be one of .* got 'cubic'"),
], ids=["stride0", "stride-mismatch", "mode", "upsample"])
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        ck.warp_image(*_inputs(torch.float32, "cpu"), **kwargs)
