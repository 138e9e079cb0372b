"""cycle_warp: the warp and its cycle in one op, on every backend, against float64."""
import pytest
import torch

import cocos_kernels as ck
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
                          (q, k, v, 0.1, "channel", True, 3, 1e-12, backend, "ieee"))


def test_cycle_rejects_bad_input():
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="value must be on the key's grid"):
        ck.cycle_warp(q, k, v[:, :, :3])
