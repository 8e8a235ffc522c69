"""LLaVA-1.5 integration on a tiny random-weight model (CPU, reference backend)."""

import pytest
import torch
from models_common import SCHEDULE
from official_visiondrop import official_logits

import vtprune
from vtprune.models._tiny import tiny_inputs, tiny_llava

GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("ratio,counts", [(0.7, [64, 50, 38, 27]), (0.9, [64, 64, 59, 43]), (1.0, [64] * 4)])
def test_high_ratios_fit_the_image(llava, batch, ratio, counts):
    """ratio > 2/3: the encoder keeps the whole image, the later stages get the rest of the budget."""
    with vtprune.apply(llava, vtprune.VisionDrop(tokens=None)):
        keep_all = llava(**batch).logits
    with vtprune.apply(llava, vtprune.VisionDrop(ratio=ratio)) as h:
        out = llava(**batch).logits
        st = h.stats
    assert st.visual_tokens_per_layer == counts
    assert abs(st.average_visual_tokens - ratio * 64) < 1
    # every stage still scores and selects (a keep-all stage too)
    assert [s["stage"] for s in st.selections] == ["encoder", "after layer 1", "after layer 2", "after layer 3"]
    if ratio == 1.0:
        assert torch.equal(out, keep_all)


def test_decode_steps_read_no_more_masks_than_unpatched(llava, batch, monkeypatch):
    """Decode steps use what the host knows about each layer group's padding after the prefill, so the mask builder
    does not read every group's mask on the host (once per group and step before): a step reads the incoming mask
    at most once, as the unpatched model does (none when generate() drops an all-ones mask)."""
    real, reads = torch.Tensor.__bool__, []  # a host read of a mask ends in bool(tensor) (an `if` on it)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real(t))
    unpadded = tiny_inputs(llava, (3, 7), (6, 2), seed=1)
    assert unpadded["attention_mask"].all()

    def reads_per_step(inputs):
        counts = []
        for steps in (1, 3):
            reads.clear()
            out = llava.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            counts.append(len(reads))
        return (counts[1] - counts[0]) / 2, out

    unpatched_padded, unpatched_unpadded = reads_per_step(batch)[0], reads_per_step(unpadded)[0]
    assert unpatched_padded >= 1  # transformers reads the padded mask once per step
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)):
        per_step, gen = reads_per_step(unpadded)
        assert per_step == unpatched_unpadded
        assert torch.equal(gen, llava.generate(**unpadded, max_new_tokens=3, do_sample=False, use_cache=False))
        per_step, gen = reads_per_step(batch)
        assert per_step == unpatched_padded
        assert torch.equal(gen, llava.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False))


def test_counts_follow_schedule(llava, inputs):
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)) as h:
        out = llava(**inputs).logits
        st = h.stats
    assert st.visual_tokens_per_layer == [14, 10, 7, 5]
    assert st.average_visual_tokens == pytest.approx(9.0)
    text = 3 + 5
    assert st.tokens_per_layer == [text + n for n in (14, 10, 7, 5)]
    assert out.shape[1] == text + 5  # logits cover the pruned sequence
    assert st.flops < st.flops_unpruned
    assert st.flops_unpruned == vtprune.flops.prefill_flops(llava.config, text + 64)


def test_matches_official_algorithm(llava, inputs):
    ids = inputs["input_ids"]
    ref = official_logits(llava, ids, inputs["pixel_values"], SCHEDULE["encoder"], SCHEDULE["stages"])
    with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE)):
        out = llava(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_apply_twice_is_an_error(llava):
    with vtprune.apply(llava, vtprune.VisionZip()):
        with pytest.raises(RuntimeError, match="already patched"):
            vtprune.apply(llava, vtprune.FastV())
    vtprune.apply(llava, vtprune.FastV()).remove()  # fine again after removal


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_and_dtypes(attn, dtype):
    model = tiny_llava(attn_implementation=attn, dtype=dtype)
    batch = tiny_inputs(model, (3, 7), (6, 4), seed=1)
    with vtprune.apply(model, vtprune.VisionDrop(**SCHEDULE)) as h:
        gen = model.generate(**batch, **GEN)
        assert h.stats.visual_tokens_per_layer == [14, 10, 7, 5]
        assert torch.equal(gen, model.generate(**batch, **GEN, use_cache=False))


def test_flash_attention_2():
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package and a CUDA GPU")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA GPU")
    model = tiny_llava(attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    batch = {k: v.cuda() for k, v in tiny_inputs(model, (3, 7), (6, 4), seed=1).items()}
    with vtprune.apply(model, vtprune.VisionDrop(**SCHEDULE)):
        assert torch.equal(model.generate(**batch, **GEN), model.generate(**batch, **GEN, use_cache=False))
