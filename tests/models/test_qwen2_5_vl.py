"""Qwen2.5-VL integration on a tiny random-weight model: window-attention ViT (4 px patches, 2x2 merger, block 1
full attention), 4-layer Qwen2 LLM with GQA and 3-D M-RoPE."""

import sys

import pytest
import torch
from models_common import SCHEDULE

import vtprune
from vtprune.models._tiny import IMAGE_TOKEN, QWEN_GRIDS, TINY_FAMILIES, tiny_qwen2_5_vl, tiny_qwen_inputs

GEN = dict(max_new_tokens=8, do_sample=False)
GRIDS = QWEN_GRIDS  # 24 and 36 merged tokens, several 2x2-token windows each
row = TINY_FAMILIES["Qwen2_5_VLForConditionalGeneration"].row  # a batch row alone, without its padding


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl()


@pytest.fixture
def qbatch(qwen):
    out = tiny_qwen_inputs(qwen, (3, 7), (6, 4), GRIDS, seed=1)
    assert not out["attention_mask"].all()
    return out


def test_counts_follow_schedule(qwen, qbatch):
    with vtprune.apply(qwen, vtprune.VisionDrop(**SCHEDULE)) as h:
        qwen(**qbatch)
        assert h.stats.visual_tokens_per_layer == [14, 10, 7, 5]
        text = 3 + 6 + 2  # prompt text of row 0 and the vision start / end tokens
        assert h.stats.tokens_per_layer == [text + n for n in (14, 10, 7, 5)]
        assert h.stats.flops < h.stats.flops_unpruned
    with vtprune.apply(qwen, vtprune.VisionDrop(ratio=0.25)) as h:
        qwen(**row(qbatch, 1))
        assert h.stats.average_visual_tokens == pytest.approx(0.25 * 36, rel=0.15)


def _rope_positions(qwen, x):
    types = (x["input_ids"] == IMAGE_TOKEN).int()
    return qwen.model.get_rope_index(x["input_ids"], mm_token_type_ids=types, image_grid_thw=x["image_grid_thw"],
                                     attention_mask=x["attention_mask"])[0]


def test_encoder_stage_scores_and_positions(qwen, qbatch):
    """The kept merged tokens are the top-d by the 2x2-group mean of the visual-to-visual attention at the last
    full-attention block (recomputed here with a materialised softmax), and they keep their original 3-D
    positions; so does the text after the image."""
    x = row(qbatch, 0)
    visual = qwen.model.visual
    hf = sys.modules[type(visual).__module__]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(h=args[0], pos=kwargs["position_embeddings"])

    hook = visual.blocks[1].attn.register_forward_pre_hook(grab, with_kwargs=True)
    visual(x["pixel_values"], grid_thw=x["image_grid_thw"])
    hook.remove()
    a = visual.blocks[1].attn
    n = seen["h"].shape[0]
    q, k, _ = a.qkv(seen["h"]).reshape(n, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = hf.apply_rotary_pos_emb_vision(q, k, *seen["pos"])
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * a.scaling, -1)  # one image: full attention
    score = probs.mean(0).mean(0)  # [N] patches, window order
    window_index = hf.get_vision_window_index(x["image_grid_thw"], spatial_merge_size=2,
                                              window_size=visual.window_size, patch_size=visual.patch_size)[0]
    merged = torch.empty(n // 4)
    merged[window_index] = score.view(-1, 4).mean(1)  # raster order of merged tokens
    top = merged.topk(6).indices.sort().values

    captured = {}
    hook = qwen.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.update(pos=k["position_ids"]), with_kwargs=True)
    try:
        with vtprune.apply(qwen, vtprune.VisionZip(6, 0)):
            qwen(**x)
    finally:
        hook.remove()
    full = _rope_positions(qwen, x)[:, 0]  # [3, L]
    image = full[:, x["input_ids"][0] == IMAGE_TOKEN]
    start = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    expected = torch.cat([full[:, :start], image[:, top], full[:, start + n // 4:]], 1)
    assert torch.equal(captured["pos"][:, 0], expected)


def test_bad_input(qwen, qbatch):
    with pytest.raises(ValueError, match="UniformPool|square grid"):
        vtprune.apply(qwen, vtprune.UniformPool(16))
    assert "forward" not in qwen.model.__dict__
    with vtprune.apply(qwen, vtprune.VisionZip(10, 2)):
        with pytest.raises(ValueError, match="image_grid_thw"):
            qwen(**{k: v for k, v in qbatch.items() if k != "image_grid_thw"})
        with pytest.raises(ValueError, match="video_grid_thw"):
            qwen(**qbatch, pixel_values_videos=qbatch["pixel_values"])
