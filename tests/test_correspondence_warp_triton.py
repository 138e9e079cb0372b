"""Triton-specific checks of correspondence_warp: block/chunk/padding edges, the key split, precision.

The shared suite (test_correspondence_warp.py) runs the triton backend through the public op;
these call the kernel entry points on prepared features directly, against float64 PyTorch, at
shapes chosen around the block sizes (under the interpreter: BLOCK_M = BLOCK_N = 32, BLOCK_D = 128).
Every result is judged by cocos_kernels.testing's rule, the same PyTorch formula run at the
kernel's input dtype (and matmul precision) being the yardstick.
"""
import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.testing import assert_close, softmax_floor

pytestmark = pytest.mark.usefixtures("triton_runs")


def skip_unless_triton_takes(device, dtype):
    """Skip, with the backend's reason, where this environment refuses triton for `dtype`."""
    reason = ck.BACKENDS["triton"].refusal(device, dtype)
    if reason is not None:
        pytest.skip(f"triton: {reason}")


@pytest.fixture
def triton_runs(device):
    skip_unless_triton_takes(device, torch.float32)


@pytest.fixture
def kernels():
    return ck.BACKENDS["triton"].kernels()


def prepared(B, Nq, Nk, D, Cv, dtype, device, seed=0):
    """Unit-norm feature rows (so scale 100 gives logits in [-100, 100]) and a value."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, Nq, D, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, Nk, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, Cv, Nk, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, Cv, Nq, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v, grad_out)]


def reference(q, k, v, grad_out, scale, dtype=torch.float64):
    """out, lse, dq, dk, dv of the materialised formula, computed in `dtype`."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(1, 2) * scale
    out = (torch.softmax(s, dim=-1) @ v.transpose(1, 2)).transpose(1, 2)
    out.backward(grad_out.to(dtype))
    return out, torch.logsumexp(s, dim=-1), q.grad, k.grad, v.grad


def judge(results, exact, same, names, scale):
    for name, mine, theirs, yardstick in zip(names, results, exact, same):
        # Gradients come back in float32 from half inputs too: the floor is the inputs' dtype's.
        # Unit-norm rows: the logits are at most `scale`.
        assert_close(mine, theirs, yardstick, name=name, floor=softmax_floor(yardstick.dtype, scale))


def check(kernels, B, Nq, Nk, D, Cv, device, dtype=torch.float32, scale=100.0, num_splits=None,
          needs=(True, True, True)):
    q, k, v, grad_out = prepared(B, Nq, Nk, D, Cv, dtype, device)
    out, lse = kernels.correspondence_warp_forward(q, k, v, scale, num_splits=num_splits)
    assert out.dtype == v.dtype and out.shape == (B, Cv, Nq) and lse.shape == (B, Nq)
    exact, same = reference(q, k, v, grad_out, scale), reference(q, k, v, grad_out, scale, dtype)
    judge((out, lse), exact[:2], same[:2], ("out", "lse"), scale)
    grads = kernels.correspondence_warp_backward(grad_out, q, k, v, out, lse, scale, *needs)
    for name, need, mine, theirs, yardstick in zip(("dq", "dk", "dv"), needs, grads, exact[2:], same[2:]):
        if need:
            assert mine.dtype == torch.float32
            judge((mine,), (theirs,), (yardstick,), (name,), scale)
        else:
            assert mine is None


SHAPES = {  # id: (B, Nq, Nk, D, Cv)
    "one-query-one-key": (1, 1, 1, 16, 3),
    "Cv1": (2, 33, 31, 20, 1),
    "Cv16-exact-pad": (1, 32, 64, 16, 16),
    "Cv151-pads-to-256": (1, 40, 37, 24, 151),
    "D128-one-full-chunk": (1, 33, 65, 128, 5),
    "D129-chunk-plus-one": (1, 33, 65, 129, 5),
    "D300-partial-last-chunk": (2, 31, 34, 300, 48),
    "blocks-partly-filled": (2, 97, 70, 9, 4),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_block_chunk_and_padding_edges(kernels, shape, device):
    check(kernels, *shape, device)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dq", "dk", "dv"])
@pytest.mark.parametrize("D", [20, 200], ids=["D20-in-registers", "D200-chunked"])
def test_gradient_subsets(kernels, D, needs, device):
    check(kernels, 1, 35, 40, D, 3, device, needs=needs)


@pytest.mark.parametrize("num_splits,Nk", [(2, 256), (3, 300), (4, 260), (8, 129)],
                         ids=["2x128", "3-last-partial", "4-asked-3-made", "8-asked-2-made"])
def test_key_split_combines_through_logsumexp(kernels, num_splits, Nk, device):
    # Splits are whole multiples of 128 keys: asking for more than Nk allows gives fewer.
    check(kernels, 2, 9, Nk, 12, 5, device, num_splits=num_splits)


def test_logits_far_beyond_exp_range_keep_the_running_max(kernels, device):
    # Logits up to 1000: exp overflows float32 above ~88.7 unless the running max is subtracted.
    check(kernels, 1, 20, 70, 8, 3, device, scale=1000.0)


def test_float16_features_stay_half_in_the_products(kernels, device):
    skip_unless_triton_takes(device, torch.float16)
    assert kernels.input_dtype(torch.float16) == torch.float16
    assert kernels.input_dtype(torch.float32) == torch.float32
    check(kernels, 2, 33, 40, 140, 7, device, dtype=torch.float16)


# --- precision ---------------------------------------------------------------------------------

def _recorded_precision(monkeypatch, kernels, device, **kwargs):
    seen = []
    forward = kernels.correspondence_warp_forward

    def spy(*args, precision="ieee", **kw):
        seen.append(precision)
        return forward(*args, precision=precision, **kw)

    monkeypatch.setattr(kernels, "correspondence_warp_forward", spy)
    q = torch.randn(1, 4, 3, 3, device=device)
    ck.correspondence_warp(q, q, q, backend="triton", **kwargs)
    return seen[0]


@pytest.mark.parametrize("matmul_precision,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_precision_follows_float32_matmul_precision(monkeypatch, kernels, device, matmul_precision, expected):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        assert _recorded_precision(monkeypatch, kernels, device) == expected
        assert _recorded_precision(monkeypatch, kernels, device, precision="ieee") == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("precision,matmul_precision", [("ieee", "highest"), ("tf32x3", "high"), ("tf32", "medium")])
def test_every_precision_runs(precision, matmul_precision, device):
    # The interpreter ignores input_precision: the tf32 modes' accuracy is checked by benchmarks/gpu_check.py.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 5, 6, generator=g).to(device) for _ in range(3))
    out = ck.CorrespondenceWarp(backend="triton", precision=precision)(q, k, v)
    previous = torch.get_float32_matmul_precision()
    try:  # the yardstick's float32 products at the same precision
        torch.set_float32_matmul_precision(matmul_precision)
        same = ck.correspondence_warp(q, k, v, backend="reference")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_close(out, ck.reference.correspondence_warp(q.double(), k.double(), v.double()), same, name=precision)


def test_kernels_reject_an_unknown_precision(kernels, device):
    q, k, v, _ = prepared(1, 4, 4, 4, 2, torch.float32, device)
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp32'"):
        kernels.correspondence_warp_forward(q, k, v, 1.0, precision="fp32")


# --- dispatch ----------------------------------------------------------------------------------

def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    triton = ck.BACKENDS["triton"]
    assert "auto picks it only for ['cuda']" in triton.auto_refusal(torch.device("cpu"), torch.float32)
    assert ck.select("auto", torch.device("cpu"), torch.float32).name != "triton"


def test_refusals_say_why():
    triton = ck.BACKENDS["triton"]
    assert "not torch.float64" in triton.refusal(torch.device("cuda"), torch.float64)
    if ck.dispatch.TRITON_INTERPRETED:
        assert "triton-lang/triton#11584" in triton.refusal(torch.device("cpu"), torch.bfloat16)


def test_opcheck_float32(device):
    # The shared opcheck runs in float64, which the triton backend refuses.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g).to(device).requires_grad_() for _ in range(3))
    mask = torch.rand(2, 3, 4, generator=g).to(device) > 0.3
    for args in ((q, k, v, None, 0.1, "channel", True, 3, 1e-12, "triton", "tf32"), (q, k, v, mask, 1.0, None, False, 1, 0.0, "triton")):
        torch.library.opcheck(torch.ops.cocos_kernels.correspondence_warp.default, args)


# --- prologue ----------------------------------------------------------------------------------

PROLOGUES = {  # id: (C, H, W, center, normalize, dtype)
    "channel-norm-C17": (17, 7, 9, "channel", True, torch.float32),
    "channel-norm-C70-chunks": (70, 5, 30, "channel", True, torch.float32),
    "nocenter-norm": (40, 4, 5, None, True, torch.float32),
    "channel-only": (3, 4, 4, "channel", False, torch.float32),
    "identity": (5, 2, 3, None, False, torch.float32),
    "channel-norm-float16": (40, 3, 3, "channel", True, torch.float16),
}


@pytest.mark.parametrize("case", PROLOGUES.values(), ids=PROLOGUES.keys())
def test_prologue_matches_features_py(kernels, case, device):
    from cocos_kernels.features import normalize_features, normalize_features_backward

    C, H, W, center, normalize, dtype = case
    skip_unless_triton_takes(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, C, H, W, generator=g) + 3.0).to(device, dtype)  # a mean that dwarfs the spread
    x[0, :, 0, 0] = 1.5  # constant over channels: zero after centring, a zero norm
    grad = torch.randn(2, H * W, C, generator=g).to(device)
    rows = kernels.prepare_features(x, center, normalize, 1, 1e-12, dtype)
    # Half inputs are normalised in float32 (a half eps of 1e-12 would underflow): so is the yardstick.
    expected, same = (normalize_features(x.to(t), center, normalize, 1, 1e-12).transpose(1, 2)
                      for t in (torch.float64, torch.promote_types(dtype, torch.float32)))
    assert rows.dtype == dtype and rows.shape == (2, H * W, C) and rows.is_contiguous()
    assert_close(rows, expected, same.to(dtype), name="rows")
    dx = kernels.prepare_features_backward(grad, x, center, normalize, 1, 1e-12)
    assert dx.dtype == torch.float32 and dx.shape == x.shape
    # dx is computed in float32 from the (rounded) input: so is its yardstick.
    expected, same = (normalize_features_backward(grad.to(t).transpose(1, 2), x.to(t), center, normalize, 1, 1e-12)
                      for t in (torch.float64, torch.float32))
    assert_close(dx, expected, same, name="grad")


@pytest.mark.parametrize("center,patch_size", [("spatial", 1), ("channel", 3)], ids=["spatial", "patches"])
def test_prologue_leaves_patches_and_spatial_centring_to_pytorch(kernels, center, patch_size, device):
    x = torch.randn(1, 3, 4, 4, device=device)
    assert kernels.prepare_features(x, center, True, patch_size, 1e-12, torch.float32) is None
    assert kernels.prepare_features_backward(x.new_zeros(1, 16, 3 * patch_size**2), x, center, True, patch_size, 1e-12) is None


@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "3-splits"])
def test_key_mask_with_splits_and_a_fully_masked_sample(kernels, num_splits, device):
    # Sample 0 keeps only keys in the last split; sample 1 keeps none (out 0, lse -inf, grads 0).
    B, Nq, Nk, D, Cv, scale = 2, 9, 300, 12, 5, 100.0
    q, k, v, grad_out = prepared(B, Nq, Nk, D, Cv, torch.float32, device)
    mask = torch.zeros(B, Nk, dtype=torch.bool, device=device)
    mask[0, 260:] = True
    out, lse = kernels.correspondence_warp_forward(q, k, v, scale, key_mask=mask, num_splits=num_splits)
    kept = (q[:1], k[:1, 260:], v[:1, :, 260:], grad_out[:1], scale)
    exact, same = reference(*kept), reference(*kept, dtype=torch.float32)
    judge((out[:1], lse[:1]), exact[:2], same[:2], ("out", "lse"), scale)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    dq, dk, dv = kernels.correspondence_warp_backward(grad_out, q, k, v, out, lse, scale, True, True, True, key_mask=mask)
    judge((dq[:1], dk[:1, 260:], dv[:1, :, 260:]), exact[2:], same[2:], ("dq", "dk", "dv"), scale)
    for g in (dk[:1, :260], dv[:1, :, :260], dq[1], dk[1], dv[1]):
        assert torch.equal(g, torch.zeros_like(g))
