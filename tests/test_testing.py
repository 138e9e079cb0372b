"""cocos_kernels.testing: the accuracy rule must reject what it is there to catch."""
import pytest
import torch

from cocos_kernels.testing import FACTOR, FLOORS, assert_close, bound, relative_error


def _problem(dtype=torch.float32):
    """A float64 truth, its rounding to `dtype` (the yardstick) and that rounding's error."""
    ref64 = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    same = (ref64 * (1 + 1e-3 * torch.randn(ref64.shape, generator=torch.Generator().manual_seed(1),
                                           dtype=torch.float64))).to(dtype)
    return ref64, same, relative_error(same, ref64)


def test_relative_error_is_scaled_by_the_largest_reference_magnitude():
    ref = torch.tensor([100.0, 0.0, -2.0], dtype=torch.float64)
    assert relative_error(ref + torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64), ref) == pytest.approx(0.005)
    small = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert relative_error(small + 0.01, small) == pytest.approx(0.01)  # never divided by less than 1


def test_relative_error_of_nonfinite_values():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0  # NaN matches NaN, Inf matches Inf
    assert relative_error(torch.tensor([float("nan"), float("nan"), float("inf")]), ref) == float("inf")
    assert relative_error(torch.tensor([1.0, 2.0, float("inf")]), ref) == float("inf")
    assert relative_error(torch.tensor([1.0, float("nan"), -float("inf")]), ref) == float("inf")


def test_within_the_bound_passes():
    ref64, same, err = _problem()
    # Exactly at the bound: factor times the yardstick's error plus the floor.
    actual = (ref64 + (FACTOR * err + FLOORS[torch.float32]) * 0.999 * max(1.0, ref64.abs().max().item())).float()
    assert relative_error(actual, ref64) <= bound(err, torch.float32)
    assert_close(actual, ref64, same, name="out")
    assert_close(same, ref64, same, name="the yardstick itself")


def test_a_wrong_output_fails_listing_the_worst_elements():
    ref64, same, err = _problem()
    wrong = ref64.clone()
    wrong[2, 7] += 3 * FACTOR * err * ref64.abs().max() + 1e-3  # one element off by more than the bound
    with pytest.raises(AssertionError, match=r"(?s)grad x: relative error .* > .*materialised torch.float32.*at \(2, 7\)"):
        assert_close(wrong.float(), ref64, same, name="grad x")


def test_a_systematically_worse_result_fails():
    ref64, same, err = _problem(torch.float16)
    worse = (ref64 + 3 * (same.double() - ref64)).half()  # three times the yardstick's error
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(worse, ref64, same)


def test_nan_where_the_reference_is_finite_fails():
    ref64, same, _ = _problem()
    actual = same.clone()
    actual[0, 0] = float("nan")
    with pytest.raises(AssertionError, match=r"relative error inf .*\n  at \(0, 0\): got nan"):
        assert_close(actual, ref64, same, name="out")


def test_a_nonfinite_yardstick_is_refused():
    ref64, same, _ = _problem()
    same[1, 1] = float("inf")
    with pytest.raises(AssertionError, match="the materialised path is not finite where the float64 reference is"):
        assert_close(ref64.float(), ref64, same)


def test_float64_results_take_a_plain_relative_bound():
    ref64, _, _ = _problem()
    scale = ref64.abs().max()
    assert_close(ref64 + 1e-10 * scale, ref64)
    with pytest.raises(AssertionError, match="rtol 1e-09"):
        assert_close(ref64 + 1e-8 * scale, ref64)
    assert_close(ref64 + 1e-8 * scale, ref64, rtol=1e-7)


def test_a_lower_precision_result_needs_a_yardstick_or_an_rtol():
    ref64, same, _ = _problem()
    with pytest.raises(TypeError, match="same_precision= or an explicit rtol="):
        assert_close(same, ref64)
    assert_close(same, ref64, rtol=1e-2)


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"shapes differ: \(2,\) != \(3,\)"):
        relative_error(torch.zeros(2), torch.zeros(3, dtype=torch.float64))
