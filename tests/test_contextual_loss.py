"""contextual_loss: every backend implementing it against a float64 evaluation of the reference."""
import dataclasses
import math

import pytest
import torch

import cocos_kernels as ck
from conftest import assert_close, skip_unless_runs

OP = "contextual_loss"
FUSED = [name for name, b in ck.BACKENDS.items() if b.fused]
ALL = list(ck.BACKENDS)

# dtype -> tolerance relative to the largest reference magnitude. float32 rounding of the cosine
# distances is divided by bandwidth * (min distance + 1e-3), which is small where a row has a
# near match: gradients then reach 1e4 and their float32 rounding with them.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# With C = 1 every normalised feature is -1, 0 or 1: rows have a distance-0 match, the gradients
# w.r.t. the normalised features reach 1/(h * 1e-3), and the normalisation's backward cancels
# them to a true input gradient of ~0 -- leaving float32 rounding noise of ~1e-2 in every
# implementation, the float32 reference included.
C1_FLOAT32_GRAD_TOL = 5e-2

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


def skip_unless_implements(backend, device, dtype):
    """Skip where the backend cannot take this device/dtype or has no contextual_loss kernels."""
    skip_unless_runs(backend, device, dtype)
    reason = ck.BACKENDS[backend].op_refusal(OP)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Post-ReLU VGG features are non-negative: half of them zero.
    x = torch.randn(shape, generator=g).relu()
    y = torch.randn(shape, generator=g).relu()
    return x.to(device, dtype), y.to(device, dtype)


def reference64(x, y, **opts):
    x, y = (t.detach().double().requires_grad_() for t in (x, y))
    return ck.reference.contextual_loss(x, y, **opts), x, y


def check_against_reference(backend, x, y, rtol, grad_rtol=None, **opts):
    x, y = (t.detach().requires_grad_() for t in (x, y))
    loss = ck.contextual_loss(x, y, **opts, backend=backend)
    ref, x64, y64 = reference64(x, y, **opts)
    assert loss.dtype == x.dtype and loss.shape == (x.shape[0],)
    assert_close(loss, ref, rtol, "loss")
    grad = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    loss.backward(grad.to(loss.device, loss.dtype))
    ref.backward(grad)
    for name, mine, theirs in (("x", x, x64), ("y", y, y64)):
        assert mine.grad.dtype == mine.dtype
        assert_close(mine.grad, theirs.grad, rtol if grad_rtol is None else grad_rtol, f"grad {name}")


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_matches_float64_reference(backend, dtype, shape, opts, device):
    skip_unless_implements(backend, device, dtype)
    x, y = make_inputs(shape, dtype, device)
    grad_rtol = C1_FLOAT32_GRAD_TOL if shape[1] == 1 and dtype == torch.float32 else None
    check_against_reference(backend, x, y, RTOL[dtype], grad_rtol, **opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_half_precision(backend, dtype, device):
    skip_unless_implements(backend, device, dtype)
    x, y = make_inputs(SHAPES["B2-C64-9x11"], dtype, device)
    # Half inputs are rounded before the float32 computation: judge against those rounded values.
    check_against_reference(backend, x, y, RTOL[dtype], bandwidth=0.1, center="channel")


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["x", "y"])
@pytest.mark.parametrize("center", ["channel", "spatial"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradient_subsets(backend, center, needs, device):
    skip_unless_implements(backend, device, torch.float64)
    inputs = make_inputs(SHAPES["B3-C3-5x7"], torch.float64, device)
    for t, need in zip(inputs, needs):
        t.requires_grad_(need)
    wanted = [t for t in inputs if t.requires_grad]
    mine = torch.autograd.grad(ck.contextual_loss(*inputs, center=center, backend=backend).sum(), wanted)
    theirs = torch.autograd.grad(ck.reference.contextual_loss(*inputs, center=center).sum(), wanted)
    for a, b in zip(mine, theirs):
        assert_close(a, b, RTOL[torch.float64], "grad")


@pytest.mark.parametrize("opts", [dict(bandwidth=0.1, center="channel"), dict(bandwidth=0.5, center="spatial"),
                                  dict(bandwidth=1.0, center="channel")], ids=["channel-h0.1", "spatial-h0.5", "channel-h1"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck(backend, opts, device):
    skip_unless_implements(backend, device, torch.float64)
    g = torch.Generator().manual_seed(3)
    # Dense features (no ReLU zeros): no position sits at a kink of the row minimum.
    x, y = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_ties_lowest_index_carries_the_min_gradient(backend, dtype, device):
    """Where a row's minimum distance is reached at several j, the lowest j is the argmin and only
    it carries the minimum's gradient -- the materialised reference's rule (torch.min and
    torch.max return the first index)."""
    skip_unless_implements(backend, device, dtype)
    x, y = tied_inputs(dtype, device)
    opts = dict(bandwidth=0.1, center="spatial")
    _, m, argmin, _, _ = torch.ops.cocos_kernels.contextual_loss(x, y, 0.1, "spatial", ck.DEFAULT_EPS, backend)
    assert argmin[0, 0].item() == 1
    assert m[0, 0].item() == pytest.approx(1 - 0.5 ** 0.5, rel=1e-6)
    # The tie is exact in the reference too, and it resolves it the same way.
    xh, yh = (f.double() for f in ck.features.contextual_features(x, y, "spatial", ck.DEFAULT_EPS))
    d = 1 - xh[0].T @ yh[0]
    assert d[0, 1] == d[0, 2] == d[0].min()
    check_against_reference(backend, x, y, RTOL[dtype], **opts)
    # ... and the rule matters: with the highest index carrying it (y's positions reversed, so
    # that the reference's first index is the original's last) y's gradient differs.
    loss = ck.contextual_loss(x, y.requires_grad_(), **opts, backend=backend)
    (mine,) = torch.autograd.grad(loss.sum(), y)
    ref_rev, _, y_rev = reference64(x, y.flip(-1), **opts)
    (other,) = torch.autograd.grad(ref_rev.sum(), y_rev)
    assert (mine.double() - other.flip(-1)).abs().max() > 1e-2


# --- small and degenerate inputs -------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
def test_identical_maps_and_single_channel(backend, device):
    """x == y: each row's minimum is ~0 (largest gradients); C = 1 with channel centring: y is all
    zero after centring, every distance is 1 and the loss is log(N), never NaN."""
    skip_unless_implements(backend, device, torch.float32)
    x, _ = make_inputs((2, 64, 6, 5), torch.float32, device)
    check_against_reference(backend, x, x.clone(), RTOL[torch.float32], bandwidth=0.1, center="channel")
    x, y = make_inputs((2, 1, 6, 5), torch.float32, device)
    loss = ck.contextual_loss(x, y, backend=backend)
    assert_close(loss, torch.full((2,), math.log(30.0)), 1e-6, "log N")


@pytest.mark.parametrize("backend", ALL)
def test_noncontiguous_and_channels_last(backend, device):
    skip_unless_implements(backend, device, torch.float32)
    x, y = make_inputs(SHAPES["B2-C64-9x11"], torch.float32, device)
    expected = reference64(x, y)[0]
    cl = [t.to(memory_format=torch.channels_last) for t in (x, y)]
    assert_close(ck.contextual_loss(*cl, backend=backend), expected, RTOL[torch.float32], "channels_last")
    xt, yt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, y))
    assert not xt.is_contiguous()
    assert_close(ck.contextual_loss(xt, yt, backend=backend), expected, RTOL[torch.float32], "non-contiguous")


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend, device):
    skip_unless_implements(backend, device, torch.float32)
    runs = []
    for _ in range(2):
        x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C64-14x14"], torch.float32, device))
        loss = ck.contextual_loss(x, y, backend=backend)
        loss.sum().backward()
        runs.append([loss, x.grad, y.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_module(backend, device):
    skip_unless_implements(backend, device, torch.float32)
    x, y = make_inputs(SHAPES["B3-C3-5x7"], torch.float32, device)
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

@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, device):
    skip_unless_implements(backend, device, torch.float64)
    x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B3-C3-5x7"], torch.float64, device))
    for args in ((x, y, 0.1, "channel", ck.DEFAULT_EPS, backend), (x, y, 0.7, "spatial", 1e-12, backend)):
        torch.library.opcheck(torch.ops.cocos_kernels.contextual_loss.default, args)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, device):
    skip_unless_implements(backend, device, torch.float32)
    x, y = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C64-9x11"], torch.float32, device))

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
    from benchmarks.bench_correspondence_warp import measure

    result = measure(dict(op=OP, impl=impl, side=SIDE, channels=CHANNELS, mode="forward+backward",
                          repeats=0, warmup=0, threads=2, memory_cap_gb=8.0))
    assert result["status"] == "ok", result["error"]
    return result["peak_bytes"] / 2**20


def test_cpu_peak_memory_at_96x96():
    assert _peak_mib("cpu") < CPU_PEAK_BOUND_MIB


@pytest.mark.slow
def test_reference_peak_memory_at_96x96_is_what_the_cpu_backend_saves():
    assert _peak_mib("reference") > 1024
