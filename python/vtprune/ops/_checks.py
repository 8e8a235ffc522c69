"""Argument checks shared by the public ops.

Every failure is a ``ValueError`` that names the argument, what was expected and what was given.
Checks on tensor *values* (span bounds, counts) read a few integers back to the host: pass spans and lengths
as CPU tensors to keep that off the device queue.
"""

from __future__ import annotations

import torch

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


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def dim_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(t.shape)}")


def host_device_ok(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Index tensors may live on the CPU (no sync) or on the data's device."""
    if t.device.type != "cpu" and t.device != device:
        raise ValueError(f"{name} must be on the CPU or on {device}, got {t.device}")


def spans(name: str, s, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Validate int64 ``[B, 2]`` (start, count) spans inside ``[0, length]`` with count >= 1."""
    tensor(name, s, ndim=2, dtypes=(torch.int64,))
    host_device_ok(name, s, device)
    if tuple(s.shape) != (batch, 2):
        raise ValueError(f"{name} must have shape [B, 2] = [{batch}, 2], got {tuple(s.shape)}")
    host = s.detach().cpu()
    start, count = host[:, 0], host[:, 1]
    if bool((count < 1).any()):
        raise ValueError(f"{name}: every count must be positive, got counts {count.tolist()}")
    if bool((start < 0).any()) or bool((start + count > length).any()):
        raise ValueError(
            f"{name}: every span (start, count) must lie inside [0, {length}), got {host.tolist()}"
        )
    return s


def lengths(name: str, t, batch: int, n: int, device: torch.device, minimum: int = 1) -> torch.Tensor | None:
    """Validate optional int64 ``[B]`` valid-prefix lengths in ``[minimum, n]``."""
    if t is None:
        return None
    tensor(name, t, ndim=1, dtypes=(torch.int64,))
    host_device_ok(name, t, device)
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
    host = t.detach().cpu()
    if bool((host < minimum).any()) or bool((host > n).any()):
        raise ValueError(f"{name}: every length must lie in [{minimum}, {n}], got {host.tolist()}")
    return t


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
