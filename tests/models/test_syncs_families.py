"""Host-device synchronisations of the patched LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL paths, counted on the CPU.

As :mod:`tests.models.test_syncs` does for LLaVA-1.5, on the simulated device of :mod:`vtprune.testing.syncs`.
The Qwen families' decode step needs the model's own M-RoPE bookkeeping (``rope_deltas``), which ``generate``
prepares, so the counts come from whole ``generate`` calls: the prefill is ``generate(max_new_tokens=1)`` and a
decode step is half the difference between ``max_new_tokens=3`` and ``1``. A patched prefill may sync at most 3
times more than the unpatched model's and a decode step no more than its (before: a Qwen2.5-VL decode step
added one pageable copy per layer group, up to +4, and the prefill one device-to-host copy per LLM stage).
"""

import pytest
import torch
from models_common import family_model, multi_inputs

import vtprune
from vtprune.methods.alvts import ALVTS
from vtprune.models._tiny import TINY_FAMILIES
from vtprune.testing.syncs import SyncCounter, on_device, to_device

METHODS = {
    "visiondrop": lambda: vtprune.VisionDrop(tokens=8, backend="reference"),
    "fastv": lambda: vtprune.FastV(layer=1, tokens=8, backend="reference"),
    "pyramiddrop": lambda: vtprune.PyramidDrop(backend="reference"),
    "visionzip": lambda: vtprune.VisionZip(6, 2, backend="reference"),
    "alvts": lambda: ALVTS(keep=8, backend="reference"),
}
ISSUE_LIMIT = 3
FAMILIES = ("LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration")
BATCHES = {"b1": ((3,), (5,)), "b2": ((3, 7), (5, 4))}  # prompt lengths before / after the image; b2 left-padded
CASES = [(f, m, b) for f in FAMILIES for m in METHODS for b in BATCHES]


def _generate(model, inputs, n: int) -> SyncCounter:
    with on_device(model):
        dev = to_device(inputs)
        with SyncCounter():  # warm-up: one-time conversions
            model.generate(**dev, max_new_tokens=n, do_sample=False)
        with SyncCounter() as counter, torch.no_grad():
            model.generate(**dev, max_new_tokens=n, do_sample=False)
    return counter


def _counts(model, inputs):
    """(prefill count, decode-step count, prefill counter)."""
    one, three = _generate(model, inputs, 1), _generate(model, inputs, 3)
    return one.count, (three.count - one.count) / 2, three


def _check_within_budget(model, inputs, method: str, what: str) -> None:
    base_prefill, base_decode, _ = _counts(model, inputs)
    with vtprune.apply(model, METHODS[method]()):
        prefill, decode, counter = _counts(model, inputs)
    assert prefill <= base_prefill + ISSUE_LIMIT, f"{what}: prefill {prefill} vs {base_prefill}; {counter.report()}"
    assert decode <= base_decode, f"{what}: decode step {decode} vs {base_decode}; {counter.report()}"


@pytest.mark.parametrize(("family", "method", "batch"), CASES)
def test_patched_syncs_stay_within_budget(family, method, batch):
    model = family_model(family)
    inputs = TINY_FAMILIES[family].batch(model, *BATCHES[batch], seed=1)
    _check_within_budget(model, inputs, method, f"{family} {method}, {batch}")


# a prompt with several image units: two images (LLaVA-NeXT), an image and a 2-frame-group video (the Qwen families)
MULTI = {"LlavaNextForConditionalGeneration": [3, (50, 100), 2, (100, 100), 4],
         "Qwen2_5_VLForConditionalGeneration": [3, (8, 8), 2, (2, 8, 12), 4],
         "Qwen3VLForConditionalGeneration": [3, (8, 8), 2, (2, 8, 12), 4]}


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in METHODS])
def test_several_units_syncs_stay_within_budget(family, method):
    """One span per unit costs no device read: the spans are planned on the host from the placement's one read."""
    model = family_model(family)
    inputs = multi_inputs(family, model, [MULTI[family]], seed=1)
    _check_within_budget(model, inputs, method, f"{family} {method}, several units")
