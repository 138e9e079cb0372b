"""correspondence_warp: every backend against a float64 evaluation of the reference."""
import math

import pytest
import torch

import cocos_kernels as ck
from conftest import assert_close, skip_unless_runs

FUSED = [name for name, b in ck.BACKENDS.items() if b.fused]
ALL = list(ck.BACKENDS)

# dtype -> tolerance relative to the largest reference magnitude, at temperature 0.01
# (scores up to 100 make rounding of the features visible in the softmax).
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

SHAPES = {  # id: (B, C, Cv, query grid, key grid)
    "B1-C1-Cv1-q1x1-k1x1": (1, 1, 1, (1, 1), (1, 1)),
    "B1-C3-Cv3-q7x5-k9x11": (1, 3, 3, (7, 5), (9, 11)),
    "B2-C17-Cv48-q7x5-k9x11": (2, 17, 48, (7, 5), (9, 11)),
    "B3-C64-Cv151-q5x7-k6x4": (3, 64, 151, (5, 7), (6, 4)),
    "B2-C256-Cv3-q12x11-k13x10": (2, 256, 3, (12, 11), (13, 10)),
    "B1-C17-Cv1-q3x1-k1x3": (1, 17, 1, (3, 1), (1, 3)),
}

OPTIONS = {  # id: keyword arguments
    "channel-t0.01": dict(temperature=0.01, center="channel"),
    "spatial-t0.01": dict(temperature=0.01, center="spatial"),
    "nocenter-t1": dict(temperature=1.0, center=None),
    "channel-p3-t0.01": dict(temperature=0.01, center="channel", patch_size=3),
    "spatial-p3-t1": dict(temperature=1.0, center="spatial", patch_size=3),
    "nocenter-p3-t0.01": dict(temperature=0.01, center=None, patch_size=3),
    "attention-t1": dict(temperature=1.0, center=None, normalize=False),
    "attention-p3-t1": dict(temperature=1.0, center=None, normalize=False, patch_size=3),
}


def skip_if_too_slow_interpreted(backend, device, shape, opts):
    """The Triton interpreter steps through every program in Python: 2304-wide features (C=256
    with 3x3 patches) take ~10 s a case there, so on CPU tensors triton covers that width with one
    option set only (the widths 153 and 576 exercise the same chunked code with every option)."""
    B, C, *_ = shape
    if (backend == "triton" and device.type == "cpu" and C * opts.get("patch_size", 1) ** 2 > 1024
            and opts is not OPTIONS["channel-p3-t0.01"]):
        pytest.skip("triton on the interpreter: one option set at D=2304 (see skip_if_too_slow_interpreted)")


def make_inputs(shape, dtype, device, seed=0):
    B, C, Cv, (Hq, Wq), (Hk, Wk) = shape
    g = torch.Generator().manual_seed(seed)
    # Plain attention has unnormalised logits: keep them O(1) so float32 stays meaningful.
    scale = C ** -0.25
    q = torch.randn(B, C, Hq, Wq, generator=g) * scale
    k = torch.randn(B, C, Hk, Wk, generator=g) * scale
    v = torch.randn(B, Cv, Hk, Wk, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)]


def reference64(q, k, v, **opts):
    """The reference in float64, with its gradients for a fixed upstream gradient."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = ck.reference.correspondence_warp(q, k, v, **opts)
    return out, q, k, v


def check_against_reference(backend, q, k, v, rtol, **opts):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
    ref, q64, k64, v64 = reference64(q, k, v, **opts)
    assert out.dtype == v.dtype and out.shape == ref.shape
    assert_close(out, ref, rtol, "out")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(out.device, out.dtype))
    ref.backward(grad)
    for name, mine, theirs in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        assert mine.grad.dtype == mine.dtype
        assert_close(mine.grad, theirs.grad, rtol, f"grad {name}")


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_matches_float64_reference(backend, dtype, shape, opts, device):
    skip_unless_runs(backend, device, dtype)
    skip_if_too_slow_interpreted(backend, device, shape, opts)
    q, k, v = make_inputs(shape, dtype, device)
    check_against_reference(backend, q, k, v, RTOL[dtype], **opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["attention-t1"]], ids=["channel", "attention"])
@pytest.mark.parametrize("backend", FUSED)
def test_half_precision(backend, dtype, opts, device):
    skip_unless_runs(backend, device, dtype)
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    check_against_reference(backend, q, k, v, RTOL[dtype], **opts)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)],
                         ids=["query", "key", "value", "query+value"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradient_subsets(backend, needs, device):
    skip_unless_runs(backend, device, torch.float64)
    inputs = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float64, device)
    for t, need in zip(inputs, needs):
        t.requires_grad_(need)
    out = ck.correspondence_warp(*inputs, backend=backend, patch_size=3)
    ref = ck.reference.correspondence_warp(*inputs, patch_size=3)
    wanted = [t for t in inputs if t.requires_grad]
    mine = torch.autograd.grad(out.sum(), wanted)
    theirs = torch.autograd.grad(ref.sum(), wanted)
    for a, b in zip(mine, theirs):
        assert_close(a, b, RTOL[torch.float64], "grad")


@pytest.mark.parametrize("opts", [OPTIONS["channel-p3-t0.01"] | {"temperature": 0.5}, OPTIONS["spatial-t0.01"] | {"temperature": 0.3},
                                  OPTIONS["attention-t1"]], ids=["channel-p3", "spatial", "attention"])
@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck(backend, opts, device):
    skip_unless_runs(backend, device, torch.float64)
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), torch.float64, device))
    assert torch.autograd.gradcheck(lambda q, k, v: ck.correspondence_warp(q, k, v, backend=backend, **opts), (q, k, v))


@pytest.mark.parametrize("backend", ALL)
def test_noncontiguous_and_channels_last(backend, device):
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, device)
    expected = reference64(q, k, v)[0]
    cl = [t.to(memory_format=torch.channels_last) for t in (q, k, v)]
    assert_close(ck.correspondence_warp(*cl, backend=backend), expected, RTOL[torch.float32], "channels_last")
    # Transposed spatial axes: same values on a transposed grid.
    qt, kt, vt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert_close(ck.correspondence_warp(qt, kt, vt, backend=backend), expected, RTOL[torch.float32], "non-contiguous")


@pytest.mark.parametrize("backend", ALL)
def test_zero_centred_key_is_zero_similarity(backend, device):
    """A key position whose centred feature is all zeros has similarity 0, never NaN."""
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float32, device)
    k[:, :, 2, 3] = 1.5  # constant over channels: zero after channel centring
    k[:, :, 0, :] = 0.0
    q[:, :, 1, 1] = -2.0  # a constant query row: uniform softmax
    for t in (q, k, v):
        t.requires_grad_()
    out = ck.correspondence_warp(q, k, v, backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert_close(out, reference64(q, k, v)[0], RTOL[torch.float32], "out")
    assert_close(out[:, :, 1, 1], v.mean(dim=(2, 3)), RTOL[torch.float32], "uniform row")


@pytest.mark.parametrize("backend", FUSED)
def test_cycle_and_module(backend, device):
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, device)
    warp = ck.CorrespondenceWarp(temperature=0.01, backend=backend)
    out = warp(q, k, v)
    back = warp(k, q, out)  # the cycle: the same op with query and key swapped
    assert back.shape == v.shape
    out64 = reference64(q, k, v)[0]
    assert_close(back, reference64(k, q, out64)[0], RTOL[torch.float32], "cycle")
    assert "temperature=0.01" in repr(warp)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend, device):
    skip_unless_runs(backend, device, torch.float32)
    runs = []
    for _ in range(2):
        q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B3-C64-Cv151-q5x7-k6x4"], torch.float32, device))
        out = ck.correspondence_warp(q, k, v, backend=backend, patch_size=3)
        out.backward(torch.ones_like(out))
        runs.append([out, q.grad, k.grad, v.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_auto_picks_a_fused_backend_on_cpu():
    assert ck.select("auto", torch.device("cpu"), torch.float32).name == "cpu"


def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run this input: it runs on \['cpu'\] tensors, not meta"):
        ck.select("cpu", torch.device("meta"), torch.float32)


# --- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, device):
    skip_unless_runs(backend, device, torch.float64)
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), torch.float64, device))
    mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
    for args in ((q, k, v, None, 0.1, "channel", True, 3, 1e-12, backend), (q, k, v, mask, 1.0, None, False, 1, 0.0, backend)):
        torch.library.opcheck(torch.ops.cocos_kernels.correspondence_warp.default, args)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, device):
    skip_unless_runs(backend, device, torch.float32)
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, device))

    def f(q, k, v):
        return ck.correspondence_warp(q, k, v, 0.01, patch_size=3, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = f(q, k, v)
    eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_export(backend, device):
    skip_unless_runs(backend, device, torch.float32)

    class Warp(torch.nn.Module):
        def forward(self, q, k, v):
            return ck.correspondence_warp(q, k, v, backend=backend)

    inputs = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], torch.float32, device)
    program = torch.export.export(Warp(), tuple(inputs))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert any("cocos_kernels.correspondence_warp" in str(n.target) for n in calls)
    torch.testing.assert_close(program.module()(*inputs), Warp()(*inputs))


# --- bad input -------------------------------------------------------------------------------

def _good():
    return make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], torch.float32, "cpu")


BAD_INPUTS = {
    "query-3d": (lambda q, k, v: (q[0], k, v), {}, ValueError, r"query must be 4-D .* got shape \(17, 7, 5\)"),
    "value-not-tensor": (lambda q, k, v: (q, k, v.numpy()), {}, TypeError, "value must be a torch.Tensor, got ndarray"),
    "batch-mismatch": (lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, r"same batch size: query \(2, 17, 7, 5\), key \(1, 17, 9, 11\)"),
    "channel-mismatch": (lambda q, k, v: (q, k[:, :3], v), {}, ValueError, r"same number of channels: query \(2, 17, 7, 5\), key \(2, 3, 9, 11\)"),
    "value-grid": (lambda q, k, v: (q, k, v[:, :, :4]), {}, ValueError, r"value must be on the key's grid .* value \(2, 48, 4, 11\)"),
    "int-dtype": (lambda q, k, v: (q.long(), k, v), {}, TypeError, "query must be a floating tensor .* got torch.int64"),
    "mixed-dtype": (lambda q, k, v: (q, k.double(), v), {}, TypeError, "share one dtype, got torch.float32, torch.float64"),
    "mixed-device": (lambda q, k, v: (q, k.to("meta"), v), {}, ValueError, "on one device, got cpu, meta"),
    "empty": (lambda q, k, v: (q[:, :, :0], k, v), {}, ValueError, r"query is empty: shape \(2, 17, 0, 5\)"),
    "temperature-zero": (lambda *t: t, {"temperature": 0.0}, ValueError, "temperature must be finite and > 0, got 0.0"),
    "temperature-negative": (lambda *t: t, {"temperature": -1}, ValueError, "temperature must be finite and > 0, got -1"),
    "temperature-nan": (lambda *t: t, {"temperature": math.nan}, ValueError, "temperature must be finite and > 0, got nan"),
    "temperature-inf": (lambda *t: t, {"temperature": math.inf}, ValueError, "temperature must be finite and > 0, got inf"),
    "temperature-tensor": (lambda *t: t, {"temperature": "0.01"}, TypeError, "temperature must be a real number, got str"),
    "center": (lambda *t: t, {"center": "mean"}, ValueError, "center must be one of .* got 'mean'"),
    "patch-even": (lambda *t: t, {"patch_size": 2}, ValueError, "patch_size must be an odd integer >= 1, got 2"),
    "eps-negative": (lambda *t: t, {"eps": -1e-3}, ValueError, "eps must be a finite number >= 0, got -0.001"),
    "normalize-str": (lambda *t: t, {"normalize": "yes"}, TypeError, "normalize must be a bool, got str"),
    "backend": (lambda *t: t, {"backend": "gpu"}, ValueError, "backend must be one of .* got 'gpu'"),
    "precision": (lambda *t: t, {"precision": "fp32"}, ValueError, r"precision must be None or one of \('ieee', 'tf32x3', 'tf32'\), got 'fp32'"),
    "precision-case": (lambda *t: t, {"precision": "IEEE"}, ValueError, "precision must be None or one of .* got 'IEEE'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_rejected_with_a_clear_message(case):
    transform, kwargs, error, message = case
    with pytest.raises(error, match=message):
        ck.correspondence_warp(*transform(*_good()), **kwargs)


# --- memory ----------------------------------------------------------------------------------

# Forward+backward at a 128x128 query and key grid, C=64, Cv=3 on the fused CPU backend.
# What it must hold is O(N*C): inputs, prepared features, their gradients and the prologue's
# temporaries are 4 MiB each (16384 x 64 float32), the per-thread dQ buffers one more per
# thread, score tiles 64 KiB per thread; about twenty such copies at the worst moment, so
# 128 MiB with allocator slack. The reference holds 1 GiB per 16384 x 16384 matrix and
# needs several of them (scores, softmax, their gradients): over 2 GiB.
CPU_PEAK_BOUND_MIB = 128


def _peak_mib(impl: str) -> float:
    from benchmarks.bench_correspondence_warp import measure

    result = measure(dict(impl=impl, side=128, channels=64, value_channels=3, mode="forward+backward",
                          repeats=1, warmup=0, memory_cap_gb=8.0))
    assert result["status"] == "ok", result["error"]
    return result["peak_bytes"] / 2**20


def test_cpu_peak_memory_at_128x128():
    assert _peak_mib("cpu") < CPU_PEAK_BOUND_MIB


@pytest.mark.slow
def test_reference_peak_memory_at_128x128_is_what_the_cpu_backend_saves():
    assert _peak_mib("reference") > 2048
