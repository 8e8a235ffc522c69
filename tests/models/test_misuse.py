"""Issue 11 (model path): inputs and uses that once ran silently wrong or failed with an unclear error."""

import pytest
import torch
from models_common import SCHEDULE

import vtprune
from vtprune.methods.alvts import ALVTS
from vtprune.models._tiny import (
    IMAGE_TOKEN,
    tiny_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_next_inputs,
    tiny_qwen2_5_vl,
    tiny_qwen_inputs,
)

METHODS = {
    "alvts": lambda: ALVTS(keep=8, backend="reference"),
    "visiondrop": lambda: vtprune.VisionDrop(**SCHEDULE, backend="reference"),
    "fastv": lambda: vtprune.FastV(layer=1, tokens=8, backend="reference"),
    "pyramiddrop": lambda: vtprune.PyramidDrop(backend="reference"),
}


def _two_images_llava(llava):
    one = tiny_inputs(llava, (3,), (4,), seed=3)
    ids = one["input_ids"][0]
    return {"input_ids": torch.cat([ids[:3 + 64], ids])[None],  # [text, image, text, image, text]
            "pixel_values": torch.cat([one["pixel_values"], one["pixel_values"].flip(-1)])}


def _two_images_qwen(qwen):
    one = tiny_qwen_inputs(qwen, (3,), (4,), ((8, 8),), seed=3)
    ids = one["input_ids"][0]
    n = int((ids == IMAGE_TOKEN).sum())
    two_ids = torch.cat([ids[:3 + n + 2], ids])[None]  # start token, image, end token, then the prompt again
    return {"input_ids": two_ids, "pixel_values": torch.cat([one["pixel_values"], one["pixel_values"].flip(0)]),
            "image_grid_thw": one["image_grid_thw"].repeat(2, 1), "mm_token_type_ids": (two_ids == IMAGE_TOKEN).int()}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_several_images_per_prompt_ranked_per_image(family, method):
    """Two images in a prompt are two spans: methods that rank image tokens in the language model (ALVTS once
    routed the text between them as image tokens) keep each image's budget inside its own span."""
    model = tiny_llava() if family == "llava" else tiny_qwen2_5_vl()
    two = _two_images_llava(model) if family == "llava" else _two_images_qwen(model)
    ids = two["input_ids"][0]
    images = ids == IMAGE_TOKEN
    with vtprune.apply(model, METHODS[method]()) as h:
        kept = model(**two).kept_positions[0]
        n = int(images.sum()) // 2
        assert [u[0] for u in h.stats.unit_tokens] == [n, n]  # two units, each its own placeholders
    text = (~images).nonzero().flatten()
    assert set(text.tolist()) <= set(kept.tolist())  # every text token stays (the drops are image tokens)


def test_image_placeholders_not_one_run_are_refused(llava):
    """An image's placeholders must be one contiguous run: text inside it is refused, never read as image."""
    one = tiny_inputs(llava, (3,), (4,), seed=3)
    ids = one["input_ids"][0]
    bad = torch.cat([ids[:3 + 60], ids[:2], ids[3 + 60:3 + 64], ids[3:]])[None]  # 60 + text + 4 + 64 placeholders
    with vtprune.apply(llava, METHODS["visiondrop"]()):
        with pytest.raises(ValueError, match="not one contiguous run"):
            llava(input_ids=bad, pixel_values=torch.cat([one["pixel_values"]] * 2))


def test_attention_mask_shorter_than_input_ids(llava, inputs):
    short = dict(inputs, attention_mask=inputs["attention_mask"][:, 2:])
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)):
        with pytest.raises(ValueError, match="attention_mask"):
            llava(**short)


def test_multi_turn_generate_on_a_pruned_cache_is_refused_clearly(llava):
    first = tiny_inputs(llava, (3,), (5,), seed=4)
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)):
        out = llava.generate(**first, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        follow = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], 1)
        with pytest.raises(ValueError, match="multi-turn"):
            llava.generate(input_ids=follow, attention_mask=torch.ones_like(follow), past_key_values=cache,
                           max_new_tokens=2, do_sample=False)


def test_llava_next_image_sizes_must_be_positive():
    model = tiny_llava_next()
    batch = tiny_next_inputs(model, (3,), (4,), ((50, 100),), seed=1)
    for bad in ([[0, 100]], [[50, -3]]):
        with vtprune.apply(model, vtprune.VisionDrop(**SCHEDULE)):
            with pytest.raises(ValueError, match="image_sizes"):
                model(**dict(batch, image_sizes=torch.tensor(bad)))


def test_look_alike_classes_are_refused(llava):
    sub = type("LlavaForConditionalGeneration", (type(llava),), {})
    other = type("LlavaForConditionalGeneration", (torch.nn.Module,), {})
    for cls in (sub, other):
        fake = object.__new__(cls)
        with pytest.raises(TypeError, match="look-alike"):
            vtprune.apply(fake, vtprune.VisionDrop())


@pytest.mark.parametrize("method", [lambda: vtprune.VisionDrop(tokens=1000), lambda: vtprune.FastV(tokens=100),
                                    lambda: vtprune.VisionZip(60, 10), lambda: vtprune.UniformPool(81)])
def test_budget_larger_than_the_image_is_refused_at_apply(llava, method):
    m = method()
    with pytest.raises(ValueError, match=r"64 patches \(8x8\)") as err:
        vtprune.apply(llava, m)
    assert repr(m) in str(err.value)
    assert "forward" not in llava.model.__dict__  # nothing left behind
