"""Fuzz of the model path (issue 11): random families x methods x padding x dtypes x budgets on tiny models.

Invariants checked for every drawn case: the patched model runs and gives finite logits; a keep-all budget gives
the unpatched model's logits; a padded batch gives each row's logits as the row alone does (float32). The draw is
seeded (reproducible); ``VTPRUNE_FUZZ_CASES`` raises the count for a longer local run.
"""

import os
import random

import pytest
import torch

import vtprune
from vtprune.methods.alvts import ALVTS
from vtprune.models import _tiny

CASES = int(os.environ.get("VTPRUNE_FUZZ_CASES", "8"))
BUILD = {"llava": _tiny.tiny_llava, "llava_next": _tiny.tiny_llava_next, "qwen2_5_vl": _tiny.tiny_qwen2_5_vl}


def _inputs(family, model, padded: bool, seed: int):
    pre, suf = ((3, 7), (6, 4)) if padded else ((5, 5), (4, 4))
    if family == "llava":
        return _tiny.tiny_inputs(model, pre, suf, seed=seed), _tiny.TINY_FAMILIES["LlavaForConditionalGeneration"].row
    if family == "llava_next":
        return (_tiny.tiny_next_inputs(model, pre, suf, _tiny.NEXT_SIZES, seed=seed),
                _tiny.TINY_FAMILIES["LlavaNextForConditionalGeneration"].row)
    return (_tiny.tiny_qwen_inputs(model, pre, suf, _tiny.QWEN_GRIDS, seed=seed),
            _tiny.TINY_FAMILIES["Qwen2_5_VLForConditionalGeneration"].row)


def _method(rng, family, full: bool):
    """(method, keeps every token) for a random method and budget."""
    ratio = 1.0 if full else rng.choice([0.25, 0.5, 0.75])
    names = ["visiondrop", "fastv", "pyramiddrop", "visionzip", "alvts"] + (["pool"] if family != "qwen2_5_vl" else [])
    name = rng.choice(names)
    if name == "visiondrop":
        return vtprune.VisionDrop(None if full else rng.choice([8, 16]), backend="reference") if family == "llava" \
            and rng.random() < 0.5 else vtprune.VisionDrop(ratio=ratio, backend="reference"), full
    if name == "fastv":
        return vtprune.FastV(layer=rng.randint(1, 3), ratio=ratio, backend="reference"), full
    if name == "pyramiddrop":
        return vtprune.PyramidDrop(ratio, layers=(1, 2, 3), backend="reference"), full
    if name == "visionzip":
        return (vtprune.VisionZip(None, 0, backend="reference"), True) if full else \
            (vtprune.VisionZip(ratio, 0.125, backend="reference"), False)
    if name == "pool":
        return vtprune.UniformPool(rng.choice([4, 16]), backend="reference"), False
    return ALVTS(keep=None if full else rng.choice([4, 8, 16]), backend="reference"), full


def _cases():
    rng = random.Random(1234)
    out = []
    for i in range(CASES):
        family = rng.choice(sorted(BUILD))
        method, full = _method(rng, family, full=i % 3 == 0)
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        out.append(pytest.param(family, method, full, dtype, rng.random() < 0.7, i,
                                id=f"{i}-{family}-{method!r}-{str(dtype)[6:]}"))
    return out


_MODELS = {}


@pytest.mark.parametrize("family,method,full,dtype,padded,seed", _cases())
def test_fuzz_model_path(family, method, full, dtype, padded, seed):
    if (family, dtype) not in _MODELS:
        _MODELS[family, dtype] = BUILD[family](dtype=dtype)
    model = _MODELS[family, dtype]
    batch, row = _inputs(family, model, padded, seed)
    plain = model(**batch).logits
    with vtprune.apply(model, method):
        out = model(**batch).logits
        assert torch.isfinite(out).all()
        if full:  # keep-all: the unpatched model
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
            torch.testing.assert_close(out, plain, **tol)
        if dtype == torch.float32:  # every row as alone (bfloat16 rounding differs with the padded length)
            for b in range(2):
                alone = model(**row(batch, b)).logits[0, -1]
                torch.testing.assert_close(out[b, -1], alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(model(**batch).logits, plain)  # removed: bit for bit the unpatched model
