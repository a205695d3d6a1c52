"""Builds the Python package with CMake: the NumPy extension (_normkit), the PyTorch
extension (libnormkit_torch) and the `normkit` command with its data, and nothing else
(no tests, no benchmark). See pyproject.toml; use `pip install --no-build-isolation .`."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def version():
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"project\(normkit VERSION ([0-9.]+)", text).group(1)


class BuildWithCMake(build_ext):
    """One CMake build (in build_temp) for the package's compiled parts, copied into it:
    normkit/_normkit*.so, normkit/libnormkit_torch.so, and the command as
    normkit/bin/normkit with normkit/share/normkit (its data, found relative to it)."""

    def run(self):
        temp = Path(self.build_temp).resolve()
        build, prefix = temp / "cmake", temp / "prefix"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.check_call([
            "cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release", "-DNORMKIT_BUILD_TESTS=OFF",
            "-DNORMKIT_BUILD_BENCH=OFF", f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_INSTALL_PREFIX={prefix}"])
        subprocess.check_call(["cmake", "--build", str(build), "-j", jobs, "--target",
                               "_normkit", "normkit_torch", "normkit_cli"])
        subprocess.check_call(["cmake", "--install", str(build)],
                              stdout=subprocess.DEVNULL)
        package = Path(self.build_lib) / "normkit"
        package.mkdir(parents=True, exist_ok=True)
        for library in (build / "python" / "normkit").glob("*.so"):
            shutil.copy2(library, package / library.name)
        (package / "bin").mkdir(exist_ok=True)
        shutil.copy2(prefix / "bin" / "normkit", package / "bin" / "normkit")
        shutil.copytree(prefix / "share" / "normkit", package / "share" / "normkit",
                        dirs_exist_ok=True)


setup(
    version=version(),
    package_dir={"": "python"},
    packages=["normkit", "normkit.torch"],
    # One placeholder extension makes setuptools run build_ext (CMake builds the real ones)
    # and tag the wheel for this platform.
    ext_modules=[Extension("normkit._normkit", sources=[])],
    cmdclass={"build_ext": BuildWithCMake},
    zip_safe=False,
)
