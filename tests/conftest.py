"""Shared test set-up: the device option, the backend list, and the float64 comparison helper."""
import os

# Triton reads this when first imported: kernels then run on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cocos_kernels as ck  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device the op tests run on (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems (small convolutions, a few hundred elements):
    on a shared 2-core machine two spinning threads wait on each other's barriers, 5-50x slower.
    The previous setting is restored afterwards. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skip_unless_runs(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Skip (with the backend's own reason) where it cannot take this device/dtype."""
    reason = ck.BACKENDS[backend].refusal(device, dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """max |actual - expected| <= rtol * max(1, max |expected|), with the worst elements printed.

    Scaling by the largest expected magnitude (not element-wise) keeps the check meaningful for
    gradients that reach 1/temperature = 100 while most entries are near zero.
    """
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isfinite(actual) & torch.isfinite(expected)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the float64 reference is finite"
    err = (actual - expected).abs()
    scale = max(1.0, expected.abs().max().item())
    worst = err.max().item()
    if worst > rtol * scale:
        idx = torch.topk(err.flatten(), min(5, err.numel())).indices
        rows = "\n".join(
            f"  at {tuple(torch.unravel_index(torch.tensor(i), err.shape))}: got {actual.flatten()[i]:.8g}, "
            f"expected {expected.flatten()[i]:.8g}" for i in idx.tolist()
        )
        raise AssertionError(f"{name}: max error {worst:.3g} > {rtol:g} * {scale:.3g}\n{rows}")
