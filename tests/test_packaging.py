"""The core install is the kernels only: torch, numpy and ninja; images, progress bars and plots
are the `demo` extra, and what needs them says so when they are missing."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("matplotlib", "PIL", "tqdm")


def test_core_dependencies_are_the_kernels_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert names == {"torch", "numpy", "ninja"}
    demo = {d.lower() for d in project["optional-dependencies"]["demo"]}
    assert {"matplotlib", "pillow", "tqdm"} <= demo


def _run_without_optional(code: str) -> subprocess.CompletedProcess:
    block = f"import sys\nfor m in {OPTIONAL!r}:\n    sys.modules[m] = None\n"  # `import m` now raises
    return subprocess.run([sys.executable, "-c", block + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_kernels_run_without_the_demo_extra():
    done = _run_without_optional(
        "import torch, cocos_kernels as ck\n"
        "q, k, v = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.rand(1, 2, 3, 3)\n"
        "out = ck.correspondence_warp(q, k, v, backend='reference')\n"
        "loss = ck.contextual_loss(q, k, backend='reference')\n"
        "import cocos_kernels.visualize\n"
        "print(tuple(out.shape), tuple(loss.shape))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(1,", "2,", "3,", "3)", "(1,)"]


def test_what_needs_the_demo_extra_says_so():
    done = _run_without_optional(
        "import importlib, torch\n"
        "from cocos_kernels.visualize import plot_matches\n"
        "def attempts():\n"
        "    yield lambda: plot_matches(torch.rand(3, 4, 4), torch.rand(3, 4, 4), torch.randn(1, 2, 2, 2),\n"
        "                               torch.randn(1, 2, 2, 2))\n"
        "    yield lambda: importlib.import_module('cocos_kernels.demo')\n"
        "    yield lambda: importlib.import_module('cocosnet')\n"
        "for attempt in attempts():\n"
        "    try:\n"
        "        attempt()\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(e)\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.endswith("pip install 'cocos-kernels[demo]'") for line in lines), lines
    assert lines[0].startswith("cocos_kernels.visualize.plot_matches needs matplotlib")
