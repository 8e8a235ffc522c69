"""Lazy, cached loading of the optional compiled extension ``vtprune._C``.

The extension holds the CUDA kernels (``csrc/``). It is built by ``pip install`` only when nvcc is found and
a GPU is visible, or when ``VTPRUNE_BUILD_CUDA=1``; everything else in vtprune works without it. Importing
this module never imports ``vtprune._C``: the first call to :func:`extension_available` or
:func:`load_extension` does, once per process.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from vtprune._host import BackendUnavailableError

EXTENSION = "vtprune._C"

BUILD_HINT = (
    "Build it from a source checkout with the CUDA toolkit (nvcc) installed: "
    "VTPRUNE_BUILD_CUDA=1 pip install -e . (VTPRUNE_CUDA_ARCHS picks the GPU architectures, default "
    "'80;90a'; pip install -v shows the build log)"
)


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it could not be imported); cached for the process."""
    try:
        return importlib.import_module(EXTENSION), ""
    except Exception as e:  # ImportError, or an OSError/RuntimeError raised while loading the .so
        return None, f"{type(e).__name__}: {e}"


def extension_available() -> bool:
    """Whether ``vtprune._C`` can be imported. Never raises."""
    try:
        return _import()[0] is not None
    except Exception:
        return False


def load_extension() -> ModuleType:
    """The compiled module ``vtprune._C``.

    Raises
    ------
    BackendUnavailableError
        When it is not built or fails to load; the message says how to build it and why the import failed.
    """
    module, error = _import()
    if module is None:
        raise BackendUnavailableError(
            f"backend='cuda' needs the compiled extension {EXTENSION}, which is not available ({error}). {BUILD_HINT}."
        )
    return module
