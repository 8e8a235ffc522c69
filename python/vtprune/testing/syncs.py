"""Count host-device synchronisations on a CPU-only machine, as they would happen with CUDA tensors.

A synchronisation makes the host wait for the device queue to drain: at batch 1 every one of them turns "GPU
time" into "GPU time + host time". On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` finds them; this
module finds the same class of events without a GPU, so CI can hold the host path to a sync budget.

How it works
------------
A *simulated device* stands in for the accelerator. Tensors on it are :class:`DeviceTensor` instances: their
``device`` is torch's ``lazy`` device type (a non-CPU device type, so code takes its accelerator paths, that
CPU-only torch builds can guard; ``meta`` would also work but code may treat meta tensors as value-less) and
their values live in an ordinary CPU tensor, so every computation runs for real and gives real results.
Ordinary CPU tensors are *host* tensors. While a :class:`SyncCounter` is active (a ``TorchDispatchMode``)
every aten op is classified:

* **Device results.** An op with a device tensor among its inputs, or a factory call with
  ``device=<simulated device>`` (``torch.empty(..., device=x.device)``), returns device tensors.
* **Counted as one sync each** (``Sync.kind``):

  - ``"item"``: a host read of a device value: ``.item()``, ``int()`` / ``float()`` / ``bool()`` of a device
    tensor, ``if tensor:`` (all ``aten._local_scalar_dense``), ``torch.equal`` on device tensors;
  - ``"tolist"``: ``.tolist()`` / ``.numpy()`` / ``repr`` of a device tensor;
  - ``"d2h copy"``: a copy from the device to the host (``.cpu()``, ``.to("cpu")``, ``host.copy_(dev)``);
  - ``"pageable h2d copy"``: a copy from a host tensor to the device unless the source is *pinned* and the
    copy is ``non_blocking=True`` (so ``torch.tensor(data, device=dev)`` counts, unless ``data`` is empty);
    also a host index tensor used to index a device tensor (CUDA copies it synchronously);
  - ``"data-dependent size"``: an op on device tensors whose output size depends on device values:
    ``nonzero`` / ``argwhere``, boolean-mask indexing (read or ``x[mask] = v``), ``masked_select``,
    ``unique*``, ``repeat_interleave`` without ``output_size``.

  Pinned host memory exists only with an accelerator; under the counter, ``torch.empty(..., pin_memory=True)``
  and ``t.pin_memory()`` return host tensors marked as pinned (views of them count as pinned too).
* **Errors** (as on CUDA): an op mixing device tensors with host tensors of more than zero dimensions, other
  than indexing with a host index.
* **Kernels.** Triton launches run on the host data through Triton's CPU interpreter (``launches=
  "interpret"``, needs ``TRITON_INTERPRET=1``) or are skipped (``launches="skip"``: outputs stay
  uninitialised; for timing host overhead). Either way a launch itself is never a sync; ``launches`` counts
  them.

Creating tensors on the simulated device (``torch.empty(..., device=x.device)``) needs an active counter:
inside a :class:`SyncCounter` block, or anywhere inside an :func:`on_device` block. On a CPU-only machine
``backend="auto"`` resolves to the reference backend for non-CUDA tensors; to count what a GPU run does, set
``VTPRUNE_BACKEND=triton`` with ``TRITON_INTERPRET=1``.

Each sync records the call site: the innermost stack frame outside torch and this module, plus the two frames
above it, so a report points at the line to fix.

Usage
-----
>>> from vtprune.testing.syncs import SyncCounter, to_device, to_host, on_device
>>> q = to_device(torch.randn(1, 4, 16, 8))              # a "CUDA" tensor; spans stay host tensors
>>> with SyncCounter() as syncs:
...     s = vtprune.ops.attention_scores(q, q, query_spans=spans, key_spans=spans, causal=True,
...                                      backend="triton")
>>> syncs.assert_at_most(0)                              # raises SyncError with a per-site report
>>> with on_device(model), SyncCounter() as syncs:       # parameters and buffers become device tensors
...     model(**to_device(inputs))                       # dicts, lists and tuples are converted too
>>> print(syncs.report())
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy")  # the simulated accelerator's device (see the module docstring)
_CPU = torch.device("cpu")
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

aten = torch.ops.aten

# ops whose output size depends on device values (CUDA computes it, then copies the size to the host)
_DATA_DEPENDENT = {
    aten.nonzero.default, aten.nonzero_numpy.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}


class SyncError(AssertionError):
    """More synchronisations than allowed; the message lists them per call site."""


@dataclass(frozen=True)
class Sync:
    """One counted synchronisation: its kind, the aten op, and the call site (``file:line in function``)."""

    kind: str
    op: str
    site: str
    callers: tuple[str, ...]


class DeviceTensor(torch.Tensor):
    """A tensor on the simulated device (``.device`` is ``lazy``); its values are in the CPU tensor ``.data_``."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=DEVICE, requires_grad=data.requires_grad,
        )
        r.data_ = data
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        counter = _ACTIVE[-1] if _ACTIVE else None
        if counter is None:
            # outside a counter: compute, never count (setting up and checking results)
            return _wrap_outputs(func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {})), True)
        return counter.__torch_dispatch__(func, types, args, kwargs)

    def tolist(self):
        _note("tolist", "Tensor.tolist")
        return self.data_.tolist()

    def numpy(self, *args, **kwargs):
        _note("tolist", "Tensor.numpy")
        return self.data_.numpy(*args, **kwargs)

    def __repr__(self, *args, **kwargs):
        _note("tolist", "Tensor.__repr__")
        return f"DeviceTensor({self.data_!r})"


_ACTIVE: list[SyncCounter] = []


def _note(kind: str, op: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1]._record(kind, op)


def _unwrap(x):
    return x.data_ if isinstance(x, DeviceTensor) else x


def _wrap_outputs(out, on_device: bool):
    if not on_device:
        return out
    return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor)
                    else t, out)


def _is_sim_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def to_device(obj):
    """``obj`` on the simulated device, without counting: a tensor, or dicts / lists / tuples of them.

    Non-tensor leaves are returned unchanged; device tensors stay as they are.
    """
    def convert(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor):
            return DeviceTensor(t.detach() if not t.requires_grad else t)
        return t

    if isinstance(obj, torch.Tensor):
        return convert(obj)
    return tree_map(convert, obj)


def to_host(obj):
    """The CPU values of device tensors (also in dicts / lists / tuples), without counting: for assertions."""
    return tree_map(_unwrap, obj)


@contextlib.contextmanager
def on_device(module: torch.nn.Module):
    """Move a module's parameters and buffers to the simulated device in place; restored on exit.

    Inside the block, code outside any :class:`SyncCounter` (``vtprune.apply``, set-up) can also create
    tensors on the simulated device: an uncounted counter is active for the whole block.
    """
    saved = []
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not isinstance(p, DeviceTensor):
                saved.append((m._parameters, name, p))
                m._parameters[name] = torch.nn.Parameter(DeviceTensor(p.detach()), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and not isinstance(b, DeviceTensor):
                saved.append((m._buffers, name, b))
                m._buffers[name] = DeviceTensor(b)
    try:
        with SyncCounter():  # uncounted: only makes device factories work outside the caller's counters
            yield module
    finally:
        for table, name, t in saved:
            table[name] = t


class SyncCounter(TorchDispatchMode):
    """Count the host-device synchronisations of the code run inside ``with SyncCounter() as c:``.

    Parameters
    ----------
    launches : "interpret" | "skip"
        What a Triton kernel launch does: run on the host values through Triton's interpreter (the default
        when ``TRITON_INTERPRET=1``), or nothing (outputs stay uninitialised; for measuring host overhead).

    Attributes
    ----------
    syncs : list[Sync]  every counted sync in order
    launches : int  Triton kernel launches seen
    """

    def __init__(self, *, launches: str | None = None):
        super().__init__()
        if launches is None:
            launches = "interpret" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "skip"
        if launches not in ("interpret", "skip"):
            raise ValueError(f"launches must be 'interpret' or 'skip', got {launches!r}")
        self.launch_mode = launches
        self.syncs: list[Sync] = []
        self.launches = 0
        self._pinned: dict[int, weakref.ref] = {}  # storage address -> a tensor holding it
        self._patches: contextlib.ExitStack | None = None

    # ---------------------------------------------------------------- results
    @property
    def count(self) -> int:
        return len(self.syncs)

    def by_site(self) -> collections.Counter:
        """``Counter`` of ``(kind, site)`` -> syncs."""
        return collections.Counter((s.kind, s.site) for s in self.syncs)

    def report(self) -> str:
        """One line per call site, most syncs first, with the two callers above it."""
        if not self.syncs:
            return "0 syncs"
        callers = {(s.kind, s.site): s.callers for s in self.syncs}
        lines = [f"{self.count} syncs:"]
        for (kind, site), n in self.by_site().most_common():
            via = " <- ".join(callers[(kind, site)])
            lines.append(f"  {n:4d} x {kind:20s} {site}" + (f"  (via {via})" if via else ""))
        return "\n".join(lines)

    def assert_at_most(self, n: int, what: str = "the code under test") -> None:
        """Raise :class:`SyncError` with :meth:`report` when more than ``n`` syncs were counted."""
        if self.count > n:
            raise SyncError(f"{what} synchronised {self.count} times (allowed {n}); {self.report()}")

    # ---------------------------------------------------------------- mode
    def __enter__(self):
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(_triton_launch_hook(self))
        self._patches.enter_context(_autocast_hook())
        for name in ("tensor", "as_tensor"):
            self._patches.enter_context(_tensor_constructor_hook(self, name))
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _ACTIVE.remove(self)
            self._patches.close()

    def _record(self, kind: str, op: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not os.path.abspath(f.filename).startswith(_TORCH_DIR) and os.path.abspath(f.filename) != _HERE]
        names = [f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in frames]
        site = names[-1] if names else "?"
        self.syncs.append(Sync(kind, op, site, tuple(reversed(names[-3:-1]))))

    def _mark_pinned(self, t: torch.Tensor) -> torch.Tensor:
        self._pinned[t.untyped_storage().data_ptr()] = weakref.ref(t)
        return t

    def _is_pinned(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or isinstance(t, DeviceTensor):
            return False
        ref = self._pinned.get(t.untyped_storage().data_ptr())
        return ref is not None and ref() is not None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves, _ = tree_flatten((args, kwargs))
        dev_in = any(isinstance(x, DeviceTensor) for x in leaves)
        pin = bool(kwargs.get("pin_memory"))
        if pin:
            kwargs["pin_memory"] = False
        if func is aten.is_pinned.default:
            return self._is_pinned(args[0])
        if func is aten._pin_memory.default:
            with _disable_current_modes():
                return self._mark_pinned(args[0].clone())
        factory = _is_sim_device(kwargs.get("device"))
        if factory:
            kwargs["device"] = _CPU
        name = str(func)

        if func in _COPIES:
            return self._copy(func, args, kwargs, factory, dev_in)
        if dev_in:
            self._classify(func, name, args, kwargs, leaves)
        with _disable_current_modes():
            out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if pin and isinstance(out, torch.Tensor):
            self._mark_pinned(out)
        if func is aten._local_scalar_dense.default or func is aten.equal.default:
            return out
        return _wrap_outputs(out, dev_in or factory)

    def _classify(self, func, name, args, kwargs, leaves) -> None:
        if func is aten._local_scalar_dense.default or func is aten.equal.default:
            self._record("item", name)
        elif func in _DATA_DEPENDENT:
            self._record("data-dependent size", name)
        elif func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self._record("data-dependent size", name)
        elif func in _INDEX:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            idx = [i for i in indices if isinstance(i, torch.Tensor)]
            if any(i.dtype in (torch.bool, torch.uint8) and isinstance(i, DeviceTensor) for i in idx):
                self._record("data-dependent size", name + " (boolean mask)")
            if any(not isinstance(i, DeviceTensor) and i.dim() > 0 for i in idx):
                self._record("pageable h2d copy", name + " (host index)")
            return
        for x in leaves:
            if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.device.type == DEVICE.type:
                raise RuntimeError(f"{name} got a {DEVICE.type} tensor without values: something created it on the "
                                   "simulated device behind the counter's back")
            if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.dim() > 0:
                raise RuntimeError(f"{name} mixes device tensors with a host tensor of shape {tuple(x.shape)} "
                                   "(an error on CUDA too): move it to the device first")

    def _copy(self, func, args, kwargs, factory, dev_in):
        src = args[1] if func is not aten._to_copy.default else args[0]
        if func is aten._to_copy.default:
            to_dev = factory or (isinstance(src, DeviceTensor) and kwargs.get("device") is None)
        else:
            to_dev = isinstance(args[0], DeviceTensor)
        non_blocking = bool(kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
        if isinstance(src, DeviceTensor) and not to_dev:
            self._record("d2h copy", str(func))
        elif not isinstance(src, DeviceTensor) and to_dev and not (self._is_pinned(src) and non_blocking):
            self._record("pageable h2d copy", str(func) + ("" if self._is_pinned(src) else " (pageable source)"))
        with _disable_current_modes():
            out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is aten.copy_.default:
            return args[0]
        return _wrap_outputs(out, to_dev)


def _short(path: str) -> str:
    path = os.path.abspath(path)
    for marker in (f"{os.sep}vtprune{os.sep}", f"{os.sep}triton_kernels{os.sep}", f"{os.sep}tests{os.sep}",
                   f"{os.sep}benchmarks{os.sep}", f"{os.sep}site-packages{os.sep}"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:] if marker != f"{os.sep}site-packages{os.sep}" else path[i + len(marker):]
    return os.path.basename(path)


@contextlib.contextmanager
def _tensor_constructor_hook(counter: SyncCounter, name: str):
    """``torch.tensor(data, device=dev)`` builds its tensor below the dispatcher's Python layer, so a mode never
    sees the copy; wrap the function itself: the data is built on the host and copied (one pageable copy)."""
    original = getattr(torch, name)

    def constructor(data, *args, **kwargs):
        device = kwargs.get("device")
        if not _is_sim_device(device):
            return original(data, *args, **kwargs)
        with _disable_current_modes():
            host = original(tree_map(_unwrap, data), *args, **dict(kwargs, device=_CPU))
        if host.numel():  # an empty tensor copies nothing
            counter._record("pageable h2d copy", f"torch.{name}")
        return DeviceTensor(host)

    setattr(torch, name, constructor)
    try:
        yield
    finally:
        setattr(torch, name, original)


@contextlib.contextmanager
def _autocast_hook():
    """Autocast has no state for the simulated device type: code that asks about it (transformers 5.17's rotary
    embeddings call ``torch.is_autocast_enabled(x.device.type)`` and ``torch.autocast(x.device.type, ...)``)
    is answered as for the CPU, whose values the simulated device holds."""
    is_enabled, autocast = torch.is_autocast_enabled, torch.autocast

    def host_type(device_type):
        return "cpu" if device_type == DEVICE.type else device_type

    def patched_is_enabled(*args):
        return is_enabled(host_type(args[0]), *args[1:]) if args else is_enabled()

    def patched_autocast(device_type, *args, **kwargs):
        return autocast(host_type(device_type), *args, **kwargs)

    torch.is_autocast_enabled, torch.autocast = patched_is_enabled, patched_autocast
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.autocast = is_enabled, autocast


@contextlib.contextmanager
def _triton_launch_hook(counter: SyncCounter):
    """Route Triton launches through the counter: interpreted on the host values, or skipped."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def make(cls):
        original = originals[cls]

        def run(self, *args, **kwargs):
            counter.launches += 1
            if counter.launch_mode == "skip":
                return None
            if cls is JITFunction:
                raise RuntimeError("SyncCounter(launches='interpret') needs TRITON_INTERPRET=1 set before "
                                   "Triton is imported")
            with _disable_current_modes():
                return original(self, *tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

        return run

    try:
        for cls in originals:
            cls.run = make(cls)
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run
