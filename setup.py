"""Packaging: ships the C++/CUDA sources inside the package, so an installed copy can JIT-build its
extensions, and prebuilds the CUDA extension (`cocos_kernels._cuda`) where it can.

The CUDA extension is built here, with ninja, when torch is importable in the build environment
(`pip install --no-build-isolation .`: pyproject.toml does not pull torch into an isolated one), is
a CUDA build, and a CUDA toolkit (nvcc) is found (see `cocos_kernels/build.py:cuda_home`). Without
them the install is pure Python and the "cuda" backend JIT-builds on first use instead.
COCOS_KERNELS_PREBUILD_CUDA=0 skips the prebuild, =1 makes a missing requirement an error.
Architectures: $TORCH_CUDA_ARCH_LIST, else `build.PREBUILD_ARCHS` (A100, H100, and PTX that newer
cards compile).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "cocos_kernels" / "csrc", dirs_exist_ok=True)


def _build_module():
    # cocos_kernels/build.py by path (it imports nothing but the standard library): importing the
    # package here would need its dependencies.
    spec = importlib.util.spec_from_file_location("_cocos_kernels_build", ROOT / "cocos_kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) of the prebuilt CUDA extension, or why there is none (printed)."""
    wanted = os.environ.get("COCOS_KERNELS_PREBUILD_CUDA")
    if wanted == "0":
        return [], {}
    try:
        import torch
    except ImportError:
        reason = "torch is not importable in the build environment (use pip install --no-build-isolation)"
    else:
        build = _build_module()
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is not a CUDA build"
        elif build.cuda_home() is None:
            reason = build.NO_TOOLKIT
        else:
            build.build_environment()
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.PREBUILD_ARCHS)
            from torch.utils.cpp_extension import BuildExtension, CUDAExtension

            src = Path("csrc") / "cuda"
            ext = CUDAExtension(
                "cocos_kernels._cuda", [str(src / s) for s in build.CUDA_SOURCES],
                extra_compile_args={"cxx": list(build.CUDA_CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS)},
            )
            build.say(f"building the CUDA extension (CUDA_HOME={build.cuda_home()}, "
                      f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
            return [ext], {"build_ext": BuildExtension}
    if wanted == "1":
        raise RuntimeError(f"COCOS_KERNELS_PREBUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"cocos_kernels: not prebuilding the CUDA extension ({reason}); the 'cuda' backend builds it on "
          "first use", file=sys.stderr)
    return [], {}


ext_modules, cmdclass = _cuda_extension()
setup(cmdclass={"build_py": BuildPyWithSources, **cmdclass}, ext_modules=ext_modules)
