"""Several image units per prompt (images; a video's frame groups), for every method on the families that take
them: LLaVA-NeXT (two images), Qwen2.5-VL (two images, a video, an image and a video), Qwen3-VL (two images, a
video). Each unit is its own span in the language model and its own budget:

* keep-all == unpatched (logits and greedy tokens);
* a padded batch gives each row what it gets alone;
* ratio budgets are per unit (each unit keeps round(r * its tokens)); on dynamic resolutions an int budget larger
  than a unit keeps the whole unit and the statistics say so (``Stats.capped``);
* the kept tokens of each unit lie inside that unit's own placeholders: text between images is never counted as
  image, and every text token stays.
"""

import pytest
import torch
from models_common import METHODS as COMMON_METHODS
from models_common import apply_or_skip, family_model, load_example, multi_inputs

import vtprune
from vtprune.models._tiny import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    VIDEO_TOKEN,
    _left_pad,
)
from vtprune.models.llava_next import image_tokens as next_image_tokens

GEN = dict(max_new_tokens=5, do_sample=False)
NEXT, QWEN25, QWEN3 = ("LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                       "Qwen3VLForConditionalGeneration")
# case -> (family, a prompt's parts, a second prompt's parts for the padded batch); ints are text tokens, pairs
# images, triples (frame groups, h, w) videos
CASES = {
    "next-two-images": (NEXT, [3, (50, 100), 2, (100, 100), 4], [6, (100, 50), 2]),
    "qwen2.5-two-images": (QWEN25, [3, (8, 8), 2, (8, 12), 4], [7, (8, 12), 1]),
    "qwen2.5-video": (QWEN25, [3, (3, 8, 8), 4], [2, (2, 8, 12), 6]),
    "qwen2.5-image-video": (QWEN25, [3, (8, 8), 2, (2, 8, 12), 4], [5, (8, 8), 3, (8, 8), 1]),
    "qwen3-two-images": (QWEN3, [3, (8, 8), 2, (8, 12), 4], [7, (8, 12), 1]),
    "qwen3-video": (QWEN3, [3, (3, 8, 8), 4], [2, (2, 8, 12), 6]),
}
# every method of the generic suite, and the custom method of examples/custom_method.py
NormMerge = load_example().NormMerge
METHODS = {**COMMON_METHODS, "custom": (lambda: NormMerge(), lambda: NormMerge(keep=None))}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def inputs(family, parts, seed=0):
    return multi_inputs(family, family_model(family), [parts], seed=seed)


def unit_sizes(family, parts) -> list:
    """Tokens of each unit of a prompt, in order, from the parts (independently of the code under test)."""
    out = []
    for p in parts:
        if isinstance(p, int):
            continue
        if family == NEXT:
            out.append(next_image_tokens(family_model(family), p))
        else:
            t, h, w = (1, *p) if len(p) == 2 else p
            out += [h * w // 4] * t
    return out


def unit_positions(family, ids, parts) -> list:
    """Input positions of each unit's placeholders: the placeholder runs, a Qwen2.5-VL video's run cut into its
    frame groups."""
    where = ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)).nonzero().flatten().tolist()
    sizes, out, i = unit_sizes(family, parts), [], 0
    for n in sizes:
        out.append(where[i:i + n])
        i += n
    assert i == len(where)
    for run in out:  # each unit is one contiguous run
        assert run == list(range(run[0], run[0] + len(run)))
    return out


def batch(family, rows: list) -> dict:
    """Single-prompt inputs put into one left-padded batch."""
    ids, mask = _left_pad([x["input_ids"][0] for x in rows])
    L = ids.shape[1]
    out = {"input_ids": ids, "attention_mask": mask}
    if "mm_token_type_ids" in rows[0]:
        out["mm_token_type_ids"] = torch.stack([torch.nn.functional.pad(x["mm_token_type_ids"][0],
                                                                        (L - x["input_ids"].shape[1], 0))
                                                for x in rows])
    if family == NEXT:
        tiles = max(x["pixel_values"].shape[1] for x in rows)
        pad = [(0, 0, 0, 0, 0, 0, 0, tiles - x["pixel_values"].shape[1]) for x in rows]
        out["pixel_values"] = torch.cat([torch.nn.functional.pad(x["pixel_values"], p) for x, p in zip(rows, pad)])
        out["image_sizes"] = torch.cat([x["image_sizes"] for x in rows])
        return out
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        have = [x[key] for x in rows if key in x]
        if have:
            out[key] = torch.cat(have)
    assert (ids[:, 0] == PAD_TOKEN).any()
    return out


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m][1] is not None))
@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_all_is_unpatched(case, method):
    family, parts, _ = CASES[case]
    model, x = family_model(family), inputs(family, parts)
    ref, ref_gen = model(**x).logits, model.generate(**x, **GEN)
    with apply_or_skip(model, METHODS[method][1]()) as h:
        torch.testing.assert_close(model(**x).logits, ref, atol=1e-4, rtol=1e-4)
        assert [u[0] for u in h.stats.unit_tokens] == unit_sizes(family, parts)
        assert torch.equal(model.generate(**x, **GEN), ref_gen)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_batch_equals_rows_alone(case, method):
    family, first, second = CASES[case]
    model = family_model(family)
    rows = [inputs(family, first, seed=1), inputs(family, second, seed=2)]
    both = batch(family, rows)
    with apply_or_skip(model, METHODS[method][0]()) as h:
        out = model(**both).logits[:, -1]
        gen = model.generate(**both, **GEN)[:, -GEN["max_new_tokens"]:]
        per_row = h.stats.unit_tokens_per_row
        assert [[u[0] for u in row] for row in per_row] == [unit_sizes(family, first), unit_sizes(family, second)]
        for b, x in enumerate(rows):
            torch.testing.assert_close(out[b], model(**x).logits[0, -1], atol=2e-4, rtol=2e-4)
            assert h.stats.unit_tokens_per_row == [per_row[b]]  # the row's units and counts, as alone
            assert torch.equal(gen[b], model.generate(**x, **GEN)[0, -GEN["max_new_tokens"]:])


@pytest.mark.parametrize("method", ["fastv", "visiondrop", "pyramiddrop", "visionzip", "custom", "pool"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_tokens_lie_in_their_unit(case, method):
    """Every text token stays, and each unit's kept tokens (its last stage's count) lie inside its own
    placeholders."""
    family, parts, _ = CASES[case]
    model, x = family_model(family), inputs(family, parts, seed=3)
    ids = x["input_ids"][0]
    with apply_or_skip(model, METHODS[method][0]()) as h:
        kept = set(model(**x).kept_positions[0].tolist())
        counts = [u[-1] for u in h.stats.unit_tokens]
    units = unit_positions(family, ids, parts)
    image = {p for run in units for p in run}
    assert set(range(len(ids))) - image <= kept  # the text, also between the images
    assert [len(kept & set(run)) for run in units] == counts
    assert sum(counts) < len(image)  # the method pruned


@pytest.mark.parametrize("case", sorted(CASES))
def test_ratio_budgets_are_per_unit(case):
    family, parts, _ = CASES[case]
    model, x = family_model(family), inputs(family, parts, seed=4)
    sizes = unit_sizes(family, parts)
    with vtprune.apply(model, vtprune.FastV(layer=1, ratio=0.5, backend="reference")) as h:
        model(**x)
        assert h.stats.unit_stages == ["unpruned", "after layer 1"]
        assert h.stats.unit_tokens == [[n, int(0.5 * n + 0.5)] for n in sizes]
        assert h.stats.capped == []
    if family != NEXT:  # an encoder stage on dynamic resolutions: per unit too
        with vtprune.apply(model, vtprune.VisionZip(0.5, 0.25, backend="reference")) as h:
            model(**x)
            assert h.stats.unit_stages == ["unpruned", "encoder"]
            assert h.stats.unit_tokens == [[n, int(0.5 * n + 0.5) + int(0.25 * n + 0.5)] for n in sizes]


@pytest.mark.parametrize("family", [QWEN25, QWEN3])
def test_int_budget_larger_than_a_unit_keeps_it_whole(family):
    """Dynamic resolutions: a 16-token image under a 20-token budget keeps its 16 (capped), the 24-token one keeps
    20; at the encoder stage and after a decoder layer."""
    parts = [3, (8, 8), 2, (8, 12), 4]
    model, x = family_model(family), inputs(family, parts, seed=5)
    for method, stage in ((vtprune.FastV(layer=1, tokens=20, backend="reference"), "after layer 1"),
                          (vtprune.VisionZip(20, 0, backend="reference"), "encoder")):
        with vtprune.apply(model, method) as h:
            out = model(**x)
            assert h.stats.unit_tokens == [[16, 16], [24, 20]]
            assert h.stats.capped == [{"row": 0, "unit": 0, "stage": stage, "tokens": 16}]
            model.generate(**x, **GEN)
        assert out.kept_positions.shape[1] == x["input_ids"].shape[1] - 4


def test_fixed_resolution_keeps_its_apply_time_refusal():
    with pytest.raises(ValueError, match="lower the budget"):
        vtprune.apply(family_model(NEXT), vtprune.VisionZip(100, 0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_alvts_routes_each_unit_its_budget(case):
    family, parts, _ = CASES[case]
    model, x = family_model(family), inputs(family, parts, seed=6)
    sizes = unit_sizes(family, parts)
    with vtprune.apply(model, vtprune.ALVTS(keep=10, backend="reference")) as h:
        model(**x)
        routed = sum(min(10, n) for n in sizes)
        assert h.stats.visual_tokens_per_layer == [sum(sizes)] + [routed] * (len(model.model.language_model.layers) - 1)


def test_qwen2_5_vl_video_timing_is_the_unpatched_models():
    """``second_per_grid_ts`` spaces a video's frame groups in position space as the unpatched model does."""
    model = family_model(QWEN25)
    x = dict(inputs(QWEN25, [3, (8, 8), 2, (3, 8, 12), 4], seed=7), second_per_grid_ts=torch.tensor([2.0]))
    ref, ref_gen = model(**x).logits, model.generate(**x, **GEN)
    assert not torch.allclose(ref, model(**{k: v for k, v in x.items() if k != "second_per_grid_ts"}).logits)
    with vtprune.apply(model, vtprune.VisionDrop(tokens=None, backend="reference")):
        torch.testing.assert_close(model(**x).logits, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(**x, **GEN), ref_gen)
    with vtprune.apply(model, vtprune.FastV(layer=1, ratio=0.5, backend="reference")) as h:
        model.generate(**x, **GEN)
        assert h.stats.unit_tokens == [[16, 8], [24, 12], [24, 12], [24, 12]]
