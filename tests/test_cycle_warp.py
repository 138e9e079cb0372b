"""cycle_warp: the warp and its cycle in one op, on every fused backend, against two float64 reference warps.

Results in float32 are judged by cocos_kernels.testing's rule, the reference cycle run at the same
dtype on the same inputs being the yardstick.
"""
import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.testing import assert_close, softmax_floor
from test_correspondence_warp import OP, OPTIONS, SHAPES, feature_grad_floor, make_inputs, max_logit
from test_windows import unfold_forbidden


def cycle_and_grads(backend, q, k, v, g_out, g_back, **opts):
    """warped, warped back and the three input gradients for upstream gradients g_out, g_back."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, back = ck.cycle_warp(q, k, v, backend=backend, **opts)
    torch.autograd.backward((out, back), (g_out.to(out.device, out.dtype), g_back.to(back.device, back.dtype)))
    return {"warped": out, "warped back": back, "grad query": q.grad, "grad key": k.grad, "grad value": v.grad}


def check_cycle(backend, q, k, v, key_mask=None, **opts):
    """The cycle of `backend` and its gradients against two float64 reference warps (key_mask on the
    first only), next to the reference cycle at the same dtype. Returns the backend's results."""
    g = torch.Generator().manual_seed(1)
    g_out, g_back = (torch.randn(shape, generator=g, dtype=torch.float64)
                     for shape in ((v.shape[0], v.shape[1], *q.shape[2:]), v.shape))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, key_mask=key_mask, **opts)
    ref_back = ck.reference.correspondence_warp(k64, q64, ref, **opts)
    torch.autograd.backward((ref, ref_back), (g_out, g_back))
    exact = {"warped": ref, "warped back": ref_back, "grad query": q64.grad, "grad key": k64.grad, "grad value": v64.grad}
    opts = opts | ({} if key_mask is None else {"key_mask": key_mask})
    mine = cycle_and_grads(backend, q, k, v, g_out, g_back, **opts)
    same = exact if q.dtype == torch.float64 else cycle_and_grads("reference", q, k, v, g_out, g_back, **opts)
    assert mine["warped"].shape == ref.shape and mine["warped back"].shape == v.shape
    # Both passes' logits, and both passes' one-hot rows for the feature gradients.
    floor = softmax_floor(q.dtype, max_logit(q, k, **opts))
    back_opts = {name: value for name, value in opts.items() if name != "key_mask"}
    feature_floor = max(feature_grad_floor(q, k, v, g_out, **opts),
                        feature_grad_floor(k, q, mine["warped"].detach(), g_back, **back_opts))
    for name, result in mine.items():
        assert result.dtype == q.dtype, name
        assert_close(result, exact[name], same[name], name=name,
                     floor=feature_floor if name in ("grad query", "grad key") else floor)
    return mine


@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["channel-p3-t0.01"], OPTIONS["spatial-t0.01"],
                                  OPTIONS["attention-t1"]], ids=["channel", "channel-p3", "spatial", "attention"])
@pytest.mark.parametrize("shape", [SHAPES["B2-C17-Cv48-q7x5-k9x11"], SHAPES["B1-C17-Cv1-q3x1-k1x3"]],
                         ids=["B2-C17-Cv48", "B1-q3x1-k1x3"])
@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_cycle_matches_two_float64_reference_warps(backend, dtype, shape, opts, device):
    check_cycle(backend, *make_inputs(shape, dtype, device), **opts)


@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_only_the_cycle_output_used(backend, dtype, device):
    # The cycle loss alone: no gradient flows into `warped` from outside.
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], dtype, device)

    def grads(warp, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad((warp(q, k, v) - v).abs().mean(), (q, k, v))

    mine = grads(lambda q, k, v: ck.cycle_warp(q, k, v, backend=backend)[1], q, k, v)
    exact = grads(lambda q, k, v: ck.reference.correspondence_warp(k, q, ck.reference.correspondence_warp(q, k, v)),
                  *(t.double() for t in (q, k, v)))
    same = exact if dtype == torch.float64 else grads(lambda q, k, v: ck.cycle_warp(q, k, v, backend="reference")[1], q, k, v)
    floor = softmax_floor(dtype, max_logit(q, k))
    for name, a, b, c in zip(("query", "key", "value"), mine, exact, same):
        assert_close(a, b, c, name=f"grad {name}", floor=floor)


@pytest.mark.backends(OP, [torch.float32])
def test_cycle_opcheck(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), dtype, device))
    torch.library.opcheck(torch.ops.cocos_kernels.cycle_warp.default,
                          (q, k, v, None, 0.1, "channel", True, 3, 1e-12, backend, "ieee"))


@pytest.mark.backends(OP, [torch.float32], features=("key_mask",))
def test_cycle_opcheck_key_mask(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), dtype, device))
    mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
    torch.library.opcheck(torch.ops.cocos_kernels.cycle_warp.default,
                          (q, k, v, mask, 1.0, None, True, 1, 1e-12, backend, "ieee"))


@pytest.mark.parametrize("center", ["channel", None], ids=["channel", "no-centring"])
@pytest.mark.backends(OP, [torch.float32, torch.float64], features=("windows",))
def test_cycle_windows_match_float64(backend, dtype, center, device):
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    check_cycle(backend, q, k, v, temperature=0.01, center=center, patch_size=3)


@pytest.mark.parametrize("center", ["channel", None], ids=["channel", "no-centring"])
@pytest.mark.backends(OP, [torch.float32, torch.float64], features=("windows", "key_mask"))
def test_cycle_windows_with_key_mask_match_float64(backend, dtype, center, device):
    # A fully masked second sample. The mask applies to the first pass only: the reference is two
    # warps, the second (key -> query grid) unmasked, so masked exemplar positions get the back
    # pass's value too.
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    mask = (torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.4).to(device)
    mask[1] = False
    mine = check_cycle(backend, q, k, v, key_mask=mask, temperature=0.01, center=center, patch_size=3)
    for name in ("warped", "warped back"):
        assert torch.equal(mine[name][1], torch.zeros_like(mine[name][1])), name


@pytest.mark.backends(OP, [torch.float32], features=("windows",))
def test_cycle_patches_are_never_unfolded(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 17, 5, (6, 5), (4, 7)), dtype, device))
    with unfold_forbidden():
        out, back = ck.cycle_warp(q, k, v, patch_size=3, backend=backend)
        (out.sum() + back.square().sum()).backward()
    q, k, v = (t.detach() for t in (q, k, v))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, patch_size=3)
    same = ck.cycle_warp(q, k, v, patch_size=3, backend="reference")[1]
    assert_close(back, ck.reference.correspondence_warp(k64, q64, ref, patch_size=3), same, name="warped back",
                 floor=softmax_floor(dtype, max_logit(q, k, patch_size=3)))


def test_cycle_rejects_bad_input():
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="value must be on the key's grid"):
        ck.cycle_warp(q, k, v[:, :, :3])
