"""check_finite=True: NaN/Inf in the inputs raise, naming the argument, count and first index."""
import pytest
import torch

import cocos_kernels as ck


def _maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 4, 3, generator=g) for _ in range(3)]


CALLS = {
    "correspondence_warp": lambda q, k, v, **kw: ck.correspondence_warp(q, k, v, **kw),
    "module": lambda q, k, v, **kw: ck.CorrespondenceWarp(**kw)(q, k, v),
    "cycle_warp": lambda q, k, v, **kw: ck.cycle_warp(q, k, v, **kw),
    "warp_image": lambda q, k, v, **kw: ck.warp_image(q, k, v, stride=1, **kw),
    "correspondence_topk": lambda q, k, v, **kw: ck.correspondence_topk(q, k, 2, **kw),
    "correspondence_argmax": lambda q, k, v, **kw: ck.correspondence_argmax(q, k, **kw),
    "contextual_loss": lambda q, k, v, **kw: ck.contextual_loss(q, k, **kw),
}
# The argument name each call reports for its first and second tensor.
NAMES = {"contextual_loss": ("x", "y")}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("call", CALLS, ids=CALLS.keys())
def test_non_finite_input_raises(call, which, bad):
    maps = _maps()
    maps[which][1, 2, 3, 0] = bad
    maps[which][1, 4, 0, 2] = bad
    name = NAMES.get(call, ("query", "key"))[which]
    with pytest.raises(ValueError, match=rf"{name} has 2 non-finite \(NaN/Inf\) entries, the first at index \(1, 2, 3, 0\)"):
        CALLS[call](*maps, check_finite=True, backend="reference")


@pytest.mark.parametrize("call", CALLS, ids=CALLS.keys())
def test_finite_input_passes_and_default_does_not_check(call):
    maps = _maps()
    CALLS[call](*maps, check_finite=True, backend="reference")
    maps[0][0, 0, 0, 0] = float("nan")
    CALLS[call](*maps, backend="reference")  # propagates, no error


def test_check_finite_must_be_bool():
    with pytest.raises(TypeError, match="check_finite must be a bool, got str"):
        ck.correspondence_warp(*_maps(), check_finite="yes")
