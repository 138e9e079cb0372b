"""Shared test set-up: the device option and the backend x dtype matrix, built from what each backend declares.

A test marked `@pytest.mark.backends(op, dtypes, features=())` takes the parameters `backend` and
`dtype`, generated at collection for every fused backend that declares the op, the optional
features and the --device type, at each of `dtypes` it declares; the reference is those tests'
yardstick, not a case. At run time a case is skipped only for its environment (`Backend.refusal`:
the extension cannot build, the Triton interpreter's bfloat16, no CUDA device, a GPU too old).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

# Triton reads this when first imported: kernels then run on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import cocos_kernels as ck  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device the op tests run on (cpu or cuda)")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(op, dtypes, features=()): parametrize backend and dtype "
                                       "over the fused backends declaring them for --device (see conftest.py)")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cases(device_type: str, op: str, dtypes, features=()) -> list:
    """pytest.param(backend, dtype) for each fused backend declaring `op`, `features` and
    `device_type`, at each of `dtypes` it declares (no extension is loaded to answer)."""
    return [
        pytest.param(name, dtype, id=f"{name}-{dtype_id(dtype)}")
        for name, b in ck.BACKENDS.items()
        if b.fused and device_type in b.devices and b.op_refusal(op) is None
        and b.feature_refusal(features) is None
        for dtype in dtypes if dtype in b.dtypes
    ]


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        device_type = torch.device(metafunc.config.getoption("--device")).type
        metafunc.parametrize("backend,dtype", cases(device_type, *marker.args, **marker.kwargs))


@pytest.fixture(autouse=True)
def _skip_where_the_environment_refuses(request):
    if request.node.get_closest_marker("backends") is not None:
        backend, dtype = request.node.callspec.params["backend"], request.node.callspec.params["dtype"]
        reason = ck.BACKENDS[backend].refusal(torch.device(request.config.getoption("--device")), dtype)
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")


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


def peak_memory_mib(config: dict) -> float:
    """Peak memory of one benchmark call in MiB, measured as a user runs the worker:
    `python -m benchmarks.harness '<json>'` from the repository root, with no timing runs. The worker
    fills in no defaults, so the ones every memory test shares are given here."""
    config = {"op": "correspondence_warp", "value_channels": 3, "batch": 1, "dtype": "float32", "device": "cpu",
              "threads": None, **config, "min_run_time_s": 0}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", json.dumps(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"the worker failed (exit code {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    assert result["status"] == "ok", result["error"]
    return result["peak_bytes"] / 2**20
