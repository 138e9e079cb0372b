"""cycle_warp: the warp and its cycle in one op, on every backend, against float64."""
import pytest
import torch

import cocos_kernels as ck
import cocos_kernels.features as features
from conftest import assert_close, skip_unless_runs
from test_correspondence_warp import ALL, FUSED, OPTIONS, RTOL, SHAPES, make_inputs


@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["channel-p3-t0.01"], OPTIONS["spatial-t0.01"],
                                  OPTIONS["attention-t1"]], ids=["channel", "channel-p3", "spatial", "attention"])
@pytest.mark.parametrize("shape", [SHAPES["B2-C17-Cv48-q7x5-k9x11"], SHAPES["B1-C17-Cv1-q3x1-k1x3"]],
                         ids=["B2-C17-Cv48", "B1-q3x1-k1x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_cycle_matches_two_float64_reference_warps(backend, dtype, shape, opts, device):
    skip_unless_runs(backend, device, dtype)
    q, k, v = (t.requires_grad_() for t in make_inputs(shape, dtype, device))
    out, back = ck.cycle_warp(q, k, v, backend=backend, **opts)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, **opts)
    ref_back = ck.reference.correspondence_warp(k64, q64, ref, **opts)
    assert out.shape == (v.shape[0], v.shape[1], *q.shape[2:]) and back.shape == v.shape
    assert_close(out, ref, RTOL[dtype], "warped")
    assert_close(back, ref_back, RTOL[dtype], "warped back")
    g = torch.Generator().manual_seed(1)
    g_out, g_back = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ref, ref_back))
    torch.autograd.backward((out, back), (g_out.to(device, dtype), g_back.to(device, dtype)))
    torch.autograd.backward((ref, ref_back), (g_out, g_back))
    for name, mine, theirs in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        assert_close(mine.grad, theirs.grad, RTOL[dtype], f"grad {name}")


@pytest.mark.parametrize("backend", ALL)
def test_only_the_cycle_output_used(backend, device):
    # The cycle loss alone: no gradient flows into `warped` from outside.
    skip_unless_runs(backend, device, torch.float64)
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float64, device))
    _, back = ck.cycle_warp(q, k, v, backend=backend)
    mine = torch.autograd.grad((back - v).abs().mean(), (q, k, v))
    ref = ck.reference.correspondence_warp(k, q, ck.reference.correspondence_warp(q, k, v))
    theirs = torch.autograd.grad((ref - v).abs().mean(), (q, k, v))
    for a, b in zip(mine, theirs):
        assert_close(a, b, 1e-9, "grad")


@pytest.mark.parametrize("backend", FUSED)
def test_cycle_opcheck(backend, device):
    # float32: the fused GPU backends take no float64.
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), torch.float32, device))
    torch.library.opcheck(torch.ops.cocos_kernels.cycle_warp.default,
                          (q, k, v, None, 0.1, "channel", True, 3, 1e-12, backend, "ieee"))
    if "key_mask" in ck.BACKENDS[backend].features:
        mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
        torch.library.opcheck(torch.ops.cocos_kernels.cycle_warp.default,
                              (q, k, v, mask, 1.0, None, True, 1, 1e-12, backend, "ieee"))


def _float64_or_32(backend, device):
    return torch.float64 if ck.BACKENDS[backend].refusal(device, torch.float64) is None else torch.float32


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
@pytest.mark.parametrize("center", ["channel", None], ids=["channel", "no-centring"])
@pytest.mark.parametrize("backend", FUSED)
def test_cycle_windows_and_key_mask_match_float64(backend, center, masked, device):
    # 3x3 windows (the window kernels where the backend declares them) and a key mask with a fully
    # masked sample. The mask applies to the first pass only: the reference is two warps, the second
    # (key -> query grid) unmasked, so masked exemplar positions get the back pass's value too.
    if masked and "key_mask" not in ck.BACKENDS[backend].features:
        pytest.skip(f"{backend} does not declare key_mask")
    dtype = _float64_or_32(backend, device)
    skip_unless_runs(backend, device, dtype)
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device))
    mask = None
    if masked:
        mask = (torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.4).to(device)
        mask[1] = False
    opts = dict(temperature=0.01, center=center, patch_size=3)
    out, back = ck.cycle_warp(q, k, v, key_mask=mask, backend=backend, **opts)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, key_mask=mask, **opts)
    ref_back = ck.reference.correspondence_warp(k64, q64, ref, **opts)
    assert_close(out, ref, RTOL[dtype], "warped")
    assert_close(back, ref_back, RTOL[dtype], "warped back")
    if masked:
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(back[1], torch.zeros_like(back[1]))
    g = torch.Generator().manual_seed(1)
    g_out, g_back = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ref, ref_back))
    torch.autograd.backward((out, back), (g_out.to(device, dtype), g_back.to(device, dtype)))
    torch.autograd.backward((ref, ref_back), (g_out, g_back))
    for name, mine, theirs in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        assert_close(mine.grad, theirs.grad, RTOL[dtype], f"grad {name}")


@pytest.mark.parametrize("backend", [name for name in FUSED if "windows" in ck.BACKENDS[name].features])
def test_cycle_patches_are_never_unfolded(backend, monkeypatch, device):
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 17, 5, (6, 5), (4, 7)), torch.float32, device))
    real_unfold = features._unfold

    def forbidden(x, patch_size):
        if patch_size > 1:
            raise AssertionError("the D-wide unfold ran")
        return real_unfold(x, patch_size)

    monkeypatch.setattr(features, "_unfold", forbidden)
    out, back = ck.cycle_warp(q, k, v, patch_size=3, backend=backend)
    (out.sum() + back.square().sum()).backward()
    monkeypatch.setattr(features, "_unfold", real_unfold)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, patch_size=3)
    assert_close(back, ck.reference.correspondence_warp(k64, q64, ref, patch_size=3), 1e-4, "warped back")


def test_cycle_rejects_bad_input():
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="value must be on the key's grid"):
        ck.cycle_warp(q, k, v[:, :, :3])
