"""Packaging: ships the C++ sources inside the package so a wheel can JIT-build the CPU kernels."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        shutil.copytree(Path(__file__).parent / "csrc", Path(self.build_lib) / "cocos_kernels" / "csrc",
                        dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
