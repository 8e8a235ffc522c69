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

import importlib
import os
from collections.abc import Callable

import torch

from vtprune import _ext
from vtprune._host import BackendUnavailableError, triton_interpret

__all__ = ["BACKENDS", "BackendUnavailableError", "implementation", "resolve", "triton_available"]

_triton_interpret = triton_interpret  # the name benchmarks/bench_visiondrop_ops.py imports

BACKENDS = ("auto", "reference", "triton", "cuda")

_PACKAGES = {
    "reference": "vtprune.reference",
    "triton": "vtprune.triton_kernels",
    "cuda": "vtprune.cuda",
}


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
    if device.type != "cuda" and not triton_interpret():
        raise BackendUnavailableError(
            f"backend='triton' for {op}: tensors are on {device}; Triton needs CUDA tensors, "
            "or TRITON_INTERPRET=1 to run kernels on the CPU through the interpreter"
        )
    if not _module_has("triton", op):
        raise BackendUnavailableError(f"backend='triton': no Triton kernel for {op} yet")


def _check_cuda(op: str, device: torch.device) -> None:
    _ext.load_extension()  # raises BackendUnavailableError with build instructions
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
        from vtprune.cuda import VALIDATED

        if op in VALIDATED and _ext.extension_available() and _module_has("cuda", op):
            return "cuda"
        _check_triton(op, device)
        return "triton"
    if backend == "triton":
        _check_triton(op, device)
    elif backend == "cuda":
        _check_cuda(op, device)
    return backend


# (op, backend, on CUDA) -> (function, whether it relies on TRITON_INTERPRET): the availability checks and
# imports cost more than a kernel launch, so a resolution is kept; failures are not, so a later call raises again.
_RESOLVED: dict[tuple, tuple[Callable, bool]] = {}


def implementation(op: str, backend: str | None, device: torch.device | torch.Tensor) -> Callable:
    """The function implementing ``op`` on the resolved backend for tensors on ``device`` (or like a tensor).

    Cached per (op, backend, CUDA or not): :func:`resolve` tells only CUDA from the rest. The environment is
    still honoured on every call, reading only what the choice depends on: ``VTPRUNE_BACKEND`` when
    ``backend`` is None or "auto", ``TRITON_INTERPRET`` when Triton runs on a non-CUDA device.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("VTPRUNE_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"VTPRUNE_BACKEND must be one of {BACKENDS}, got {backend!r}")
    cuda = device.is_cuda if isinstance(device, torch.Tensor) else device.type == "cuda"
    key = (op, backend, cuda)
    hit = _RESOLVED.get(key)
    if hit is None or (hit[1] and not triton_interpret()):
        dev = device.device if isinstance(device, torch.Tensor) else device
        name = resolve(op, backend, dev)
        module = importlib.import_module(f"{_PACKAGES[name]}.{op}")
        hit = _RESOLVED[key] = (getattr(module, op), name == "triton" and not cuda)
    return hit[0]
