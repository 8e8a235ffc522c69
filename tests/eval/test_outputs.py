"""A patched prefill's outputs in input coordinates (vtprune.outputs): logits, labels= loss, kept_positions, on a
tiny model of each family."""

import pytest
import torch

import vtprune
from vtprune import ALVTS, VisionDrop
from vtprune.models._tiny import (
    IMAGE_TOKEN,
    tiny_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_next_inputs,
    tiny_qwen2_5_vl,
    tiny_qwen_inputs,
)
from vtprune.outputs import pruned_logits

SCHEDULE = dict(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)}, backend="reference")


def _llava():
    m = tiny_llava()
    return m, tiny_inputs(m, (3, 7), (6, 4), seed=1)


def _next():
    m = tiny_llava_next()
    return m, tiny_next_inputs(m, (3, 6), (5, 4), image_sizes=((50, 100), (100, 50)), seed=1)


def _qwen():
    m = tiny_qwen2_5_vl()
    return m, tiny_qwen_inputs(m, (3, 6), (5, 4), grids=((8, 12), (8, 8)), seed=1)


FAMILIES = {"llava": _llava, "llava_next": _next, "qwen2_5_vl": _qwen}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]()


def text_labels(batch):
    """Labels on every real text token but each row's first (which the unpatched model predicts from padding);
    image placeholders and padding -100."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    first = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, mask.argmax(1, keepdim=True), True)
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (mask == 0) | first, -100)
    return labels.masked_fill(ids >= IMAGE_TOKEN - 3, -100)  # Qwen's vision start/end tokens too


def reference_loss(logits, labels):
    """Mean next-token cross entropy over the labelled targets, from input-coordinate logits."""
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep])


@pytest.mark.parametrize("method", [lambda: VisionDrop(tokens=None, backend="reference"),
                                    lambda: ALVTS(keep=None, backend="reference")], ids=["visiondrop", "alvts"])
def test_keep_all_gives_the_unpatched_logits_and_loss(family, method):
    model, batch = family
    labels = text_labels(batch)
    with torch.no_grad():
        ref = model(**batch, labels=labels)
        with vtprune.apply(model, method()):
            out = model(**batch, labels=labels)
    B, L = batch["input_ids"].shape
    assert torch.equal(out.kept_positions, torch.arange(L).expand(B, L))
    assert out.logits.shape == ref.logits.shape
    # VisionDrop's keep-all runs the CLIP feature layer through attention_with_scores (float rounding only)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


def test_alvts_keep_all_loss_is_bitwise_the_unpatched_loss():
    model, batch = _llava()
    labels = text_labels(batch)
    with torch.no_grad():
        ref = model(**batch, labels=labels)
        with vtprune.apply(model, ALVTS(keep=None, backend="reference")):
            out = model(**batch, labels=labels)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)


def test_pruned_logits_sit_at_their_input_positions():
    model, batch = _llava()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), vtprune.apply(model, VisionDrop(**SCHEDULE)):
        out = model(**batch)
    kept = out.kept_positions
    for b in range(2):
        real = mask[b].nonzero().flatten()
        image = (ids[b] == IMAGE_TOKEN).nonzero().flatten()
        first, text = int(image[0]), real[ids[b, real] != IMAGE_TOKEN]
        # the language model ran on: the text, and 5 image tokens (4 dominant + 1 contextual after layer 3) in the
        # first placeholder slots, each at its input index
        expected = torch.cat([text[text < first], torch.arange(first, first + 5), text[text > first]])
        ran = kept[b][kept[b] >= 0]
        assert torch.equal(ran[mask[b, ran] == 1], expected)  # (input padding that stays keeps its index)
        # every text position predicting a text token has logits; pruned placeholders are NaN
        has = ~torch.isnan(out.logits[b, :, 0])
        assert has[text[:-1][(text[:-1] + 1) < ids.shape[1]]].all()
        assert has[int(image[-1])]  # the last placeholder: the pruned model's prediction of the text after it
        assert not has[first + 5:int(image[-1])].any()
        assert int(has[real].sum()) == len(expected)
    # the same rows as the language model computed: the last position is the next-token prediction
    rows = pruned_logits(out.logits, kept)
    torch.testing.assert_close(rows[:, -1], out.logits[:, -1])
    assert rows.shape[1] == kept.shape[1]


@pytest.mark.parametrize("method", [lambda: VisionDrop(**SCHEDULE), lambda: ALVTS(keep=8, backend="reference")],
                         ids=["visiondrop", "alvts"])
def test_labels_loss_is_over_the_unpatched_models_text_targets(family, method):
    model, batch = family
    labels = text_labels(batch)
    with torch.no_grad(), vtprune.apply(model, method()):
        out = model(**batch, labels=labels)
        plain = model(**batch)
    assert torch.equal(out.logits.isnan(), plain.logits.isnan())
    # each labelled text target scored by the input-coordinate logit before it: the same targets as the
    # unpatched loss, none NaN
    assert not out.logits[:, :-1][labels[:, 1:] != -100].isnan().any()
    torch.testing.assert_close(out.loss, reference_loss(out.logits, labels), atol=1e-5, rtol=1e-5)


def test_labels_on_pruned_image_tokens_are_refused():
    model, batch = _llava()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # image tokens labelled too
    with torch.no_grad(), vtprune.apply(model, VisionDrop(**SCHEDULE)):
        with pytest.raises(ValueError, match=r"labels: .*pruned.*-100"):
            model(**batch, labels=labels)
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(**batch, labels=text_labels(batch), logits_to_keep=1)


def test_tuple_outputs_and_logits_to_keep():
    model, batch = _llava()
    labels = text_labels(batch)
    with torch.no_grad(), vtprune.apply(model, VisionDrop(**SCHEDULE)):
        out = model(**batch, labels=labels)
        tup = model(**batch, labels=labels, return_dict=False)
        last = model(**batch, logits_to_keep=1)
    assert torch.equal(tup[0], out.loss) and torch.equal(tup[1].nan_to_num(), out.logits.nan_to_num())
    assert last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1], atol=1e-5, rtol=1e-5)
