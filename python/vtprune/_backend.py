"""Backend resolution: which implementation of an op runs for a given call.

Every op has up to three implementations, found by one naming rule so that a grep for the op's stem finds
them all:

* ``reference``: ``vtprune.reference.<op>.<op>`` (PyTorch, any device; the executable spec)
* ``triton``:    ``vtprune.triton_kernels.<op>.<op>`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)
* ``cuda``:      ``vtprune.cuda.<op>.<op>`` (glue around the compiled extension ``vtprune._C``)

``auto`` picks ``reference`` for CPU tensors; for CUDA tensors it picks ``cuda`` only for ops listed in
``vtprune.cuda.VALIDATED`` (validated on a GPU and faster in the committed benchmarks), else ``triton``.
An explicitly requested backend that cannot run raises :class:`BackendUnavailableError`; only ``auto``
chooses.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")

_PACKAGES = {
    "reference": "vtprune.reference",
    "triton": "vtprune.triton_kernels",
    "cuda": "vtprune.cuda",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here (not built, not installed, or wrong device)."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _module_has(backend: str, op: str) -> bool:
    try:
        importlib.import_module(f"{_PACKAGES[backend]}.{op}")
    except ModuleNotFoundError as e:
        if e.name in (f"{_PACKAGES[backend]}.{op}", "triton"):
            return False
        raise
    return True


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_triton(op: str, device: torch.device) -> None:
    if not triton_available():
        raise BackendUnavailableError(
            f"backend='triton' for {op}: the 'triton' package is not installed (pip install 'vtprune[triton]')"
        )
    if device.type != "cuda" and not _triton_interpret():
        raise BackendUnavailableError(
            f"backend='triton' for {op}: tensors are on {device}; Triton needs CUDA tensors, "
            "or TRITON_INTERPRET=1 to run kernels on the CPU through the interpreter"
        )
    if not _module_has("triton", op):
        raise BackendUnavailableError(f"backend='triton': no Triton kernel for {op} yet")


def _check_cuda(op: str, device: torch.device) -> None:
    from vtprune._ext import load_extension  # raises BackendUnavailableError with build instructions

    load_extension()
    if device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' for {op}: tensors are on {device}, not a CUDA device")
    if not _module_has("cuda", op):
        raise BackendUnavailableError(f"backend='cuda': no CUDA kernel for {op} in this build")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``backend=None`` or ``"auto"`` defers to the environment variable ``VTPRUNE_BACKEND`` and then to the
    automatic choice.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("VTPRUNE_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"VTPRUNE_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        from vtprune._ext import extension_available
        from vtprune.cuda import VALIDATED

        if op in VALIDATED and extension_available() and _module_has("cuda", op):
            return "cuda"
        _check_triton(op, device)
        return "triton"
    if backend == "triton":
        _check_triton(op, device)
    elif backend == "cuda":
        _check_cuda(op, device)
    return backend


def implementation(op: str, backend: str | None, device: torch.device) -> Callable:
    """The function implementing ``op`` on the resolved backend.

    Resolved once per (op, backend, device type, environment) and cached: the availability checks and imports
    cost more than a kernel launch. Failures are not cached, so a later call raises again.
    """
    env = (os.environ.get("VTPRUNE_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _implementation(op, backend, device.type, env)


@functools.cache
def _implementation(op: str, backend: str | None, device_type: str, env) -> Callable:
    name = resolve(op, backend, torch.device(device_type))
    module = importlib.import_module(f"{_PACKAGES[name]}.{op}")
    return getattr(module, op)
