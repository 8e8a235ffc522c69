"""Argument checks shared by the public ops.

Every failure is a ``ValueError`` that names the argument, what was expected and what was given.

Values are validated where they live, so no check ever waits for the device: index tensors on the CPU (spans,
lengths: the README's recommendation) are read on the host as Python integers (one ``tolist`` instead of
several tiny reductions); index tensors on the device are checked by a device-side assert
(``torch._assert_async``), queued like a kernel. A failed device assert aborts the device's work with the
message (CUDA reports it at the next synchronisation, as a device-side assert), so a bad value is never
silently used.
"""

from __future__ import annotations

import math

import torch

from vtprune._host import spans_summary, values_summary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    return t


def batched(name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """The leading data tensor of an op: ``ndim`` dimensions, a float dtype, batch size B >= 1."""
    tensor(name, t, ndim=ndim, dtypes=dtypes)
    if t.shape[0] < 1:
        raise ValueError(f"{name} must have batch size B >= 1, got shape {tuple(t.shape)}")
    return t


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def dim_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(t.shape)}")


def host_device_ok(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Index tensors may live on the CPU (no sync) or on the data's device."""
    if not t.is_cpu and t.device != device:
        raise ValueError(f"{name} must be on the CPU or on {device}, got {t.device}")


def on_host(t: torch.Tensor) -> bool:
    return t.is_cpu


def require(ok: torch.Tensor, message: str) -> None:
    """``ValueError(message)`` unless the bool tensor ``ok`` is True; on the device an async device-side assert."""
    if on_host(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def spans(name: str, s, batch: int, length: int, device: torch.device) -> int:
    """Validate int64 ``[B, 2]`` (start, count) spans inside ``[0, length]`` with count >= 1.

    Returns the width of a per-span output: the largest count for CPU spans; ``length`` (the largest a count
    can be) for spans on the device, whose values the host does not read.
    """
    span_meta(name, s, batch, device)
    return span_values(name, s, length)


def span_meta(name: str, s, batch: int, device: torch.device) -> None:
    """The type, dtype, device and shape half of :func:`spans` (what a call :func:`signature` covers)."""
    tensor(name, s, ndim=2, dtypes=(torch.int64,))
    host_device_ok(name, s, device)
    if s.shape != (batch, 2):
        raise ValueError(f"{name} must have shape [B, 2] = [{batch}, 2], got {tuple(s.shape)}")


def span_values(name: str, s: torch.Tensor, length: int) -> int:
    """The value half of :func:`spans`. The values of CPU spans are read once per tensor
    (:func:`vtprune._host.spans_summary`), so the backends' sizing and later calls with the same spans cost a
    dictionary lookup; spans on the device are checked by a device-side assert."""
    if not s.is_cpu:
        start, count = s[:, 0], s[:, 1]
        require(((count >= 1) & (start >= 0) & (start + count <= length)).all(),
                f"{name}: every span (start, count) must have count >= 1 and lie inside [0, {length})")
        return length
    first, fewest, end, widest = spans_summary(s)
    if fewest < 1:
        raise ValueError(f"{name}: every count must be positive, got counts {s[:, 1].tolist()}")
    if first < 0 or end > length:
        raise ValueError(f"{name}: every span (start, count) must lie inside [0, {length}), got {s.tolist()}")
    return widest


def lengths(name: str, t, batch: int, n: int, device: torch.device, minimum: int = 1) -> torch.Tensor | None:
    """Validate optional int64 ``[B]`` valid-prefix lengths in ``[minimum, n]``."""
    if t is None:
        return None
    length_meta(name, t, batch, device)
    return length_values(name, t, n, minimum)


def length_meta(name: str, t, batch: int, device: torch.device) -> None:
    """The type, dtype, device and shape half of :func:`lengths` (``t`` not None)."""
    tensor(name, t, ndim=1, dtypes=(torch.int64,))
    host_device_ok(name, t, device)
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")


def length_values(name: str, t: torch.Tensor | None, n: int, minimum: int = 1) -> torch.Tensor | None:
    """The value half of :func:`lengths`: read once per CPU tensor, a device-side assert on the device."""
    if t is None:
        return None
    if not t.is_cpu:
        require(((t >= minimum) & (t <= n)).all(), f"{name}: every length must lie in [{minimum}, {n}]")
        return t
    shortest, longest, _ = values_summary(t)
    if shortest < minimum or longest > n:
        raise ValueError(f"{name}: every length must lie in [{minimum}, {n}], got {t.tolist()}")
    return t


# ---------------------------------------------------------------- shape checks passed before, per signature

# signature of a call's tensors -> True: their types, shapes, dtypes and devices passed an op's checks before,
# so only the checks of values (spans, lengths, indices) run again. The checks cost more than a kernel launch.
_PASSED: dict[tuple, bool] = {}


def signature(*extra, tensors) -> tuple | None:
    """A hashable description of ``tensors`` (type, shape, dtype, device; None kept) and ``extra`` values, or
    None when one of them is not tensor-like (the full checks then say what is wrong)."""
    try:
        return (*extra, *[None if t is None else (type(t), t.shape, t.dtype, t.device) for t in tensors])
    except AttributeError:
        return None


def passed(sig: tuple | None) -> bool:
    """Whether a call with this :func:`signature` passed the shape checks before."""
    return sig is not None and sig in _PASSED


def remember(sig: tuple | None) -> None:
    if sig is not None:
        if len(_PASSED) >= 1024:
            _PASSED.clear()
        _PASSED[sig] = True


def key_padding_mask(t, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    tensor("key_padding_mask", t, ndim=2, dtypes=(torch.bool,), device=device)
    if tuple(t.shape) != (batch, length):
        raise ValueError(f"key_padding_mask must have shape [B, L] = [{batch}, {length}], got {tuple(t.shape)}")
    return t


def positive_int(name: str, v, *, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {v}")
    return v


def flag(name: str, v) -> bool:
    """A Python bool (a string such as "no" would otherwise be truthy)."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {type(v).__name__} {v!r}")
    return v


def scale(v) -> float | None:
    """``None`` or a finite positive float."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"scale must be a finite positive float (default d ** -0.5), got {v}")
    return float(v)
