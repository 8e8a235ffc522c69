"""Build script: the Python package plus, optionally, the CUDA extension ``vtprune._C``.

The extension is built by CMake (``CMakeLists.txt``) with pybind11 and nvcc, when nvcc is found and either
a GPU is visible or ``VTPRUNE_BUILD_CUDA=1``. Environment:

* ``VTPRUNE_BUILD_CUDA``: ``1`` builds it (an error if nvcc is missing), ``0`` never builds it, unset decides
  as above.
* ``VTPRUNE_CUDA_ARCHS``: CMake ``CUDA_ARCHITECTURES`` list, default ``80;90a`` (A100, H100/H200).
* ``MAX_JOBS``: parallel compile jobs (default: all cores).
* ``CUDA_HOME`` / ``CUDA_PATH``: where nvcc lives, when it is not on ``PATH``.

torch is not needed at build time: the extension binds raw device pointers and stream handles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "80;90a"


def _env_flag(name: str) -> bool | None:
    """``True``/``False`` for an explicit 1/0 (or yes/no, on/off, true/false), ``None`` when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise RuntimeError(f"{name} must be 1 or 0, got {os.environ[name]!r}")


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _gpu_visible() -> bool:
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def _cuda_build_plan() -> tuple[str | None, str]:
    """(path of nvcc to build with, or None to skip; the reason, for the log)."""
    flag = _env_flag("VTPRUNE_BUILD_CUDA")
    if flag is False:
        return None, "VTPRUNE_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if flag is True:
        if nvcc is None:
            raise RuntimeError(
                "VTPRUNE_BUILD_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, "
                "PATH and /usr/local/cuda/bin). Install the CUDA toolkit or point CUDA_HOME at it, "
                "or set VTPRUNE_BUILD_CUDA=0 to install without the CUDA extension."
            )
        return nvcc, "VTPRUNE_BUILD_CUDA=1"
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME, or VTPRUNE_BUILD_CUDA=1 to require it)"
    if not _gpu_visible():
        return None, "no GPU visible to nvidia-smi (set VTPRUNE_BUILD_CUDA=1 to build anyway)"
    return nvcc, "nvcc and a GPU found"


def _find_tool(name: str) -> str | None:
    """The cmake/ninja from the PyPI package of that name when installed (the build requirements), else
    the one on PATH."""
    try:
        module = __import__(name)
        bin_dir = getattr(module, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR", None)
    except ImportError:
        bin_dir = None
    if bin_dir and (Path(bin_dir) / name).is_file():
        return str(Path(bin_dir) / name)
    return shutil.which(name)


class CMakeExtension(Extension):
    """An extension module built by CMake from ``CMakeLists.txt`` in ``source_dir``."""

    def __init__(self, name: str, nvcc: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.nvcc = nvcc
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configures and builds each :class:`CMakeExtension`, then copies the module to where setuptools
    expects it (``build_ext --inplace`` and editable installs then copy it into ``python/vtprune``)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # a build requirement (pyproject.toml); only needed when building CUDA

        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("building vtprune._C needs CMake >= 3.24 (pip install cmake)")
        ninja = _find_tool("ninja")
        build_dir = Path(self.build_temp).resolve() / ext.name
        lib_dir = build_dir / "lib"
        archs = os.environ.get("VTPRUNE_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)

        configure = [
            cmake,
            f"-S{ext.source_dir}",
            f"-B{build_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if ninja is not None:
            configure += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        print(f"vtprune: building {ext.name} for CUDA architectures {archs} with {ext.nvcc}", flush=True)
        # pip builds in the source tree's build/, each time with a fresh isolated env (another cmake, maybe
        # no ninja). A CMake cache from other tools fails ("generator does not match") or points at deleted
        # paths, so start over whenever the toolchain changes; a full build takes seconds.
        stamp = build_dir / "vtprune-toolchain.txt"
        toolchain = "\n".join([cmake, str(ninja), ext.nvcc, sys.executable, pybind11.get_cmake_dir()])
        if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != toolchain):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(toolchain)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)

        built = sorted(lib_dir.glob(f"{ext.name.rsplit('.', 1)[-1]}.*"))
        if len(built) != 1:
            raise RuntimeError(f"expected one built module for {ext.name} in {lib_dir}, found {built}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built[0], target)


_nvcc, _reason = _cuda_build_plan()
if _nvcc is None:
    print(f"vtprune: not building the CUDA extension vtprune._C: {_reason}", file=sys.stderr)

setup(
    package_dir={"vtprune": "python/vtprune", "vtprune.triton_kernels": "triton_kernels"},
    packages=[
        "vtprune",
        "vtprune.cli",
        "vtprune.ops",
        "vtprune.reference",
        "vtprune.cuda",
        "vtprune.alvts",
        "vtprune.methods",
        "vtprune.models",
        "vtprune.testing",
        "vtprune.eval",
        "vtprune.eval.tasks",
        "vtprune.triton_kernels",
    ],
    package_data={"vtprune.eval.tasks": ["*.jsonl"]},  # the tiny evaluation task's records
    ext_modules=[CMakeExtension("vtprune._C", _nvcc)] if _nvcc else [],
    cmdclass={"build_ext": CMakeBuild},
)
