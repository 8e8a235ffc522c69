"""Backends of the op tests: every test of tests/ops that takes ``backend`` runs on each of them.

* ``reference``: always (PyTorch on the CPU);
* ``triton``: real kernels on a CUDA device when one is visible, else the CPU interpreter (``TRITON_INTERPRET=1``,
  set by tests/conftest.py before any kernel module is imported); skipped when Triton is not installed, except
  under ``CI``, which installs it (:func:`utils.triton_installed` raises there);
* ``cuda``: the compiled extension on a GPU (marked ``gpu``: skipped with a reason without a CUDA device;
  without the extension skipped, or failed when ``VTPRUNE_BUILD_CUDA=1`` says it was built).
"""

from __future__ import annotations

import pytest
import torch

from utils import interpret, require_extension, triton_installed

BACKENDS = [pytest.param("reference"), pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.gpu)]


def require(backend: str) -> None:
    """Skip (with the reason) unless ``backend`` can run here."""
    if backend == "triton" and not triton_installed():
        pytest.skip("Triton is not installed (pip install 'vtprune[triton]')")
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (none visible)")
        require_extension()


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the GPU for ``cuda`` and compiled Triton, else the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available() and not interpret()):
        return "cuda"
    return "cpu"
