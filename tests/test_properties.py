"""correspondence_warp: property-based tests (hypothesis) and numerical edge cases, every fused backend.

Properties (random shapes and options, judged against the float64 reference by
cocos_kernels.testing's rule, the materialised path at the same dtype being the yardstick):
  * forward and gradients match the float64 reference;
  * softmax rows sum to one: warping a constant value returns that constant;
  * permuting key positions together with value positions leaves the output unchanged;
  * scaling a feature map by a positive scalar changes nothing when normalising.
Edge cases (parametrised): constant feature maps (centred features exactly zero), huge and tiny
magnitudes in float32, a temperature so small that exp underflows for all but one key, and
NaN/Inf in the inputs (which propagate exactly as in the reference: documented below).

Hypothesis runs derandomized (the same examples on every run, no example database), without a
deadline; the Triton backend runs through the interpreter on CPU tensors, so it gets far fewer
examples and tinier grids there (`examples`, `grid`). A failure prints hypothesis's falsifying
example: the shape, options and data seed, enough to rebuild the inputs with `make`.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import cocos_kernels as ck  # noqa: E402
from cocos_kernels.testing import assert_close, softmax_floor  # noqa: E402
from test_correspondence_warp import check_against_reference, materialised, max_logit, reference64  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")
OP = "correspondence_warp"


def interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def examples(backend, device, n):
    """n hypothesis examples; a tenth (at least 3) for Triton through the interpreter."""
    return max(3, n // 10) if interpreted(backend, device) else n


def grid(backend, device):
    """Largest (H, W) drawn: odd and non-square; 3x4 for the interpreter."""
    return (3, 4) if interpreted(backend, device) else (5, 6)


def run_property(n, strategy, check):
    """Run `check(case)` on `n` derandomized hypothesis examples drawn from `strategy`."""
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def prop(case):
        ran.append(case)
        check(case)
    ran = []
    prop()
    # Guard against a vacuous pass: derandomized hypothesis runs exactly n generated examples
    # here (no filters, no database replay).
    assert len(ran) >= n, f"hypothesis ran {len(ran)} examples, expected {n}"


def make(shape, dtype, device, seed):
    """q (B, C, Hq, Wq), k (B, C, Hk, Wk), v (B, Cv, Hk, Wk): as make_inputs, any seed."""
    B, C, Cv, (Hq, Wq), (Hk, Wk) = shape
    g = torch.Generator().manual_seed(seed)
    scale = C ** -0.25  # keeps unnormalised (attention) logits O(1)
    q = torch.randn(B, C, Hq, Wq, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, C, Hk, Wk, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, Cv, Hk, Wk, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v)]


@st.composite
def cases(draw, max_hw, max_c=20):
    """A random problem: shape, options and a data seed."""
    H, W = max_hw
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, max_c)), draw(st.integers(1, 5)),
             (draw(st.integers(1, H)), draw(st.integers(1, W))), (draw(st.integers(1, H)), draw(st.integers(1, W))))
    opts = dict(
        temperature=10.0 ** draw(st.floats(-3, 3)),  # log-uniform in [1e-3, 1e3]
        center=draw(st.sampled_from(["channel", "spatial", None])),
        normalize=draw(st.booleans()),
        patch_size=draw(st.sampled_from([1, 3, 5])),
    )
    return shape, opts, draw(st.integers(0, 2**31 - 1))


# Examples per property and dtype on the cpu backend (Triton on the interpreter: a tenth).
N_MATCH, N_ROWS, N_PERM, N_SCALE, N_MASK = 400, 200, 200, 200, 200


# --- properties ---------------------------------------------------------------------------------

@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_property_matches_float64_reference(backend, dtype, device):
    """Forward and all three gradients against the float64 reference, on random problems."""
    def check(case):
        shape, opts, seed = case
        check_against_reference(backend, *make(shape, dtype, device, seed), **opts)

    run_property(examples(backend, device, N_MATCH), cases(grid(backend, device)), check)


@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_property_rows_sum_to_one(backend, dtype, device):
    """Warping a value that is constant over the key grid returns that constant everywhere."""
    def check(case):
        shape, opts, seed = case
        q, k, v = make(shape, dtype, device, seed)
        const = v[:, :, :1, :1].expand_as(v).contiguous()  # each channel's first value, everywhere
        out = ck.correspondence_warp(q, k, const, backend=backend, **opts)
        expected = const[:, :, :1, :1].expand_as(out).double()
        assert_close(out, expected, materialised(q, k, const, **opts), name="constant value",
                     floor=softmax_floor(dtype, max_logit(q, k, **opts)))

    run_property(examples(backend, device, N_ROWS), cases(grid(backend, device)), check)


@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_property_key_permutation(backend, dtype, device):
    """Permuting key positions together with value positions leaves the output unchanged
    (patch_size 1 only: with patches a position's neighbourhood changes with the permutation):
    the permuted problem's output is judged against the original's float64 output."""
    def check(case):
        (shape, opts, seed), perm_seed = case
        opts = opts | {"patch_size": 1}
        q, k, v = make(shape, dtype, device, seed)
        B, _, Hk, Wk = k.shape
        perm = torch.randperm(Hk * Wk, generator=torch.Generator().manual_seed(perm_seed)).to(device)

        def permute(x):
            return x.reshape(B, x.shape[1], -1)[:, :, perm].reshape(x.shape)

        permuted = ck.correspondence_warp(q, permute(k), permute(v), backend=backend, **opts)
        assert_close(permuted, reference64(q, k, v, **opts)[0], materialised(q, permute(k), permute(v), **opts),
                     name="permuted keys", floor=softmax_floor(dtype, max_logit(q, k, **opts)))

    strategy = st.tuples(cases(grid(backend, device)), st.integers(0, 2**31 - 1))
    run_property(examples(backend, device, N_PERM), strategy, check)


@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_property_scale_invariance(backend, dtype, device):
    """With normalize=True, multiplying the query and/or key map by positive scalars (1e-3..1e3)
    changes nothing, whatever the centring (each is linear in the map, the norm divides it out)."""
    def check(case):
        (shape, opts, seed), a, b = case
        opts = opts | {"normalize": True}
        q, k, v = make(shape, dtype, device, seed)
        out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
        scaled = ck.correspondence_warp(q * a, k * b, v, backend=backend, **opts)
        # The scaled maps are rounded once more in `dtype`: judge both against the float64 truth.
        expected, floor = reference64(q, k, v, **opts)[0], softmax_floor(dtype, max_logit(q, k, **opts))
        assert_close(out, expected, materialised(q, k, v, **opts), name="unscaled", floor=floor)
        assert_close(scaled, expected, materialised(q * a, k * b, v, **opts), name=f"query * {a:g}, key * {b:g}",
                     floor=floor)

    scale = st.floats(-3, 3).map(lambda e: 10.0 ** e)
    strategy = st.tuples(cases(grid(backend, device)), scale, scale)
    run_property(examples(backend, device, N_SCALE), strategy, check)


@pytest.mark.backends(OP, [torch.float32, torch.float64], features=("key_mask",))
def test_property_key_mask(backend, dtype, device):
    """With a random key mask (any fraction masked, whole samples included) forward and
    gradients match the float64 reference; fully masked samples give zeros, never NaN."""
    def check(case):
        (shape, opts, seed), keep = case
        q, k, v = make(shape, dtype, device, seed)
        B, _, Hk, Wk = k.shape
        mask = (torch.rand(B, Hk, Wk, generator=torch.Generator().manual_seed(seed)) < keep).to(device)
        check_against_reference(backend, q, k, v, key_mask=mask, **opts)

    strategy = st.tuples(cases(grid(backend, device)), st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    run_property(examples(backend, device, N_MASK), strategy, check)


# --- edge cases ---------------------------------------------------------------------------------

def check_all(backend, q, k, v, feature_scale=1.0, **opts):
    """check_against_reference, on a problem whose float64 output is finite."""
    assert torch.isfinite(reference64(q, k, v, **opts)[0]).all()
    return check_against_reference(backend, q, k, v, feature_scale=feature_scale, **opts)["out"]


CENTRES = {"channel": "channel", "spatial": "spatial", "nocenter": None}
SHAPE = (2, 6, 3, (3, 4), (4, 3))


@pytest.mark.parametrize("patch_size", [1, 3])
@pytest.mark.parametrize("center", CENTRES.values(), ids=CENTRES.keys())
@pytest.mark.parametrize("which", ["query", "key", "both"])
@pytest.mark.backends(OP, [torch.float32])
def test_constant_feature_maps(backend, dtype, which, center, patch_size, device):
    """Constant maps: every centred feature is exactly zero (channel or spatial centring), so
    every similarity is 0 and the weights uniform (as in the reference), never NaN; with
    center=None the constant map is a plain feature and the output matches the reference.

    The constants (0.75, -1.25) have short mantissas, so the float32 mean is exact and the
    centred features exactly zero in float32 as in float64. (With e.g. -1.3 the float32 mean
    rounds, the centred features are ~1e-7 instead of 0, and the gradient there, I/(|c| + eps),
    is ~1e7 instead of 1/eps ~ 4.5e15: the point is that ill-conditioned, not a backend bug; the
    output still matches.)"""
    q, k, v = make(SHAPE, dtype, device, seed=3)
    if which in ("query", "both"):
        q = torch.full_like(q, 0.75)
    if which in ("key", "both"):
        k = torch.full_like(k, -1.25)
    out = check_all(backend, q, k, v, center=center, patch_size=patch_size)
    if center is not None and patch_size == 1:  # zero-padded patches are not constant at borders
        uniform = v.double().mean(dim=(2, 3), keepdim=True).expand_as(out)
        assert_close(out, uniform, materialised(q, k, v, center=center), name="uniform weights")


# (magnitude, eps): eps only matters for tiny maps (|x| << eps = 2.2e-16 masks the norm; with
# eps=0 nothing masks a norm whose squares underflowed to 0).
MAGNITUDES = {"1e-20": (1e-20, ck.features.DEFAULT_EPS), "1e-20-eps0": (1e-20, 0.0),
              "1e-30": (1e-30, ck.features.DEFAULT_EPS), "1e-30-eps0": (1e-30, 0.0),
              "1e20": (1e20, ck.features.DEFAULT_EPS), "1e30": (1e30, ck.features.DEFAULT_EPS)}


@pytest.mark.parametrize("patch_size", [1, 3])
@pytest.mark.parametrize("center", CENTRES.values(), ids=CENTRES.keys())
@pytest.mark.parametrize("magnitude_eps", MAGNITUDES.values(), ids=MAGNITUDES.keys())
@pytest.mark.backends(OP, [torch.float32])
def test_huge_and_tiny_magnitudes(backend, dtype, magnitude_eps, center, patch_size, device):
    """float32 features of magnitude 1e+-20 and 1e+-30 (normalised): their squares leave float32
    (1e40 overflows, 1e-46 underflows), the float64 reference on the same values is fine, and so
    must every backend be (forward and gradients, no NaN). With eps=0 nothing masks a norm that
    underflowed to 0. normalize=False is not tested here: its logits (1e40) are not float32."""
    magnitude, eps = magnitude_eps
    q, k, v = make(SHAPE, torch.float64, device, seed=4)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    q, k = q * magnitude, k * magnitude  # float32 values; the float64 reference takes the same ones
    # Gradients: ~1/magnitude for huge maps (judged times the magnitude), ~1/(|x| + eps) for tiny
    # ones (large: assert_close's max(1, max|expected|) scale is relative there already).
    check_all(backend, q, k, v, feature_scale=max(1.0, magnitude),
              center=center, patch_size=patch_size, eps=eps)


@pytest.mark.backends(OP, [torch.float32])
def test_tiny_magnitudes_unnormalised(backend, dtype, device):
    """normalize=False with 1e-20 features: logits underflow to 0 -> uniform weights, as in float64."""
    q, k, v = make(SHAPE, torch.float64, device, seed=5)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    q, k = q * 1e-20, k * 1e-20
    opts = dict(temperature=1.0, center=None, normalize=False)
    out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
    assert_close(out, reference64(q, k, v, **opts)[0], materialised(q, k, v, **opts), name="out")


def one_hot_problem(dtype, device):
    """Keys: one-hot directions (channel-centred, pairwise cosine -1/5); each query a noisy copy
    of one key, so its best key wins by a cosine margin > 0.5: at temperature <= 1e-4 every other
    weight is below exp(-5000) = 0, in float32 and float64 alike."""
    g = torch.Generator().manual_seed(6)
    C, Hk, Wk, Hq, Wq = 6, 2, 3, 3, 5
    k = torch.eye(C, dtype=torch.float64).reshape(C, Hk, Wk).unsqueeze(0).repeat(2, 1, 1, 1)
    target = torch.randint(0, Hk * Wk, (2, Hq * Wq), generator=g)
    q = torch.stack([k[b].reshape(C, -1)[:, target[b]] for b in range(2)]).reshape(2, C, Hq, Wq)
    q = q + 0.05 * torch.randn(q.shape, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, Hk, Wk, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v)], target.to(device)


@pytest.mark.parametrize("temperature", [1e-4, 1e-5, 1e-6])
@pytest.mark.backends(OP, [torch.float32, torch.float64])
def test_temperature_underflow_picks_argmax(backend, dtype, temperature, device):
    """exp underflows for all but the best key: the output is exactly that key's value, no NaN,
    and the gradients (w.r.t. value: the upstream gradient gathered at the best keys; w.r.t. the
    features: 0, the weights being saturated) match the float64 reference.

    The fused backwards recompute the weights from the logsumexp and form dP - rowsum(dO * O),
    which is 0 here up to rounding (~eps * |dO| |v|), then multiply by 1/temperature: float32
    feature gradients are off by ~1e-7/temperature (3e-3 at 1e-5) where the exact ones are 0.
    The materialised path's softmax backward is exactly 0 on such one-hot rows: the feature
    gradients are held to that rounding instead (test_correspondence_warp.feature_grad_floor)."""
    (q, k, v), target = one_hot_problem(dtype, device)
    B, Cv = v.shape[:2]
    picked = torch.stack([v[b].reshape(Cv, -1)[:, target[b]] for b in range(B)]).reshape(B, Cv, *q.shape[2:])
    out = check_all(backend, q, k, v, temperature=temperature)
    assert_close(out, picked.double(), materialised(q, k, v, temperature=temperature), name="value at the argmax key")


BAD = {"nan": float("nan"), "inf": float("inf")}  # -inf behaves as inf


@pytest.mark.parametrize("patch_size", [1, 3])
@pytest.mark.parametrize("center", ["channel", "spatial"])  # None propagates per position, as "channel"
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
@pytest.mark.backends(OP, [torch.float32])
def test_nonfinite_inputs_propagate_like_the_reference(backend, dtype, bad, where, center, patch_size, device):
    """Documented behaviour: NaN/Inf in the inputs are not checked; they propagate exactly as in
    the reference. One bad query entry poisons that query position's output (its whole
    neighbourhood's with patches; every position with spatial centring); one bad key entry, or
    one bad value entry, poisons that value channel of the whole sample (every softmax row sees
    it). The output is non-finite exactly where the float64 reference's is, NaN wherever the
    reference's is NaN (a bad feature: Inf never survives the normalisation, inf/inf = NaN),
    and matches the reference elsewhere. An Inf value entry gives +-Inf in float64, but NaN in
    float32 rows whose weight of that key underflowed to exactly 0 (0 * inf): the float32
    reference does the same, so only "non-finite" is asserted there."""
    q, k, v = make(SHAPE, dtype, device, seed=7)
    {"query": q, "key": k, "value": v}[where][0, 1, 1, 2] = bad
    opts = dict(center=center, patch_size=patch_size)
    out = ck.correspondence_warp(q, k, v, backend=backend, **opts)
    ref = reference64(q, k, v, **opts)[0]
    assert not ref.isfinite().all() and ref[1].isfinite().all()  # sample 1 is untouched
    assert torch.equal(out.isfinite().cpu(), ref.isfinite().cpu()), "non-finite pattern differs from the reference"
    assert out.isnan().cpu()[ref.isnan().cpu()].all(), "finite or Inf where the reference is NaN"
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], materialised(q, k, v, **opts)[finite], name="finite entries")
