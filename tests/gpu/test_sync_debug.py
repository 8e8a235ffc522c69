"""Host-device synchronisations of the patched model path on a real GPU, seen by CUDA's own sync detector.

``torch.cuda.set_sync_debug_mode`` flags every synchronising CUDA call (a device-to-host copy, ``.item()``,
``nonzero``, a blocking stream wait). For every method applied through the public :func:`vtprune.apply` to a
tiny LLaVA-1.5 on the default (GPU) backends, batch 1 and a left-padded batch 2:

* prefill: counted in ``"warn"`` mode; the patched model may sync at most 3 times more than the unpatched one
  on the same inputs (issue 12; the unpatched model's own prefill syncs, so it cannot run under ``"error"``);
* decode: a few steps with the KV cache run under ``"error"``, so any sync raises.

The CPU twin of this test (tests/models/test_syncs.py) counts the same with a simulated device.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import vtprune
from vtprune._compat import cache_kwargs
from vtprune.models._tiny import tiny_inputs, tiny_llava

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

# default backends: "auto" picks the GPU kernels for CUDA tensors, the path this test is about
METHODS = {
    "visiondrop": lambda: vtprune.VisionDrop(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)}),
    "fastv": lambda: vtprune.FastV(layer=2, tokens=8),
    "pyramiddrop": lambda: vtprune.PyramidDrop(),
    "visionzip": lambda: vtprune.VisionZip(10, 2),
    "pool": lambda: vtprune.UniformPool(16),
    "alvts": lambda: vtprune.ALVTS(keep=8),
}
BATCHES = {"b1": ((3,), (5,)), "b2": ((3, 7), (6, 4))}  # prefix / suffix text lengths per row (left-padded)
ISSUE_LIMIT = 3  # issue 12: a prefill may sync at most 3 times more than the unpatched model
DECODE_STEPS = 3


@contextlib.contextmanager
def sync_debug(mode: str):
    torch.cuda.synchronize()  # nothing queued before the block is blamed on it
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def prefill_syncs(model, inputs) -> tuple[int, object]:
    """(synchronising CUDA calls of one prefill, its output), counted from the ``"warn"`` mode's warnings."""
    with warnings.catch_warnings(record=True) as seen, sync_debug("warn"):
        warnings.simplefilter("always")
        out = model(**inputs, use_cache=True)
    return sum("synchronizing" in str(w.message) for w in seen), out


def decode(model, out, batch: int) -> None:
    """``DECODE_STEPS`` greedy-shaped steps from ``out``'s cache under ``"error"`` mode. No attention mask, as
    ``generate`` passes an all-ones one: the new tokens are known to be real without reading a mask."""
    cache = out.past_key_values
    with sync_debug("error"):
        for _ in range(DECODE_STEPS):
            step = torch.full((batch, 1), 5, device="cuda")
            out = model(input_ids=step, use_cache=True, **cache_kwargs(cache))
            cache = out.past_key_values


@pytest.fixture(scope="module")
def model():
    return tiny_llava().cuda().eval()


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("method", sorted(METHODS))
@torch.no_grad()
def test_patched_prefill_and_decode_under_sync_debug(model, method, batch):
    prefix, suffix = BATCHES[batch]
    inputs = {k: v.cuda() for k, v in tiny_inputs(model, prefix, suffix, seed=1).items()}
    B = inputs["input_ids"].shape[0]
    model(**inputs, use_cache=True)  # warm-up: kernel compiles and one-time allocations are not the path
    base, _ = prefill_syncs(model, inputs)
    with vtprune.apply(model, METHODS[method]()):
        model(**inputs, use_cache=True)  # warm-up of the patched path (one-time conversions, compiles)
        patched, out = prefill_syncs(model, inputs)
        assert patched <= base + ISSUE_LIMIT, (
            f"{method} prefill ({batch}): {patched} synchronising CUDA calls, unpatched {base}, "
            f"limit unpatched + {ISSUE_LIMIT}"
        )
        decode(model, out, B)  # raises RuntimeError at the first sync
