"""examples/custom_method.py: a method written outside the package runs on every supported family through
``vtprune.apply``, honours its budget per layer, reproduces the unpatched model when it keeps every token, and
gives each batch row what the row gets alone."""

import pytest
import torch
from models_common import EXAMPLE, family_model_and_batch, load_example

import vtprune
from vtprune.models import FAMILIES
from vtprune.models._tiny import TINY_FAMILIES

GEN = dict(max_new_tokens=6, do_sample=False)

example = load_example()


def setup(name):
    return family_model_and_batch(name)


def test_the_method_is_defined_outside_the_package():
    assert not example.NormMerge.__module__.startswith("vtprune")
    assert issubclass(example.NormMerge, vtprune.methods.Method)
    assert len(EXAMPLE.read_text().splitlines()) <= 60


def test_every_family_has_a_tiny_model():
    assert set(TINY_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_budget_per_layer_from_stats(name):
    model, batch = setup(name)
    method = example.NormMerge(layer=2, keep=0.25, merged=0.125, backend="reference")
    with vtprune.apply(model, method) as h, torch.no_grad():
        model.generate(**batch, **GEN)
        counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
        for n, got in zip(counts, h.stats.visual_tokens_per_row):
            kept = max(1, round(0.25 * n)) + round(0.125 * n)
            assert kept < n
            assert got == [n, n, kept, kept]  # layers 0-1 see the whole image, layers 2-3 the selection
        assert h.stats.flops < h.stats.flops_unpruned


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_keep_all_equals_unpatched(name):
    model, batch = setup(name)
    with torch.no_grad():
        ref, ref_gen = model(**batch).logits, model.generate(**batch, **GEN)
        with vtprune.apply(model, example.NormMerge(keep=None, backend="reference")) as h:
            out, gen = model(**batch).logits, model.generate(**batch, **GEN)
            counts = (batch["input_ids"][0] == model.config.image_token_id).sum()
            assert h.stats.visual_tokens_per_layer == [int(counts)] * 4
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_batch_equals_rows_alone(name):
    model, batch = setup(name)
    row = TINY_FAMILIES[name].row
    n = GEN["max_new_tokens"]
    with vtprune.apply(model, example.NormMerge(backend="reference")), torch.no_grad():
        both = model(**batch).logits[:, -1]
        tokens = model.generate(**batch, **GEN)[:, -n:]
        for b in range(2):
            torch.testing.assert_close(both[b], model(**row(batch, b)).logits[0, -1], atol=1e-4, rtol=1e-4)
            assert torch.equal(tokens[b], model.generate(**row(batch, b), **GEN)[0, -n:])


def test_the_example_runs_every_family(capsys):
    example.main()
    printed = capsys.readouterr().out
    assert all(name in printed for name in FAMILIES)
