"""correspondence_topk / correspondence_argmax and correspondence_warp(top_k=...) against float64.

No backend has a top-k kernel: backend="reference" is the materialised search, every other name the
same blockwise PyTorch search, so the blockwise search runs once, under the default backend, and is
judged by cocos_kernels.testing's rule with the materialised search at the same dtype as yardstick.
"""
import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.features import normalize_features
from cocos_kernels.testing import FLOORS, assert_close, softmax_floor
from test_correspondence_warp import OPTIONS, SHAPES, make_inputs, max_logit


def skip_unless_blockwise(device, dtype):
    """Skip where the default backend is the reference for these tensors (no fused backend takes them)."""
    if not ck.select("auto", device, dtype).fused:
        pytest.skip(f"no fused backend takes {device.type} {dtype}: the default is the materialised search")


def _scores64(q, k, center="channel", normalize=True, patch_size=1):
    qf = normalize_features(q.double(), center, normalize, patch_size, ck.DEFAULT_EPS)
    kf = normalize_features(k.double(), center, normalize, patch_size, ck.DEFAULT_EPS)
    return qf.transpose(1, 2) @ kf  # (B, Nq, Nk)


@pytest.mark.parametrize("patch_size", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_finds_the_float64_best_matches(dtype, patch_size, device):
    q, k, _ = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    idx, sim = ck.correspondence_topk(q, k, 5, patch_size=patch_size)
    B, _, Hq, Wq = q.shape
    assert idx.shape == sim.shape == (B, Hq, Wq, 5) and idx.dtype == torch.long
    s = _scores64(q, k, patch_size=patch_size)
    ref = s.topk(5, dim=-1)
    same_idx, same_sim = ck.correspondence_topk(q, k, 5, patch_size=patch_size, backend="reference")
    assert_close(sim.reshape(B, -1, 5), ref.values, same_sim.reshape(B, -1, 5), name="similarity")
    # Indices agree wherever the float64 gap to the next candidate exceeds the search dtype's
    # rounding: the float64 scores they pick are held to that dtype's floor, not float64's.
    chosen, same_chosen = (s.gather(-1, i.reshape(B, -1, 5)) for i in (idx, same_idx))
    assert_close(chosen, ref.values, same_chosen, name="similarity at the returned indices", floor=FLOORS[dtype])


def test_argmax_and_blocks(monkeypatch, device):
    # Small blocks force several query blocks; the answer must not depend on them.
    import cocos_kernels.ops.correspondence_topk as topk

    q, k, _ = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float64, device)
    idx, sim = ck.correspondence_argmax(q, k)
    monkeypatch.setattr(topk, "_BLOCK_SCORES", 7)
    idx2, sim2 = ck.correspondence_argmax(q, k)
    assert torch.equal(idx, idx2)
    assert_close(sim2, sim, name="similarity", rtol=1e-12)  # BLAS may sum a different block in another order
    s = _scores64(q, k)
    assert torch.equal(idx.reshape(2, -1), s.argmax(-1))


def test_reference_topk_is_the_materialised_search(monkeypatch, device):
    # backend="reference" scores all query rows in one block; the other names search blockwise.
    import cocos_kernels.ops.correspondence_topk as topk

    q, k, _ = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float64, device)
    monkeypatch.setattr(topk, "_BLOCK_SCORES", 7)
    blocks = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: blocks.append(a.shape[1]) or real_bmm(a, b))
    idx, sim = ck.correspondence_topk(q, k, 3, backend="reference")
    assert blocks == [q.shape[2] * q.shape[3]]
    blocks.clear()
    idx2, sim2 = ck.correspondence_topk(q, k, 3)
    assert len(blocks) > 1
    assert torch.equal(idx, idx2)
    assert_close(sim2, sim, name="similarity", rtol=1e-12)


def test_topk_respects_the_key_mask(device):
    q, k, _ = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float64, device)
    mask = torch.zeros(2, 9, 11, dtype=torch.bool, device=device)
    mask[:, 2, 3:6] = True  # 3 allowed keys per sample
    idx, sim = ck.correspondence_topk(q, k, 4, key_mask=mask)
    allowed = {2 * 11 + 3, 2 * 11 + 4, 2 * 11 + 5}
    assert set(idx[..., :3].flatten().tolist()) <= allowed
    assert torch.isneginf(sim[..., 3]).all() and torch.isfinite(sim[..., :3]).all()


def topk_warp_and_grads(backend, q, k, v, grad, **opts):
    """The top-k warp and its three input gradients for upstream gradient `grad`, at the inputs' dtype."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
    out.backward(grad.to(out.device, out.dtype))
    return {"out": out, "grad query": q.grad, "grad key": k.grad, "grad value": v.grad}


@pytest.mark.parametrize("top_k", [1, 4, 99], ids=["k1", "k4", "k-all"])
@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["channel-p3-t0.01"], OPTIONS["attention-t1"]],
                         ids=["channel", "channel-p3", "attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_warp_matches_float64_reference(dtype, opts, top_k, device):
    skip_unless_blockwise(device, dtype)
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    grad = torch.randn(v.shape[:2] + q.shape[2:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = opts | {"top_k": top_k}
    mine = topk_warp_and_grads("auto", q, k, v, grad, **opts)
    exact = topk_warp_and_grads("reference", *(t.double() for t in (q, k, v)), grad, **opts)
    same = exact if dtype == torch.float64 else topk_warp_and_grads("reference", q, k, v, grad, **opts)
    floor = softmax_floor(dtype, max_logit(q, k, **opts))
    for name, result in mine.items():
        assert result.dtype == dtype, name
        assert_close(result, exact[name], same[name], name=name, floor=floor)
    if top_k == 99:  # every key: the plain warp
        plain = {name: value for name, value in opts.items() if name != "top_k"}
        same_plain = None if dtype == torch.float64 else ck.correspondence_warp(q, k, v, backend="reference", **plain)
        assert_close(mine["out"], ck.reference.correspondence_warp(*(t.double() for t in (q, k, v)), **plain), same_plain,
                     name="all keys", floor=floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_warp_with_mask_and_fully_masked_sample(dtype, device):
    skip_unless_blockwise(device, dtype)
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device))
    mask = (torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0)) > 0.7).to(device)
    mask[0] = False
    out = ck.correspondence_warp(q, k, v, top_k=6, key_mask=mask)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    ref = ck.reference.correspondence_warp(q64, k64, v64, top_k=6, key_mask=mask)
    same = None if dtype == torch.float64 else ck.correspondence_warp(*(t.detach() for t in (q, k, v)), top_k=6,
                                                                      key_mask=mask, backend="reference")
    assert_close(out, ref, same, name="out", floor=softmax_floor(dtype, max_logit(q, k)))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("call,error,message", [
    (lambda q, k, v: ck.correspondence_topk(q, k, 0), ValueError, r"k must be an integer in \[1, 99\] .* got 0"),
    (lambda q, k, v: ck.correspondence_topk(q, k, 100), ValueError, r"k must be an integer in \[1, 99\] .* got 100"),
    (lambda q, k, v: ck.correspondence_topk(q, k, 2.5), ValueError, "got 2.5"),
    (lambda q, k, v: ck.correspondence_warp(q, k, v, top_k=True), ValueError, "top_k must be an integer .* got True"),
    (lambda q, k, v: ck.correspondence_argmax(q, k[:, :3]), ValueError, "same batch size and channels"),
    (lambda q, k, v: ck.correspondence_argmax(q, k, patch_size=2), ValueError, "patch_size must be an odd integer"),
], ids=["k0", "k-too-big", "k-float", "top_k-bool", "channels", "patch-even"])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(*make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, "cpu"))
