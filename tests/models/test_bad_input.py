"""Bad input: clear errors naming what is wrong, or correct behaviour."""

import pytest
import torch
from models_common import SCHEDULE
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from vtprune.models._tiny import tiny_inputs


def test_unsupported_model_names_class_and_supported():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"):
        vtprune.apply(model, vtprune.VisionDrop())


def test_not_a_method(llava):
    with pytest.raises(TypeError, match="method must be"):
        vtprune.apply(llava, "visiondrop")


def test_budget_larger_than_visual_tokens(llava, inputs):
    with pytest.raises(ValueError, match="keeps 70 tokens per image.*64 patches"):  # known at apply()
        vtprune.apply(llava, vtprune.VisionDrop(encoder=(60, 10), stages={}))
    with pytest.raises(ValueError, match="after layer 1 keeps 22 visual tokens.*14 tokens after the encoder"):
        vtprune.apply(llava, vtprune.VisionDrop(encoder=(12, 2), stages={1: (20, 2)}))
    # fractions of the image are resolved per image: still checked at the first forward
    with vtprune.apply(llava, vtprune.VisionDrop(encoder=(12, 2), stages={1: (0.5, 0)})):
        with pytest.raises(ValueError, match="after layer 1 keeps 32 dominant.*only 14 visual tokens"):
            llava(**inputs)


def test_stage_past_the_last_layer(llava):
    with pytest.raises(ValueError, match="4 layers"):
        vtprune.apply(llava, vtprune.VisionDrop(encoder=(12, 2), stages={4: (8, 2)}))
    with pytest.raises(ValueError, match="strictly increasing"):
        vtprune.apply(llava, vtprune.PyramidDrop(layers=(2, 1)))
    assert "forward" not in llava.model.__dict__  # a failed apply leaves nothing behind


def test_row_without_image(llava):
    batch = tiny_inputs(llava, (3, 4), (5, 6), images=[True, False], seed=2)
    text = {"input_ids": batch["input_ids"][1:, batch["attention_mask"][1].bool()]}
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)) as h:
        both = llava(**batch).logits[:, -1]
        assert h.stats.visual_tokens_per_layer == [14, 10, 7, 5]  # row 0 is pruned
        gen = llava.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        alone = llava(**text).logits[0, -1]
        assert torch.equal(gen[1], llava.generate(**text, max_new_tokens=4, do_sample=False)[0, -4:])
    torch.testing.assert_close(both[1], alone, atol=1e-4, rtol=1e-4)


def test_several_images_in_one_prompt(llava):
    one = tiny_inputs(llava, (3,), (4,), seed=3)
    ids = one["input_ids"][0]
    two = {"input_ids": torch.cat([ids[:3 + 64], ids])[None],  # [text, image, text, image, text]
           "pixel_values": torch.cat([one["pixel_values"], one["pixel_values"].flip(-1)])}
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)) as h:  # each image pruned in its own span
        llava(**two)
        assert h.stats.unit_tokens == [[64, 12 + 2, 8 + 2, 6 + 1, 4 + 1]] * 2
    with vtprune.apply(llava, vtprune.VisionZip(10, 2)) as h:  # encoder-only methods prune each image
        out = llava(**two).kept_positions
        assert h.stats.tokens_per_layer[0] == two["input_ids"].shape[1] - 2 * (64 - 12)
    assert out.shape[1] == two["input_ids"].shape[1] - 2 * (64 - 12)


def test_wrong_placeholder_count(llava, inputs):
    bad = dict(inputs, input_ids=inputs["input_ids"][:, 1:])  # drop a text token: fine
    with vtprune.apply(llava, vtprune.VisionZip(10, 2)):
        llava(**{k: v for k, v in bad.items() if k != "attention_mask"})
        ids = inputs["input_ids"].clone()
        ids[0, 5] = 7  # one placeholder less
        with pytest.raises(ValueError, match="placeholder"):
            llava(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_labels_on_pruned_image_tokens_refused(llava, inputs):
    with vtprune.apply(llava, vtprune.VisionZip(10, 2)):  # labels= is supported; image tokens it pruned are refused
        with pytest.raises(ValueError, match="labels"):
            llava(**inputs, labels=inputs["input_ids"])


def test_right_padding_refused_for_text_guided(llava):
    batch = tiny_inputs(llava, (3, 7), (6, 5), seed=1)  # row 0 has 3 pads; move them to the right
    assert not batch["attention_mask"].all()
    right = {"input_ids": batch["input_ids"].roll(-3, 1), "attention_mask": batch["attention_mask"].roll(-3, 1),
             "pixel_values": batch["pixel_values"]}
    with vtprune.apply(llava, vtprune.FastV(layer=1)):
        with pytest.raises(ValueError, match="left padding"):
            llava(**right)
