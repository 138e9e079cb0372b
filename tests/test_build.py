"""Building the extensions (`cocos_kernels/build.py`, `setup.py`): the JIT build folder keyed by what
the binary depends on, its lock, and the install path without a CUDA toolkit.

The JIT builds here compile a tiny Python module (no torch headers: a second or two) through the real
`build.load` and `torch.utils.cpp_extension.load`. A build "in progress" or "killed" is a child
process holding the build lock, as a build does, and leaving torch's own lock file in the folder, as
torch < 2.14 does when killed mid-build (its mere existence makes torch < 2.14 wait forever).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cocos_kernels import build

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["-O1"]
TINY = r"""
#include <Python.h>
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)
static PyModuleDef module = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""
# Holds the build lock of a folder, as a build does, until killed. Loads build.py by path: no torch.
HOLD = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("build", sys.argv[1])
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
folder = Path(sys.argv[2])
with build.build_lock(folder):
    (folder / build.TORCH_LOCK_NAME).touch()
    print("held", flush=True)
    time.sleep(600)
"""
LOAD_TINY = """
import sys
from pathlib import Path
from cocos_kernels import build
print(build.load("tiny", Path(sys.argv[1]), ["tiny.cpp"], cflags=sys.argv[2:]).__file__)
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The folder of the tiny module's source; extensions build under tmp_path, and a lock wait that
    should not happen fails the test within a minute instead of hanging it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cpp").write_text(TINY)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv("COCOS_KERNELS_BUILD_LOCK_TIMEOUT", "60")
    return src


@contextmanager
def holding(folder: Path):
    """A child process holding `folder`'s build lock (and having left torch's lock file there)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(REPO / "cocos_kernels" / "build.py"), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_build_folder_is_keyed_by_torch_flags_and_sources(tiny, monkeypatch):
    key = build.build_key(tiny, FLAGS)
    assert (key["torch"], key["torch_cuda"], key["cflags"]) == (torch.__version__, torch.version.cuda, FLAGS)
    folder = build.build_directory("tiny", key)
    assert folder.parent == Path(os.environ["TORCH_EXTENSIONS_DIR"]) and folder.is_dir()
    assert (folder / "build_key.json").is_file() and build.build_directory("tiny", dict(key)) == folder
    others = [{"torch": "2.11.0"}, {"torch_git": "0" * 40}, {"torch_cuda": "12.8"}, {"cflags": [*FLAGS, "-mavx2"]},
              {"python": "cpython-312-x86_64"}]
    folders = {build.build_directory("tiny", {**key, **change}) for change in others}
    assert len(folders) == len(others) and folder not in folders
    assert build.simd_flags() == build.cpu_cflags()[2:]  # the CPU extension's key holds the machine's SIMD flags
    (tiny / "tiny.h").write_text("// a header changes the binary too\n")
    assert build.build_key(tiny, FLAGS)["sources"] != key["sources"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert build.build_key(tiny, FLAGS, cuda_cflags=["-O3"])["cuda_archs"] == "9.0a"


def test_two_torch_versions_build_side_by_side(tiny, monkeypatch, capfd):
    monkeypatch.setattr(build, "LOCK_ANNOUNCE_S", 0.0)
    other = build.build_directory("tiny", {**build.build_key(tiny, FLAGS), "torch": "2.11.0+simulated"})
    with holding(other) as holder:  # the other torch's build, in progress
        module = build.load("tiny", tiny, ["tiny.cpp"], cflags=FLAGS)
        folder = Path(module.__file__).parent
        assert folder.parent == other.parent and other.name.startswith("tiny-torch2.11.0_simulated-")
        assert folder != other
        lock = other / build.LOCK_NAME
        with pytest.raises(TimeoutError, match=f"waiting for another build in {re.escape(str(other))} "
                                               f".*delete {re.escape(str(lock))}"):
            with build.build_lock(other, timeout=1.0):
                pass
        err = capfd.readouterr().err
        assert f"waiting for another build in {other} (lock {lock}, held by pid {holder.pid} on " in err


def test_lock_of_a_killed_build_does_not_hang_the_next(tiny):
    folder = build.build_directory("tiny", build.build_key(tiny, FLAGS))
    with holding(folder) as holder:
        pass  # killed holding the lock
    assert (folder / build.TORCH_LOCK_NAME).exists()
    assert f'"pid": {holder.pid}' in (folder / build.LOCK_NAME).read_text()
    proc = subprocess.run([sys.executable, "-c", LOAD_TINY, str(tiny), *FLAGS], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).parent == folder
    assert f"by pid {holder.pid} on " in proc.stderr and "died holding its lock" in proc.stderr
    assert (folder / build.LOCK_NAME).read_text() == ""  # released: the next build takes it at once


def test_lock_timeout_setting_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("COCOS_KERNELS_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="COCOS_KERNELS_BUILD_LOCK_TIMEOUT='soon'"):
        with build.build_lock(tmp_path):
            pass


def test_cuda_home_without_nvcc_is_no_toolkit(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build.cuda_home() is None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert build.cuda_home() == str(tmp_path)


def _packaged_tree(tmp_path: Path) -> Path:
    """What setup.py packages, copied: a build there leaves the checkout untouched."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree)
    for name in ("cocos_kernels", "cocosnet", "csrc"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return tree


def _without_toolkit() -> dict:
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "nvcc").exists()]
    return dict(os.environ, PATH=os.pathsep.join(path), CUDA_HOME="/nonexistent/cuda")


def test_setup_metadata_without_importing_the_package(tmp_path):
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=_packaged_tree(tmp_path), capture_output=True,
                          text=True, env=_without_toolkit(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "cocos-kernels", proc.stderr[-3000:]
    assert "not prebuilding the CUDA extension" in proc.stderr


def test_wheel_without_a_toolkit_is_pure_python(tmp_path):
    """`pip install --no-build-isolation .` without nvcc: the wheel it installs, built into a folder
    (nothing is installed)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w",
                           str(tmp_path / "dist"), "."], cwd=_packaged_tree(tmp_path), capture_output=True, text=True,
                          env=_without_toolkit(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not prebuilding the CUDA extension" in proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"cocos_kernels/build.py", "cocos_kernels/csrc/cpu/bindings.cpp", "cocos_kernels/csrc/cuda/bindings.cpp"} \
        <= set(names)
    assert not [n for n in names if n.endswith(".so")]
