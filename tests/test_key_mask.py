"""correspondence_warp(key_mask=...): masked exemplar positions get no weight, on every fused backend."""
import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.testing import assert_close
from test_correspondence_warp import OP, OPTIONS, SHAPES, check_against_reference, make_inputs

def _one_key_left(shape, g):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, 0, -1] = True
    return mask


def _sample_fully_masked(shape, g):
    # The first sample keeps no key at all: its rows warp to zeros with zero gradients.
    mask = torch.rand(shape, generator=g) > 0.5
    mask[0] = False
    return mask


MASKS = {  # id: how (B, Hk, Wk) masks are drawn
    "random": lambda shape, g: torch.rand(shape, generator=g) > 0.4,
    "one-key-left": _one_key_left,
    "sample-fully-masked": _sample_fully_masked,
}


def _mask(kind, key, seed=0):
    B, _, Hk, Wk = key.shape
    return MASKS[kind]((B, Hk, Wk), torch.Generator().manual_seed(seed)).to(key.device)


@pytest.mark.parametrize("kind", MASKS, ids=MASKS.keys())
@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["channel-p3-t0.01"], OPTIONS["attention-t1"]],
                         ids=["channel", "channel-p3", "attention"])
@pytest.mark.backends(OP, [torch.float32, torch.float64], features=("key_mask",))
def test_masked_matches_float64_reference(backend, dtype, opts, kind, device):
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    mine = check_against_reference(backend, q, k, v, key_mask=_mask(kind, k), **opts)
    if kind == "sample-fully-masked":
        assert all(torch.equal(t[0], torch.zeros_like(t[0])) for t in mine.values())


@pytest.mark.backends(OP, [torch.float64], features=("key_mask",))
def test_masked_keys_take_no_part(backend, dtype, device):
    # Changing what sits at masked positions (features and values) changes nothing.
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    mask = _mask("random", k)
    k2, v2 = k.clone(), v.clone()
    hidden = ~mask[:, None].expand_as(k)
    k2[hidden] = 50.0
    v2[~mask[:, None].expand_as(v)] = -7.0
    a = ck.correspondence_warp(q, k, v, key_mask=mask, center="channel", backend=backend)
    b = ck.correspondence_warp(q, k2, v2, key_mask=mask, center="channel", backend=backend)
    assert_close(a, b, rtol=1e-12, name="out")


def test_all_true_mask_is_no_mask(device):
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float64, device)
    mask = torch.ones(k.shape[0], *k.shape[2:], dtype=torch.bool, device=device)
    assert_close(ck.correspondence_warp(q, k, v, key_mask=mask), ck.correspondence_warp(q, k, v), rtol=1e-12,
                 name="out")


def _good():
    return make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, "cpu")


@pytest.mark.parametrize("mask,error,message", [
    (torch.ones(2, 9, 11), TypeError, "key_mask must be a bool tensor .* got dtype torch.float32"),
    (torch.ones(2, 1, 9, 11, dtype=torch.bool), ValueError, r"key_mask must have shape \(B, Hk, Wk\) = \(2, 9, 11\) of the key, got \(2, 1, 9, 11\)"),
    (torch.ones(2, 7, 5, dtype=torch.bool), ValueError, r"got \(2, 7, 5\)"),
    ([[True]], TypeError, "key_mask must be None or a torch.Tensor, got list"),
    (torch.ones(2, 9, 11, dtype=torch.bool, device="meta"), ValueError, "key_mask is on meta but key is on cpu"),
], ids=["float", "4d", "query-grid", "list", "device"])
def test_bad_mask_is_rejected(mask, error, message):
    with pytest.raises(error, match=message):
        ck.correspondence_warp(*_good(), key_mask=mask)


def test_backend_without_key_mask_is_refused_with_reason():
    # A fused backend declares the optional arguments it implements; one without key_mask is
    # refused by name and skipped by "auto".
    from dataclasses import replace

    cpu = ck.BACKENDS["cpu"]
    bare = replace(cpu, name="bare", features=frozenset())
    assert bare.feature_refusal(("key_mask",)) == "it does not implement key_mask"
    assert cpu.feature_refusal(("key_mask",)) is None
    assert ck.BACKENDS["reference"].feature_refusal(("key_mask",)) is None
