"""ALVTS as users run it: one object shared by threads, gradients enabled, dtype changes after apply()."""

import sys
import threading

import pytest
import torch

import vtprune
from vtprune.methods.alvts import ALVTS
from vtprune.models import _tiny


def _shared_runs(rounds: int):
    """Two models (different weights and batch shapes: different routing plans) served by one ALVTS from two threads;
    returns each thread's logits per round and the logits each model gives alone."""
    models = [_tiny.tiny_llava(seed=0), _tiny.tiny_llava(seed=1)]
    batches = [_tiny.tiny_inputs(models[0], (3, 9), (6, 2), seed=2), _tiny.tiny_inputs(models[1], (5,), (4,), seed=3)]
    shared = ALVTS(keep=8, backend="reference")
    handles = [vtprune.apply(m, shared) for m in models]
    try:
        with torch.no_grad():
            expected = [m(**b).logits for m, b in zip(models, batches)]
        got = [[], []]
        start = threading.Barrier(2)

        def work(t):
            with torch.no_grad():
                start.wait()
                for _ in range(rounds):
                    got[t].append(models[t](**batches[t]).logits)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave the two forwards finely
        try:
            threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            sys.setswitchinterval(old)
    finally:
        for h in handles:
            h.remove()
    return got, expected


def test_one_alvts_object_serves_two_threads():
    got, expected = _shared_runs(rounds=12)
    for t in range(2):
        assert len(got[t]) == 12
        for logits in got[t]:
            assert torch.equal(logits, expected[t])


def test_the_method_object_keeps_no_per_call_state():
    """After forwards and decoding, a shared ALVTS holds nothing of them."""
    model = _tiny.tiny_llava()
    a = ALVTS(keep=8, backend="reference")
    before = set(vars(a))
    with vtprune.apply(model, a) as h, torch.no_grad():
        model.generate(**_tiny.tiny_inputs(model, (3, 9), (6, 2), seed=2), max_new_tokens=3, do_sample=False)
        assert h._patch.method is a  # ALVTS is the method itself: no adapter object around it
        assert set(vars(a)) == before
        assert not [k for k, v in vars(a).items() if isinstance(v, (dict, torch.Tensor, tuple))]


def test_gradients_enabled_are_refused_at_forward():
    model = _tiny.tiny_llava()
    batch = _tiny.tiny_inputs(model, (3,), (5,), seed=1)
    with vtprune.apply(model, ALVTS(keep=8, backend="reference")), torch.enable_grad():
        with pytest.raises(RuntimeError, match="inference only"):
            model(**batch)  # before: ran, and backward() failed on the in-place scatter
        model.requires_grad_(False)
        try:
            model(**batch)  # no parameter needs a gradient: runs
        finally:
            model.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_follow_the_model_dtype_after_apply(dtype):
    """apply() then model.to(dtype): the factors are converted at call time, as if given in that dtype."""
    model = _tiny.tiny_llava()
    batch = _tiny.tiny_inputs(model, (3, 9), (6, 2), seed=2)
    with torch.no_grad():
        a = ALVTS(keep=8, backend="reference")
        with vtprune.apply(model, a):
            factors = a.prepare(model.model.language_model)
            model.to(dtype)
            batch = dict(batch, pixel_values=batch["pixel_values"].to(dtype))
            moved = model(**batch).logits
        assert moved.dtype == dtype
        with vtprune.apply(model, ALVTS(keep=8, factors=factors, backend="reference")):
            direct = model(**batch).logits
        assert torch.equal(moved, direct)
        with vtprune.apply(model, ALVTS(keep=None, backend="reference")):
            keep_all = model(**batch).logits
        torch.testing.assert_close(keep_all, model(**batch).logits)  # and keep-all is still the unpatched model
