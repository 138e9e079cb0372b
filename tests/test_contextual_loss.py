"""contextual_loss: every fused backend implementing it against a float64 evaluation of the reference.

Results in float32, float16 and bfloat16 are judged by cocos_kernels.testing's rule: within twice
the error of the materialised reference run at the same dtype on the same inputs, plus a floor.
"""
import dataclasses
import math

import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.testing import assert_close
from conftest import peak_memory_mib

OP = "contextual_loss"

SHAPES = {  # id: (B, C, H, W); N = H * W positions in each of x and y
    "B1-C1-1x1": (1, 1, 1, 1),
    "B2-C1-7x5": (2, 1, 7, 5),
    "B3-C3-5x7": (3, 3, 5, 7),
    "B1-C3-13x15": (1, 3, 13, 15),  # N = 195: two tiles of 128 rows and columns
    "B2-C64-9x11": (2, 64, 9, 11),
    "B1-C64-1x3": (1, 64, 1, 3),
    "B2-C64-14x14": (2, 64, 14, 14),
}

OPTIONS = {  # id: keyword arguments
    "channel-h0.1": dict(bandwidth=0.1, center="channel"),
    "spatial-h0.1": dict(bandwidth=0.1, center="spatial"),
    "channel-h0.05": dict(bandwidth=0.05, center="channel"),
    "spatial-h0.05": dict(bandwidth=0.05, center="spatial"),
    "channel-h1": dict(bandwidth=1.0, center="channel"),
    "spatial-h0.5": dict(bandwidth=0.5, center="spatial"),
}


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Post-ReLU VGG features are non-negative: half of them zero.
    x = torch.randn(shape, generator=g).relu()
    y = torch.randn(shape, generator=g).relu()
    return x.to(device, dtype), y.to(device, dtype)


def reference64(x, y, **opts):
    x, y = (t.detach().double().requires_grad_() for t in (x, y))
    return ck.reference.contextual_loss(x, y, **opts), x, y


def loss_and_grads(backend, x, y, grad, **opts):
    """Per-sample loss and the input gradients for upstream gradient `grad`, at the inputs' dtype."""
    x, y = (t.detach().requires_grad_() for t in (x, y))
    loss = ck.contextual_loss(x, y, **opts, backend=backend)
    loss.backward(grad.to(loss.device, loss.dtype))
    return {"loss": loss, "grad x": x.grad, "grad y": y.grad}


def materialised(x, y, **opts):
    """The materialised path at the inputs' dtype (the rule's yardstick), or None for float64."""
    return None if x.dtype == torch.float64 else ck.contextual_loss(x, y, backend="reference", **opts)


def check_against_reference(backend, x, y, **opts):
    """Loss and gradients of `backend` against float64, next to the materialised path at the same dtype.
    Half inputs are rounded before the float32 computation: all three see those rounded values."""
    grad = (torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5).to(x.device, x.dtype)
    mine = loss_and_grads(backend, x, y, grad, **opts)
    exact = loss_and_grads("reference", x.double(), y.double(), grad.double(), **opts)
    same = None if x.dtype == torch.float64 else loss_and_grads("reference", x, y, grad, **opts)
    assert mine["loss"].shape == (x.shape[0],)
    for name, result in mine.items():
        assert result.dtype == x.dtype, name
        assert_close(result, exact[name], None if same is None else same[name], name=name)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_matches_float64_reference(backend, dtype, shape, opts, device):
    check_against_reference(backend, *make_inputs(shape, dtype, device), **opts)


@pytest.mark.backends(OP, [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype, device):
    check_against_reference(backend, *make_inputs(SHAPES["B2-C64-9x11"], dtype, device), bandwidth=0.1, center="channel")


@pytest.mark.parametrize("bandwidth", [0.1, 1.0])
def test_reference_matches_a_naive_float64_formula(bandwidth):
    """The yardstick itself, against CoCosNet's formula written out per row: both maps centred by
    y's mean over the channels at each position, unit norm, cosine distances, normalised by the
    row minimum + 1e-3, exp((1 - d) / h) weights, -log(mean over rows of the largest weight)."""
    x, y = make_inputs((2, 4, 3, 5), torch.float64, "cpu")
    expected = []
    for b in range(2):
        mu = y[b].reshape(4, -1).mean(dim=0)
        xs, ys = (t[b].reshape(4, -1) - mu for t in (x, y))
        xs, ys = (t / (t.norm(dim=0) + ck.DEFAULT_EPS) for t in (xs, ys))
        best = []
        for i in range(xs.shape[1]):
            d = torch.stack([1 - xs[:, i] @ ys[:, j] for j in range(ys.shape[1])])
            w = torch.exp((1 - d / (d.min() + 1e-3)) / bandwidth)
            best.append((w / w.sum()).max())
        expected.append(-torch.log(torch.stack(best).mean()))
    assert_close(ck.reference.contextual_loss(x, y, bandwidth), torch.stack(expected), name="loss")


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["x", "y"])
@pytest.mark.parametrize("center", ["channel", "spatial"])
@pytest.mark.backends(OP, [torch.float64])
def test_gradient_subsets(backend, dtype, center, needs, device):
    inputs = make_inputs(SHAPES["B3-C3-5x7"], dtype, device)
    for t, need in zip(inputs, needs):
        t.requires_grad_(need)
    wanted = [t for t in inputs if t.requires_grad]
    mine = torch.autograd.grad(ck.contextual_loss(*inputs, center=center, backend=backend).sum(), wanted)
    theirs = torch.autograd.grad(ck.reference.contextual_loss(*inputs, center=center).sum(), wanted)
    for a, b in zip(mine, theirs):
        assert_close(a, b, name="grad")


@pytest.mark.parametrize("opts", [dict(bandwidth=0.1, center="channel"), dict(bandwidth=0.5, center="spatial"),
                                  dict(bandwidth=1.0, center="channel")], ids=["channel-h0.1", "spatial-h0.5", "channel-h1"])
@pytest.mark.backends(OP, [torch.float64])
def test_gradcheck(backend, dtype, opts, device):
    g = torch.Generator().manual_seed(3)
    # Dense features (no ReLU zeros): no position sits at a kink of the row minimum.
    x, y = (torch.randn(2, 5, 3, 4, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, y: ck.contextual_loss(x, y, backend=backend, **opts), (x, y))


# --- ties in the row minimum -----------------------------------------------------------------

def tied_inputs(dtype, device):
    """x position 0 is exactly as close to y positions 1 and 2 (d = 1 - 1/sqrt(2)), closer than to
    any other: a tie in its row minimum. y's positions sum to zero, so "spatial" centring is exact."""
    e = torch.eye(4, dtype=torch.float64)
    u, v = e[0] + e[1], e[0] + e[2]
    y = torch.stack([e[3], u, v, -e[3], -u, -v], dim=1)  # (C=4, N=6)
    x = torch.stack([e[0], e[3] + 0.5 * e[1], 0.3 * e[0] - e[2], e[2] + 0.7 * e[3], -e[0] + 0.2 * e[3],
                     e[1] + 0.4 * e[2] + e[3]], dim=1)
    return x.reshape(1, 4, 2, 3).to(device, dtype), y.reshape(1, 4, 2, 3).to(device, dtype)


@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_ties_lowest_index_carries_the_min_gradient(backend, dtype, device):
    """Where a row's minimum distance is reached at several j, the lowest j is the argmin and only
    it carries the minimum's gradient -- the materialised reference's rule (torch.min and
    torch.max return the first index)."""
    x, y = tied_inputs(dtype, device)
    opts = dict(bandwidth=0.1, center="spatial")
    _, m, argmin, _, _ = torch.ops.cocos_kernels.contextual_loss(x, y, 0.1, "spatial", ck.DEFAULT_EPS, backend)
    assert argmin[0, 0].item() == 1
    assert m[0, 0].item() == pytest.approx(1 - 0.5 ** 0.5, rel=1e-6)
    # The tie is exact in the reference too, and it resolves it the same way.
    xh, yh = (f.double() for f in ck.features.contextual_features(x, y, "spatial", ck.DEFAULT_EPS))
    d = 1 - xh[0].T @ yh[0]
    assert d[0, 1] == d[0, 2] == d[0].min()
    check_against_reference(backend, x, y, **opts)
    # ... and the rule matters: with the highest index carrying it (y's positions reversed, so
    # that the reference's first index is the original's last) y's gradient differs.
    loss = ck.contextual_loss(x, y.requires_grad_(), **opts, backend=backend)
    (mine,) = torch.autograd.grad(loss.sum(), y)
    ref_rev, _, y_rev = reference64(x, y.flip(-1), **opts)
    (other,) = torch.autograd.grad(ref_rev.sum(), y_rev)
    assert (mine.double() - other.flip(-1)).abs().max() > 1e-2


# --- small and degenerate inputs -------------------------------------------------------------

@pytest.mark.backends(OP, [torch.float32])
def test_identical_maps_and_single_channel(backend, dtype, device):
    """x == y: each row's minimum is ~0 (largest gradients); C = 1 with channel centring: y is all
    zero after centring, every distance is 1 and the loss is log(N), never NaN."""
    x, _ = make_inputs((2, 64, 6, 5), dtype, device)
    check_against_reference(backend, x, x.clone(), bandwidth=0.1, center="channel")
    x, y = make_inputs((2, 1, 6, 5), dtype, device)
    loss = ck.contextual_loss(x, y, backend=backend)
    assert_close(loss, torch.full((2,), math.log(30.0), dtype=torch.float64), materialised(x, y), name="log N")


@pytest.mark.backends(OP, [torch.float32])
def test_noncontiguous_and_channels_last(backend, dtype, device):
    x, y = make_inputs(SHAPES["B2-C64-9x11"], dtype, device)
    expected, same = reference64(x, y)[0], materialised(x, y)
    cl = [t.to(memory_format=torch.channels_last) for t in (x, y)]
    assert_close(ck.contextual_loss(*cl, backend=backend), expected, same, name="channels_last")
    xt, yt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, y))
    assert not xt.is_contiguous()
    assert_close(ck.contextual_loss(xt, yt, backend=backend), expected, same, name="non-contiguous")


@pytest.mark.backends(OP, [torch.float32])
def test_deterministic(backend, dtype, device):
    runs = []
    for _ in range(2):
        x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C64-14x14"], dtype, device))
        loss = ck.contextual_loss(x, y, backend=backend)
        loss.sum().backward()
        runs.append([loss, x.grad, y.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.backends(OP, [torch.float32])
def test_module(backend, dtype, device):
    x, y = make_inputs(SHAPES["B3-C3-5x7"], dtype, device)
    per_sample = ck.contextual_loss(x, y, 0.2, center="spatial", backend=backend)
    for reduction, expected in (("none", per_sample), ("mean", per_sample.mean()), ("sum", per_sample.sum())):
        module = ck.ContextualLoss(0.2, center="spatial", backend=backend, reduction=reduction)
        torch.testing.assert_close(module(x, y), expected)
    assert "bandwidth=0.2" in repr(module) and "center='spatial'" in repr(module)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'avg'"):
        ck.ContextualLoss(reduction="avg")


def test_auto_picks_a_fused_backend_on_cpu():
    assert ck.select("auto", torch.device("cpu"), torch.float32, OP).name == "cpu"


def test_backend_without_the_op_says_so():
    """A fused backend that does not declare contextual_loss is refused with that reason, without
    loading its kernels."""
    def load():
        raise AssertionError("selection must not load kernels to learn which ops they have")

    backend = ck.dispatch.Backend("no-contextual", 1, frozenset({"cpu"}), frozenset({torch.float32}),
                                  fused=True, ops=frozenset({"correspondence_warp"}))
    ck.dispatch.register(backend)
    try:
        with pytest.raises(ValueError, match=r"backend='no-contextual' cannot run this input: it does not "
                                             r"implement contextual_loss$"):
            ck.select("no-contextual", torch.device("cpu"), torch.float32, OP)
        assert ck.select("no-contextual", torch.device("cpu"), torch.float32).name == "no-contextual"
        assert dataclasses.replace(backend, load=load).op_refusal(OP) == "it does not implement contextual_loss"
    finally:
        del ck.BACKENDS["no-contextual"]
        ck.dispatch._load.cache_clear()


# --- torch.library integration ---------------------------------------------------------------

@pytest.mark.backends(OP, [torch.float64])
def test_opcheck(backend, dtype, device):
    x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B3-C3-5x7"], dtype, device))
    for args in ((x, y, 0.1, "channel", ck.DEFAULT_EPS, backend), (x, y, 0.7, "spatial", 1e-12, backend)):
        torch.library.opcheck(torch.ops.cocos_kernels.contextual_loss.default, args)


@pytest.mark.backends(OP, [torch.float32])
def test_torch_compile_fullgraph(backend, dtype, device):
    x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C64-9x11"], dtype, device))

    def f(x, y):
        return ck.contextual_loss(x, y, 0.1, center="channel", backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, (x, y))
    loss_eager = f(x, y)
    eager = torch.autograd.grad(loss_eager, (x, y))
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


# --- bad input -------------------------------------------------------------------------------

def _good():
    return make_inputs(SHAPES["B2-C64-9x11"], torch.float32, "cpu")


BAD_INPUTS = {
    "x-3d": (lambda x, y: (x[0], y), {}, ValueError, r"x must be 4-D .* got shape \(64, 9, 11\)"),
    "y-not-tensor": (lambda x, y: (x, y.numpy()), {}, TypeError, "y must be a torch.Tensor, got ndarray"),
    "shape-mismatch": (lambda x, y: (x, y[:, :, :5]), {}, ValueError,
                       r"x and y must have the same shape .* got x \(2, 64, 9, 11\), y \(2, 64, 5, 11\)"),
    "batch-mismatch": (lambda x, y: (x, y[:1]), {}, ValueError, r"same shape .* y \(1, 64, 9, 11\)"),
    "int-dtype": (lambda x, y: (x.long(), y), {}, TypeError, "x must be a floating tensor .* got torch.int64"),
    "mixed-dtype": (lambda x, y: (x, y.double()), {}, TypeError, "share one dtype, got torch.float32, torch.float64"),
    "mixed-device": (lambda x, y: (x, y.to("meta")), {}, ValueError, "on one device, got cpu, meta"),
    "empty": (lambda x, y: (x[:, :, :0], y[:, :, :0]), {}, ValueError, r"x is empty: shape \(2, 64, 0, 11\)"),
    "bandwidth-zero": (lambda *t: t, {"bandwidth": 0.0}, ValueError, "bandwidth must be finite and > 0, got 0.0"),
    "bandwidth-negative": (lambda *t: t, {"bandwidth": -0.1}, ValueError, "bandwidth must be finite and > 0, got -0.1"),
    "bandwidth-nan": (lambda *t: t, {"bandwidth": math.nan}, ValueError, "bandwidth must be finite and > 0, got nan"),
    "bandwidth-inf": (lambda *t: t, {"bandwidth": math.inf}, ValueError, "bandwidth must be finite and > 0, got inf"),
    "bandwidth-str": (lambda *t: t, {"bandwidth": "0.1"}, TypeError, "bandwidth must be a real number, got str"),
    "center-none": (lambda *t: t, {"center": None}, ValueError, r"center must be one of \('channel', 'spatial'\), got None"),
    "eps-negative": (lambda *t: t, {"eps": -1e-3}, ValueError, "eps must be a finite number >= 0, got -0.001"),
    "backend": (lambda *t: t, {"backend": "gpu"}, ValueError, "backend must be one of .* got 'gpu'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_rejected_with_a_clear_message(case):
    transform, kwargs, error, message = case
    with pytest.raises(error, match=message):
        ck.contextual_loss(*transform(*_good()), **kwargs)


# --- memory ----------------------------------------------------------------------------------

# Forward+backward (x requiring grad) at a 96x96 grid (N = 9216), C=64, two threads, on the fused
# CPU backend. It must hold O(N*C): inputs, prepared rows, their gradients, the prologue's
# temporaries and the second thread's dX buffer are 2.25 MiB each (9216 x 64 float32); about a
# dozen are alive at the worst moment. The reference holds 324 MiB per 9216 x 9216 matrix (d,
# d_norm, w, A and their gradients): several GiB.
SIDE, CHANNELS = 96, 64
CPU_PEAK_BOUND_MIB = 16 * SIDE * SIDE * CHANNELS * 4 / 2**20 + 8


def _peak_mib(impl: str) -> float:
    return peak_memory_mib(dict(op=OP, impl=impl, side=SIDE, channels=CHANNELS, mode="forward+backward", threads=2,
                                memory_cap_gb=8.0))


def test_cpu_peak_memory_at_96x96():
    assert _peak_mib("cpu") < CPU_PEAK_BOUND_MIB


@pytest.mark.slow
def test_reference_peak_memory_at_96x96_is_what_the_cpu_backend_saves():
    assert _peak_mib("reference") > 1024
