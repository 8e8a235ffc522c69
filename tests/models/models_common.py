"""Helpers shared by the model tests (not in conftest.py: test modules import them by name, and another test
folder's conftest module would shadow this folder's in a session that collects both)."""

import importlib.util
import pathlib

import pytest

import vtprune

SCHEDULE = dict(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)})


_FAMILY_MODELS = {}


def family_model(family: str):
    """The tiny model of ``family`` (a ``TINY_FAMILIES`` key), built once per test process."""
    from vtprune.models._tiny import TINY_FAMILIES

    if family not in _FAMILY_MODELS:
        _FAMILY_MODELS[family] = TINY_FAMILIES[family].build()
    return _FAMILY_MODELS[family]


def family_model_and_batch(family: str):
    """(tiny model, two different prompts of different lengths, left-padded) of ``family``."""
    from vtprune.models._tiny import TINY_FAMILIES

    model = family_model(family)
    batch = TINY_FAMILIES[family].batch(model, (3, 7), (6, 4), seed=1)
    assert not batch["attention_mask"].all()  # row 0 really is padded
    return model, batch


EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_method.py"


def load_example():
    """``examples/custom_method.py`` as a module, loaded from its file (the method lives outside the package)."""
    spec = importlib.util.spec_from_file_location("custom_method", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (a pruning instance, its keep-all instance or None); budgets that fit every family's tiny images
METHODS = {
    "visiondrop": (lambda: vtprune.VisionDrop(**SCHEDULE, backend="reference"),
                   lambda: vtprune.VisionDrop(tokens=None, backend="reference")),
    "fastv": (lambda: vtprune.FastV(layer=1, ratio=0.25, backend="reference"),
              lambda: vtprune.FastV(layer=1, ratio=1.0, backend="reference")),
    "pyramiddrop": (lambda: vtprune.PyramidDrop(backend="reference"),
                    lambda: vtprune.PyramidDrop(ratio=1.0, backend="reference")),
    "visionzip": (lambda: vtprune.VisionZip(10, 2, backend="reference"),
                  lambda: vtprune.VisionZip(None, 0, backend="reference")),
    "pool": (lambda: vtprune.UniformPool(16, backend="reference"), None),
    "alvts": (lambda: vtprune.ALVTS(keep=16, backend="reference"),
              lambda: vtprune.ALVTS(keep=None, backend="reference")),
}


def apply_or_skip(model, method):
    """``vtprune.apply``, or skip where the family refuses the method by design (pooling to a square grid on
    dynamic resolutions: ``test_generic.py::test_pool_is_refused_without_a_square_grid``)."""
    try:
        return vtprune.apply(model, method)
    except ValueError as e:
        if "square grid" in str(e):
            pytest.skip(f"{type(model).__name__} refuses {method!r}: {e}")
        raise


def multi_inputs(family: str, model, rows, *, seed: int = 0) -> dict:
    """Left-padded inputs of ``family`` with several image units per prompt (``rows`` as the tiny builders'
    ``tiny_next_multi_inputs`` / ``tiny_qwen_multi_inputs`` take them)."""
    from vtprune.models._tiny import tiny_next_multi_inputs, tiny_qwen_multi_inputs
    from vtprune.models._tiny_qwen3_vl import tiny_qwen3_multi_inputs

    build = {"LlavaNextForConditionalGeneration": tiny_next_multi_inputs,
             "Qwen2_5_VLForConditionalGeneration": tiny_qwen_multi_inputs,
             "Qwen3VLForConditionalGeneration": tiny_qwen3_multi_inputs}[family]
    return build(model, rows, seed=seed)
