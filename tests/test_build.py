"""Build pipeline of the optional CUDA extension ``vtprune._C`` (setup.py + CMakeLists.txt) and the errors
that the ``cuda`` backend gives when it cannot run.

These run on the CPU: importing the extension needs no GPU or driver (the CUDA runtime is linked statically).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import _backend, _ext
from vtprune._backend import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
# CI sets VTPRUNE_BUILD_CUDA=1 when it builds the extension: then a missing module is a broken build.
BUILD_REQUIRED = os.environ.get("VTPRUNE_BUILD_CUDA") == "1"


def _import_extension():
    try:
        return importlib.import_module("vtprune._C"), ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def _require_extension():
    """The built module; skips when it is not built, fails when CI (VTPRUNE_BUILD_CUDA=1) built it."""
    module, error = _import_extension()
    if module is None:
        if BUILD_REQUIRED:
            pytest.fail(f"VTPRUNE_BUILD_CUDA=1 but vtprune._C does not import ({error})")
        pytest.skip(f"vtprune._C is not built ({error}); build it with VTPRUNE_BUILD_CUDA=1 pip install -e .")
    return module


@pytest.fixture
def without_extension(monkeypatch):
    """Make ``import vtprune._C`` fail (a None entry in sys.modules), with the loader's cache cleared."""
    monkeypatch.setitem(sys.modules, "vtprune._C", None)
    _ext._import.cache_clear()
    yield
    _ext._import.cache_clear()


def test_extension_imports():
    extension = _require_extension()
    assert callable(extension.topk_keep_order)
    assert _ext.extension_available()
    assert _ext.load_extension() is extension


def test_extension_checks_arguments_before_touching_cuda():
    extension = _require_extension()
    # Argument errors surface as RuntimeError with the argument named, before any CUDA call, so this
    # runs without a GPU or driver.
    with pytest.raises(RuntimeError, match=r"k must be in \[0, n=4\], got 5"):
        extension.topk_keep_order(0, 0, 0, 1, 4, 5, 0)
    with pytest.raises(RuntimeError, match="batch must be"):
        extension.topk_keep_order(0, 0, 0, -1, 4, 2, 0)
    # Nothing to do: returns without launching (or initialising CUDA).
    assert extension.topk_keep_order(0, 0, 0, 0, 4, 2, 0) is None


def test_cuda_backend_on_cpu_tensors_raises():
    with pytest.raises(BackendUnavailableError) as info:
        _backend.resolve("topk_keep_order", "cuda", torch.device("cpu"))
    message = str(info.value)
    if _ext.extension_available():
        assert "tensors are on cpu" in message
    else:
        assert "VTPRUNE_BUILD_CUDA=1 pip install -e ." in message


def test_cuda_backend_without_extension_says_how_to_build(without_extension):
    assert not _ext.extension_available()
    with pytest.raises(BackendUnavailableError) as info:
        _ext.load_extension()
    message = str(info.value)
    assert "vtprune._C" in message and "VTPRUNE_BUILD_CUDA=1 pip install -e ." in message
    assert "ModuleNotFoundError" in message  # the import error is part of the message
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        with pytest.raises(BackendUnavailableError, match="VTPRUNE_BUILD_CUDA=1"):
            _backend.resolve("topk_keep_order", "cuda", device)
    with pytest.raises(BackendUnavailableError, match="VTPRUNE_BUILD_CUDA=1"):
        vtprune.ops.topk_keep_order(torch.rand(2, 5), 2, backend="cuda")
    # "auto" never needs the extension for CPU tensors.
    assert _backend.resolve("topk_keep_order", "auto", torch.device("cpu")) == "reference"


# What a source build needs; copying only this keeps build/, *.so and egg-info of the checkout out.
_SOURCE_FILES = ("setup.py", "pyproject.toml", "CMakeLists.txt", "MANIFEST.in", "README.md", "LICENSE")
_SOURCE_DIRS = ("python", "triton_kernels", "csrc")


@pytest.mark.slow
def test_non_editable_install_without_cuda(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in _SOURCE_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in _SOURCE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The running interpreter may itself be a venv: expose its packages (pip, setuptools, torch) to the new
    # one behind its own site-packages, so the install needs no downloads.
    parent = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (site / "_vtprune_test_parent_site.pth").write_text("\n".join(parent) + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VTPRUNE_BUILD_CUDA="0", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", str(src)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    check = (
        "import json, sys, vtprune, vtprune.triton_kernels, vtprune.cli, vtprune.testing.syncs; "
        "print(json.dumps([vtprune.__file__, vtprune.triton_kernels.__file__, 'vtprune._C' in sys.modules]))"
    )
    run = subprocess.run([python, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    package_file, triton_file, c_imported = json.loads(run.stdout.strip().splitlines()[-1])
    site = site.resolve()
    assert Path(package_file).resolve().is_relative_to(site), (package_file, site)
    assert Path(triton_file).resolve().is_relative_to(site / "vtprune"), (triton_file, site)
    assert not c_imported  # importing vtprune never loads the extension
    assert not list((site / "vtprune").glob("_C*")), "VTPRUNE_BUILD_CUDA=0 must not build vtprune._C"


def test_every_subpackage_is_listed_in_setup_py():
    """A package folder missing from setup.py's list installs fine editable and is absent from a wheel."""
    listed = set(re.findall(r'"(vtprune(?:\.[a-z_]+)*)"', (ROOT / "setup.py").read_text()))
    found = {"vtprune." + ".".join(p.parent.relative_to(ROOT / "python" / "vtprune").parts)
             for p in (ROOT / "python" / "vtprune").rglob("__init__.py")}
    found = {"vtprune" if f == "vtprune." else f for f in found} | {"vtprune.triton_kernels"}
    assert found <= listed, f"packages missing from setup.py: {sorted(found - listed)}"
