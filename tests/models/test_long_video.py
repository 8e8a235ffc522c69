"""A Qwen2.5-VL video of a few hundred tokens (24 frame groups of 16): where token reduction pays most. VisionDrop
and ALVTS prune or route every frame group by its own budget, the statistics show the retention of each frame
group, and generation runs on the pruned cache."""

import pytest
import torch

import vtprune
from vtprune.models._tiny import tiny_qwen2_5_vl, tiny_qwen_multi_inputs

FRAMES, PER_FRAME = 24, 16  # 24 frame groups of an 8 x 8 patch grid (16 merged tokens each): 384 video tokens


@pytest.fixture(scope="module")
def video():
    model = tiny_qwen2_5_vl()
    return model, tiny_qwen_multi_inputs(model, [[4, (FRAMES, 8, 8), 6]], seed=3)


def test_visiondrop_keeps_the_same_share_of_every_frame_group(video):
    model, x = video
    with torch.no_grad(), vtprune.apply(model, vtprune.VisionDrop(ratio=0.25)) as handle:
        model(**x)
        out = model.generate(**x, max_new_tokens=4, do_sample=False)
    s = handle.stats
    assert out.shape[1] == x["input_ids"].shape[1] + 4
    assert s.unit_stages[0] == "unpruned" and len(s.unit_stages) >= 2  # the encoder and LLM stages
    assert len(s.unit_tokens) == FRAMES  # one record per frame group, in prompt order
    assert all(u[0] == PER_FRAME for u in s.unit_tokens)
    # frame groups of one size get one budget each: every stage keeps the same count in every group, fewer and
    # fewer tokens, and the last stage's groups add up to what the last layer ran on
    for stage in range(len(s.unit_stages)):
        assert len({u[stage] for u in s.unit_tokens}) == 1
    counts = s.unit_tokens[0]
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] < PER_FRAME
    assert sum(u[-1] for u in s.unit_tokens) == s.visual_tokens_per_layer[-1]
    assert s.visual_tokens_per_layer[0] == sum(u[1] for u in s.unit_tokens)  # layer 0: after the encoder stage


def test_alvts_routes_each_frame_group_by_its_own_budget(video):
    model, x = video
    with torch.no_grad(), vtprune.apply(model, vtprune.ALVTS(ratio=0.3)) as handle:
        model(**x)
        out = model.generate(**x, max_new_tokens=4, do_sample=False)
    s = handle.stats
    assert out.shape[1] == x["input_ids"].shape[1] + 4
    assert [u[0] for u in s.unit_tokens] == [PER_FRAME] * FRAMES
    # layer 0 runs on every token (first_layer=1); each later layer routes floor(0.3 * 16) = 4 per frame group
    # (a budget over the whole video would route floor(0.3 * 384) = 115)
    assert s.visual_tokens_per_layer == [FRAMES * PER_FRAME] + [FRAMES * 4] * (len(s.visual_tokens_per_layer) - 1)
