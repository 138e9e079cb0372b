"""correspondence_warp: every fused backend against a float64 evaluation of the reference.

Results in float32, float16 and bfloat16 are judged by cocos_kernels.testing's rule: within twice
the error of the materialised reference run at the same dtype on the same inputs, plus a floor.
"""
import math

import pytest
import torch

import cocos_kernels as ck
from cocos_kernels.features import normalize_features
from cocos_kernels.testing import assert_close, softmax_floor
from conftest import peak_memory_mib

OP = "correspondence_warp"
HALF = [torch.float16, torch.bfloat16]

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


def warp_and_grads(backend, q, k, v, grad, **opts):
    """Output and the three input gradients for upstream gradient `grad`, at the inputs' dtype."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
    out.backward(grad.to(out.device, out.dtype))
    return {"out": out, "grad query": q.grad, "grad key": k.grad, "grad value": v.grad}


def materialised(q, k, v, **opts):
    """The materialised path at the inputs' dtype (the rule's yardstick), or None for float64,
    whose yardstick is the float64 reference itself."""
    return None if q.dtype == torch.float64 else ck.correspondence_warp(q, k, v, backend="reference", **opts)


def max_logit(q, k, temperature=0.01, center="channel", normalize=True, patch_size=1, eps=ck.DEFAULT_EPS, **_):
    """The largest |score| / temperature of the problem, in float64."""
    qf, kf = (normalize_features(t.double(), center, normalize, patch_size, eps) for t in (q, k))
    return (qf.transpose(1, 2) @ kf).abs().max().item() / temperature


def feature_grad_floor(q, k, v, grad, key_mask=None, **opts):
    """The floor of the query and key gradients: softmax_floor, unless a softmax row is one-hot at
    float32 resolution (one key left unmasked, or exp underflowing for all but one key). There the
    exact feature gradients vanish and the materialised softmax backward, a * (g - sum(a * g)), is
    exactly 0, while the fused backwards form dP - rowsum(dO * O) as two sums that cancel: their
    rounding, 2 * eps * sum_c |dO_c| max |v_c|, times 1/temperature, is the floor on such rows."""
    floor = softmax_floor(q.dtype, max_logit(q, k, **opts))
    B, Nk = k.shape[0], k.shape[2] * k.shape[3]
    eye = torch.eye(Nk, dtype=torch.float64, device=k.device).expand(B, Nk, Nk).reshape(B, Nk, *k.shape[2:])
    weights = ck.reference.correspondence_warp(q.double(), k.double(), eye, key_mask=key_mask, **opts)
    eps = torch.finfo(torch.promote_types(q.dtype, torch.float32)).eps
    one_hot = weights.amax(dim=1) >= 1 - eps / 2  # (B, Hq, Wq)
    if not one_hot.any():
        return floor
    v_max = v.double().abs().flatten(2).amax(-1)[:, :, None, None]
    cancelled = (grad.double().abs() * v_max).sum(dim=1)[one_hot].max().item()
    return max(floor, 2 * eps * cancelled / opts.get("temperature", 0.01))


def check_against_reference(backend, q, k, v, key_mask=None, feature_scale=1.0, **opts):
    """Forward and gradients of `backend` against float64, next to the materialised path at the same
    dtype (float64's yardstick being the reference itself). Query and key gradients are multiplied
    by `feature_scale` first: for normalised features they are homogeneous of degree -1 in the
    map's magnitude (~1e-20 for 1e20 inputs), so grad * magnitude is magnitude-free."""
    opts = opts | ({} if key_mask is None else {"key_mask": key_mask})
    grad = torch.randn(v.shape[:2] + q.shape[2:], generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    mine = warp_and_grads(backend, q, k, v, grad, **opts)
    exact = warp_and_grads("reference", *(t.double() for t in (q, k, v, grad)), **opts)
    same = exact if q.dtype == torch.float64 else warp_and_grads("reference", q, k, v, grad, **opts)
    assert mine["out"].shape == exact["out"].shape
    floor = softmax_floor(q.dtype, max_logit(q, k, **opts))
    for name, result in mine.items():
        assert result.dtype == q.dtype, name
        if name in ("out", "grad value"):
            assert_close(result, exact[name], same[name], name=name, floor=floor)
        else:
            s = feature_scale
            assert_close(result.double() * s, exact[name] * s, same[name].double() * s, name=name,
                         floor=feature_grad_floor(q, k, v, grad, **opts))
    return mine


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_matches_float64_reference(backend, dtype, shape, opts, device):
    skip_if_too_slow_interpreted(backend, device, shape, opts)
    check_against_reference(backend, *make_inputs(shape, dtype, device), **opts)


# The shapes that pick each tensor-core kernel class of the CUDA backend (csrc/cuda): C 17 with Cv 48
# the register-resident kernels at D 64; C 256 at D 256 (the forward's widest tiles, the backward's
# 32-row sub-blocks); Cv 151 (ADE20K's labels) the backward's run-time value tiles; 3x3 windows the
# streamed kernels (with Cv 151 their wide value classes).
TENSOR_CORE_SHAPES = ("B2-C17-Cv48-q7x5-k9x11", "B2-C256-Cv3-q12x11-k13x10", "B3-C64-Cv151-q5x7-k6x4")


@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["attention-t1"], OPTIONS["channel-p3-t0.01"]],
                         ids=["channel", "attention", "channel-p3"])
@pytest.mark.parametrize("shape", [SHAPES[s] for s in TENSOR_CORE_SHAPES], ids=TENSOR_CORE_SHAPES)
@pytest.mark.backends(OP, HALF)
def test_half_precision(backend, dtype, shape, opts, device):
    skip_if_too_slow_interpreted(backend, device, shape, opts)
    check_against_reference(backend, *make_inputs(shape, dtype, device), **opts)


@pytest.mark.parametrize("precision,matmul_precision", [("tf32x3", "high"), ("tf32", "medium")])
@pytest.mark.parametrize("opts", [OPTIONS["channel-t0.01"], OPTIONS["channel-p3-t0.01"]], ids=["channel", "channel-p3"])
@pytest.mark.parametrize("shape", [SHAPES[s] for s in TENSOR_CORE_SHAPES], ids=TENSOR_CORE_SHAPES)
@pytest.mark.backends(OP, [torch.float32], features=("precision",))
def test_float32_on_tensor_cores(backend, dtype, shape, opts, precision, matmul_precision, device):
    """precision= tf32x3 / tf32 against float64, the yardstick being the materialised path at the
    matching float32 matmul precision (on a CPU both run in float32)."""
    skip_if_too_slow_interpreted(backend, device, shape, opts)
    q, k, v = make_inputs(shape, dtype, device)
    grad = torch.randn(v.shape[:2] + q.shape[2:], generator=torch.Generator().manual_seed(1)).to(device)
    mine = warp_and_grads(backend, q, k, v, grad, precision=precision, **opts)
    exact = warp_and_grads("reference", *(t.double() for t in (q, k, v, grad)), **opts)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        same = warp_and_grads("reference", q, k, v, grad, **opts)
    finally:
        torch.set_float32_matmul_precision(previous)
    floor = softmax_floor(q.dtype, max_logit(q, k, **opts))
    for name, result in mine.items():
        grad_floor = floor if name in ("out", "grad value") else feature_grad_floor(q, k, v, grad, **opts)
        assert_close(result, exact[name], same[name], name=f"{precision} {name}", floor=grad_floor)


NAIVE = ("channel-t0.01", "channel-p3-t0.01", "nocenter-p3-t0.01", "attention-t1")


@pytest.mark.parametrize("opts", [OPTIONS[name] for name in NAIVE], ids=NAIVE)
def test_reference_matches_a_naive_float64_formula(opts):
    """The yardstick itself, against the textbook formula written out per position: zero-padded k x k
    patches, centred over their C * k * k entries, unit norm, softmax(cos / T) weights of the values."""
    q, k, v = make_inputs((2, 5, 3, (3, 4), (4, 3)), torch.float64, "cpu")
    p, T = opts.get("patch_size", 1), opts["temperature"]

    def feature(x, b, i, j):
        r = p // 2
        padded = torch.nn.functional.pad(x[b], (r, r, r, r))
        f = padded[:, i:i + p, j:j + p].reshape(-1)  # channel-major, as unfold
        if opts["center"] == "channel":
            f = f - f.mean()
        return f / (f.norm() + ck.DEFAULT_EPS) if opts.get("normalize", True) else f

    expected = torch.zeros(2, 3, 3, 4, dtype=torch.float64)
    for b in range(2):
        keys = [(i, j) for i in range(4) for j in range(3)]
        for i in range(3):
            for j in range(4):
                fq = feature(q, b, i, j)
                logits = torch.stack([fq @ feature(k, b, ki, kj) for ki, kj in keys]) / T
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                expected[b, :, i, j] = sum(w * v[b, :, ki, kj] for w, (ki, kj) in zip(weights, keys))
    assert_close(ck.reference.correspondence_warp(q, k, v, **opts), expected, name="out")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)],
                         ids=["query", "key", "value", "query+value"])
@pytest.mark.backends(OP, [torch.float64])
def test_gradient_subsets(backend, dtype, needs, device):
    inputs = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    for t, need in zip(inputs, needs):
        t.requires_grad_(need)
    out = ck.correspondence_warp(*inputs, backend=backend, patch_size=3)
    ref = ck.reference.correspondence_warp(*inputs, patch_size=3)
    wanted = [t for t in inputs if t.requires_grad]
    mine = torch.autograd.grad(out.sum(), wanted)
    theirs = torch.autograd.grad(ref.sum(), wanted)
    for a, b in zip(mine, theirs):
        assert_close(a, b, name="grad")


@pytest.mark.parametrize("opts", [OPTIONS["channel-p3-t0.01"] | {"temperature": 0.5}, OPTIONS["spatial-t0.01"] | {"temperature": 0.3},
                                  OPTIONS["attention-t1"]], ids=["channel-p3", "spatial", "attention"])
@pytest.mark.backends(OP, [torch.float64])
def test_gradcheck(backend, dtype, opts, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), dtype, device))
    assert torch.autograd.gradcheck(lambda q, k, v: ck.correspondence_warp(q, k, v, backend=backend, **opts), (q, k, v))


@pytest.mark.backends(OP, [torch.float32])
def test_noncontiguous_and_channels_last(backend, dtype, device):
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    expected, same = reference64(q, k, v)[0], materialised(q, k, v)
    cl = [t.to(memory_format=torch.channels_last) for t in (q, k, v)]
    assert_close(ck.correspondence_warp(*cl, backend=backend), expected, same, name="channels_last")
    # Transposed spatial axes: same values on a transposed grid.
    qt, kt, vt = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not qt.is_contiguous()
    assert_close(ck.correspondence_warp(qt, kt, vt, backend=backend), expected, same, name="non-contiguous")


@pytest.mark.backends(OP, [torch.float32])
def test_zero_centred_key_is_zero_similarity(backend, dtype, device):
    """A key position whose centred feature is all zeros has similarity 0, never NaN."""
    q, k, v = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], dtype, device)
    k[:, :, 2, 3] = 1.5  # constant over channels: zero after channel centring
    k[:, :, 0, :] = 0.0
    q[:, :, 1, 1] = -2.0  # a constant query row: uniform softmax
    out = check_against_reference(backend, q, k, v)["out"]
    assert torch.isfinite(out).all()
    same = materialised(q, k, v)
    assert_close(out[:, :, 1, 1], v.double().mean(dim=(2, 3)), same[:, :, 1, 1], name="uniform row")


@pytest.mark.backends(OP, [torch.float32])
def test_cycle_and_module(backend, dtype, device):
    q, k, v = make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device)
    warp = ck.CorrespondenceWarp(temperature=0.01, backend=backend)
    out = warp(q, k, v)
    back = warp(k, q, out)  # the cycle: the same op with query and key swapped
    assert back.shape == v.shape
    out64 = reference64(q, k, v)[0]
    same = materialised(k, q, materialised(q, k, v))
    assert_close(back, reference64(k, q, out64)[0], same, name="cycle")
    assert "temperature=0.01" in repr(warp)


@pytest.mark.backends(OP, [torch.float32])
def test_deterministic(backend, dtype, device):
    runs = []
    for _ in range(2):
        q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B3-C64-Cv151-q5x7-k6x4"], dtype, device))
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

@pytest.mark.backends(OP, [torch.float64])
def test_opcheck(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 5, 3, (3, 4), (4, 3)), dtype, device))
    mask = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0)).to(device) > 0.3
    for args in ((q, k, v, None, 0.1, "channel", True, 3, 1e-12, backend), (q, k, v, mask, 1.0, None, False, 1, 0.0, backend)):
        torch.library.opcheck(torch.ops.cocos_kernels.correspondence_warp.default, args)


@pytest.mark.backends(OP, [torch.float32])
def test_torch_compile_fullgraph(backend, dtype, device):
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES["B2-C17-Cv48-q7x5-k9x11"], dtype, device))

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


@pytest.mark.backends(OP, [torch.float32])
def test_torch_export(backend, dtype, device):

    class Warp(torch.nn.Module):
        def forward(self, q, k, v):
            return ck.correspondence_warp(q, k, v, backend=backend)

    inputs = make_inputs(SHAPES["B1-C3-Cv3-q7x5-k9x11"], dtype, device)
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
    return peak_memory_mib(dict(impl=impl, side=128, channels=64, value_channels=3, mode="forward+backward",
                                memory_cap_gb=8.0))


def test_cpu_peak_memory_at_128x128():
    assert _peak_mib("cpu") < CPU_PEAK_BOUND_MIB


@pytest.mark.slow
def test_reference_peak_memory_at_128x128_is_what_the_cpu_backend_saves():
    assert _peak_mib("reference") > 2048
