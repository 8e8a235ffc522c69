"""Copies and saves of a patched model (issue 11): a deep copy runs its own weights with its own patch, pickling is
refused clearly, ``save_pretrained`` saves the unpatched model; and ``handle.stats`` outlives the patch."""

import copy
import io

import pytest
import torch
from models_common import SCHEDULE

import vtprune
from vtprune.alvts import SelectorFactors
from vtprune.methods.alvts import ALVTS
from vtprune.models._tiny import tiny_llava

METHODS = [lambda: vtprune.VisionDrop(**SCHEDULE, backend="reference"), lambda: ALVTS(keep=8, backend="reference")]


@pytest.mark.parametrize("method", METHODS, ids=["visiondrop", "alvts"])
def test_deepcopy_runs_its_own_weights(method, batch):
    model = tiny_llava()
    with vtprune.apply(model, method()) as h:
        before = model(**batch).logits
        router = h.method if isinstance(h.method, ALVTS) else None  # ALVTS: the copy shares the selector factors
        if router is None:
            again = method()
        else:  # the same factors, without the original's fingerprint: the weights below differ on purpose
            shared = router.prepare(model.model.language_model)
            again = ALVTS(keep=8, factors=SelectorFactors(shared.u, shared.v), backend="reference")
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for p in clone.parameters():
                p.mul_(1.5)  # the copy's weights differ from now on
        assert torch.equal(model(**batch).logits.nan_to_num(), before.nan_to_num())  # untouched, still patched
        assert h.active and clone._vtprune_handle.model is clone
        copied = clone(**batch).logits
    assert not torch.equal(copied.nan_to_num(), before.nan_to_num())  # before the fix: the original's weights
    expected_model = tiny_llava()
    with torch.no_grad():
        for p in expected_model.parameters():
            p.mul_(1.5)
    with vtprune.apply(expected_model, again):
        torch.testing.assert_close(copied, expected_model(**batch).logits, rtol=1e-5, atol=1e-5, equal_nan=True)
    clone._vtprune_handle.remove()
    torch.testing.assert_close(clone(**batch).logits, expected_model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_pickling_a_patched_model_is_refused_clearly(llava):
    with vtprune.apply(llava, vtprune.VisionZip(10, 2)):
        with pytest.raises(TypeError, match="patched model cannot be pickled"):
            torch.save(llava, io.BytesIO())
    torch.save(llava, io.BytesIO())  # unpatched: fine


def test_save_pretrained_while_patched_saves_the_unpatched_model(llava, tmp_path):
    llava.save_pretrained(tmp_path / "plain")
    with vtprune.apply(llava, ALVTS(keep=8, backend="reference")):
        llava.save_pretrained(tmp_path / "patched")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes()


def test_stats_per_row_and_after_the_with_block(llava, batch):
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)) as h:
        llava(**batch)
    st = h.stats  # before: None once the block had ended
    assert st is not None and st.visual_tokens_per_layer == [14, 10, 7, 5]
    assert st.visual_tokens_per_row == [[14, 10, 7, 5]] * 2
    real = batch["attention_mask"].sum(1).tolist()
    for b in range(2):
        dropped = [64 - v for v in st.visual_tokens_per_row[b]]
        assert st.tokens_per_row[b] == [real[b] - d for d in dropped]
    assert st.tokens_per_row[0] == st.tokens_per_layer
    assert st.tokens_per_row[0] != st.tokens_per_row[1]  # the rows differ in length: not row 0 copied
