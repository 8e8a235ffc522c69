"""The generic model properties, for every family (``vtprune.models._tiny.TINY_FAMILIES``) x every method: a new
family or method gets them by being added to the tables.

* keep-all == unpatched: a method at its keep-all budget reproduces the unpatched logits and greedy tokens;
* batch == rows alone: each row of a left-padded two-row batch (different prompt lengths, image sizes where the
  family takes dynamic resolutions) gets the logits and tokens it gets alone;
* cache == no cache for image-guided methods (their selection depends only on the prompt up to the image, so
  recomputing the whole sequence at every step re-applies the same pruned prefill);
* remove() is exact: the unpatched model's outputs, bit for bit, and no attribute left behind.
"""

import pytest
import torch
from models_common import METHODS, apply_or_skip, family_model_and_batch

import vtprune
from vtprune.models._tiny import TINY_FAMILIES

GEN = dict(max_new_tokens=8, do_sample=False)
FAMILY_NAMES = sorted(TINY_FAMILIES)
IMAGE_GUIDED = ("visiondrop", "visionzip", "pool")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def setup(family):
    return family_model_and_batch(family)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m][1] is not None))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keep_all_equals_unpatched(family, method):
    model, batch = setup(family)
    ref, ref_gen = model(**batch).logits, model.generate(**batch, **GEN)
    with apply_or_skip(model, METHODS[method][1]()) as h:
        out, gen = model(**batch).logits, model.generate(**batch, **GEN)
        count = int((batch["input_ids"][0] == model.config.image_token_id).sum())
        assert h.stats.visual_tokens_per_layer == [count] * 4
    # the only numerical difference: an encoder hook's scoring layer runs through attention_with_scores
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_equals_rows_alone(family, method):
    model, batch = setup(family)
    row = TINY_FAMILIES[family].row
    n = GEN["max_new_tokens"]
    with apply_or_skip(model, METHODS[method][0]()) as h:
        both = model(**batch).logits[:, -1]
        assert h.stats.average_visual_tokens < int((batch["input_ids"][0] == model.config.image_token_id).sum())
        tokens = model.generate(**batch, **GEN)[:, -n:]
        for b in range(2):
            torch.testing.assert_close(both[b], model(**row(batch, b)).logits[0, -1], atol=1e-4, rtol=1e-4)
            assert torch.equal(tokens[b], model.generate(**row(batch, b), **GEN)[0, -n:])


@pytest.mark.parametrize("method", IMAGE_GUIDED)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cache_equals_no_cache(family, method):
    model, batch = setup(family)
    with apply_or_skip(model, METHODS[method][0]()):
        cached = model.generate(**batch, **GEN)
        recomputed = model.generate(**batch, **GEN, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_remove_is_exact(family, method):
    model, batch = setup(family)
    layers = model.model.language_model.layers
    cls_forward = type(layers[0]).forward
    ref = model(**batch).logits
    h = apply_or_skip(model, METHODS[method][0]())
    pruned = model(**batch).logits
    assert pruned.shape != ref.shape or not torch.equal(pruned, ref)
    h.remove()
    assert torch.equal(model(**batch).logits, ref)
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert not patched and "_vtprune_handle" not in model.__dict__
    assert type(layers[0]).forward is cls_forward
    h.remove()  # idempotent


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pool_is_refused_without_a_square_grid(family):
    """Pooling to a square grid either runs (a fixed square patch grid: 16 tokens per tile, plus LLaVA-NeXT's one
    newline on a single-tile image) or is refused at apply() with a message that says why."""
    model, batch = setup(family)
    try:
        h = vtprune.apply(model, METHODS["pool"][0]())
    except ValueError as e:
        assert "UniformPool" in str(e) and "square grid" in str(e)
        return
    with h:
        model(**batch)
        assert h.stats.visual_tokens_per_layer[0] % 16 in (0, 1)
