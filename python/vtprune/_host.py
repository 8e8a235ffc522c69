"""Host-side helpers shared by every layer of the ops: checks, reference, Triton and CUDA glue, backend choice.

The lowest module of the package (it imports no other vtprune module), so that the public ops
(:mod:`vtprune.ops`), the executable spec (:mod:`vtprune.reference`) and the kernel glue
(``vtprune.triton_kernels``, :mod:`vtprune.cuda`) can all use it without importing one another:

* :class:`BackendUnavailableError` and :func:`triton_interpret` (read by backend choice and kernel glue);
* :func:`to_device_i64`: host-to-device copies of small index tensors that never wait for the device;
* :func:`host_max` and the ``*_summary`` functions: what the host knows about CPU index tensors (spans,
  lengths, indices), read once per tensor and cached, so that the checks of an op, its output sizing and its
  backend share one read;
* :func:`call`: the custom op while ``torch.compile`` traces, the launcher directly in eager mode.
"""

from __future__ import annotations

import operator
import os
import weakref
from collections.abc import Callable

import torch


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here (not built, not installed, or wrong device)."""


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def call(op: Callable, eager: Callable, *args):
    """``op(*args)`` while torch.compile traces (the custom op), else the launcher ``eager`` directly: the
    dispatcher costs ~10 us a call, which small launches cannot afford in eager mode."""
    return op(*args) if torch.compiler.is_compiling() else eager(*args)


# ------------------------------------------------------------------------------------------ device copies


def to_device_i64(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """int64 contiguous ``t`` on ``device``; a CPU tensor bound for an accelerator goes through pinned memory.

    A copy from pageable host memory is synchronous on CUDA (the driver stages it and waits); from pinned
    memory with ``non_blocking=True`` it is queued on the current stream like a kernel. The pinned buffer comes
    from torch's caching host allocator, which keeps it alive until the queued copy has run. ``meta`` tensors
    carry no values, so nothing is staged for them.
    """
    if t is None:
        return None
    if t.dtype == torch.int64 and t.device == device and t.is_contiguous():
        return t  # already in place (the common case for indices computed on the device)
    if t.device.type == "cpu" and device.type not in ("cpu", "meta"):
        staged = torch.empty(t.shape, dtype=torch.int64, pin_memory=True)
        staged.copy_(t)
        return staged.to(device, non_blocking=True)
    return t.to(device=device, dtype=torch.int64).contiguous()


# ------------------------------------------------------------------- what the host knows of CPU index tensors

# id(tensor) -> (weak reference, version counter, {kind: summary}). A summary stays valid while the tensor is
# alive and unmodified: an in-place write bumps ``_version``, and the weak reference tells a new tensor that
# reuses a dead one's id apart. Inference tensors have no version counter, so they are read every time.
_SUMMARIES: dict[int, tuple] = {}
_MOST = 256


def _summary(t: torch.Tensor, kind: str, compute: Callable[[list], tuple]) -> tuple:
    """``compute(t.tolist())``, cached per CPU tensor and kind."""
    if t.is_inference():
        return compute(t.tolist())
    hit = _SUMMARIES.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        found = hit[2].get(kind)
        if found is None:
            found = hit[2][kind] = compute(t.tolist())
        return found
    if len(_SUMMARIES) >= _MOST:
        _SUMMARIES.clear()
    found = compute(t.tolist())
    _SUMMARIES[id(t)] = (weakref.ref(t), t._version, {kind: found})
    return found


def _spans(rows: list) -> tuple[int, int, int, int]:
    return (min(s for s, _ in rows), min(c for _, c in rows), max(s + c for s, c in rows), max(c for _, c in rows))


def spans_summary(spans: torch.Tensor) -> tuple[int, int, int, int]:
    """``(smallest start, smallest count, largest start + count, largest count)`` of CPU ``[B, 2]`` spans."""
    return _summary(spans, "spans", _spans)


def _values(values: list) -> tuple[int, int, tuple[int, ...]]:
    return min(values), max(values), tuple(values)


def values_summary(values: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """``(smallest, largest, all values)`` of a non-empty 1-D CPU tensor (lengths, counts)."""
    return _summary(values, "values", _values)


def _rows(rows: list) -> tuple[bool, int, tuple[int, ...]]:
    ascending = all(all(map(operator.lt, row, row[1:])) for row in rows)
    return ascending, min(row[0] for row in rows), tuple(row[-1] for row in rows)


def rows_summary(idx: torch.Tensor) -> tuple[bool, int, tuple[int, ...]]:
    """``(every row strictly ascending, smallest first entry, each row's last entry)`` of a CPU ``[B, K]``
    index tensor with ``B, K >= 1``; for ascending rows the ends bound every entry."""
    return _summary(idx, "rows", _rows)


def host_max(spans_or_counts: torch.Tensor, length: int | None = None) -> int:
    """Width of a per-span output: the largest count of CPU spans ``[B, 2]`` or counts ``[B]`` (read on the
    host once, then cached); for spans on the device ``length`` (the largest a count can be: no host read, so
    no sync), or, when ``length`` is None, the largest count read back (a sync)."""
    if spans_or_counts.device.type == "cpu":
        if spans_or_counts.dim() == 2:
            return spans_summary(spans_or_counts)[3]
        return values_summary(spans_or_counts)[1]
    if length is not None:
        return length
    counts = spans_or_counts[:, 1] if spans_or_counts.dim() == 2 else spans_or_counts
    return int(counts.detach().cpu().max())
