"""The CPU backend's two float32 paths: the AVX-512 tile kernels (where the processor has them) and
the portable BLAS path every other processor takes. COCOS_KERNELS_CPU_AVX512=0 forces the portable
path, so an AVX-512 machine checks both against float64."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocos_kernels import build

ROOT = Path(__file__).resolve().parent.parent

# Forward and every gradient of the warp (1x1 and 3x3 windows, a key mask) and of the contextual
# loss in float32, each as (error, bound) by cocos_kernels.testing's rule: against float64 autograd
# on the reference, the reference in float32 being the yardstick.
CHECK = """
import json, torch, cocos_kernels as ck
from cocos_kernels.testing import bound, relative_error
torch.manual_seed(0)
errors = {}
RUNS = (("reference", torch.float64), ("cpu", torch.float32), ("reference", torch.float32))
def judge(exact, fused, same):
    return [(relative_error(a, e), bound(relative_error(b, e), torch.float32)) for e, a, b in zip(exact, fused, same)]
q, k = torch.randn(2, 24, 9, 11, dtype=torch.float64), torch.randn(2, 24, 10, 7, dtype=torch.float64)
v, g = torch.rand(2, 5, 10, 7, dtype=torch.float64), torch.randn(2, 5, 9, 11, dtype=torch.float64)
mask = torch.rand(2, 10, 7) > 0.3
for patch in (1, 3):
    results = []
    for backend, dtype in RUNS:
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = ck.correspondence_warp(*inputs, patch_size=patch, key_mask=mask, backend=backend)
        out.backward(g.to(dtype))
        results.append([out, *(t.grad for t in inputs)])
    errors[f"warp{patch}"] = judge(*results)
    errors[f"warp{patch}_out_sum"] = float(results[1][0].detach().double().sum())
x, y = torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
results = []
for backend, dtype in RUNS:
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, y)]
    loss = ck.contextual_loss(*inputs, backend=backend)
    loss.sum().backward()
    results.append([loss, *(t.grad for t in inputs)])
errors["contextual"] = judge(*results)
print(json.dumps(errors))
"""


def _within_bounds(errors: dict) -> bool:
    return all(error <= allowed for key in ("warp1", "warp3", "contextual") for error, allowed in errors[key])


def _run(avx512: bool) -> dict:
    env = dict(os.environ)
    env.pop("COCOS_KERNELS_CPU_AVX512", None)
    if not avx512:
        env["COCOS_KERNELS_CPU_AVX512"] = "0"
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_both_float32_paths_match_float64():
    portable = _run(avx512=False)
    assert _within_bounds(portable), portable
    if "avx512f" not in build.cpu_features():
        pytest.skip("this processor has no AVX-512: the portable path is the only one")
    fast = _run(avx512=True)
    assert _within_bounds(fast), fast
    # Different summation orders: the switch really selected another path.
    assert fast["warp1_out_sum"] != portable["warp1_out_sum"] or fast["warp3_out_sum"] != portable["warp3_out_sum"]
