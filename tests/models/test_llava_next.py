"""LLaVA-NeXT (anyres) integration on a tiny random-weight model: 56 px tiles of 8x8 patches, 1x2 / 2x2 grids."""

import pytest
import torch
import torch.nn.functional as F
from models_common import SCHEDULE
from official_visiondrop import merge

import vtprune
from vtprune.models._tiny import IMAGE_TOKEN, NEXT_SIZES, TINY_FAMILIES, tiny_llava_next, tiny_next_inputs

GEN = dict(max_new_tokens=8, do_sample=False)
SIZES = NEXT_SIZES  # 1 + 1x2 tiles (unpadded rows) and 1 + 2x2 tiles: different token counts
row = TINY_FAMILIES["LlavaNextForConditionalGeneration"].row  # a batch row alone, without its padding


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next()


@pytest.fixture
def next_batch(next_model):
    out = tiny_next_inputs(next_model, (3, 7), (6, 4), SIZES, seed=1)
    counts = (out["input_ids"] == IMAGE_TOKEN).sum(1)
    assert counts[0] != counts[1] and not out["attention_mask"].all()
    return out


def test_counts_are_per_tile(next_model, next_batch):
    # SCHEDULE's int counts are per 56 px tile: 3 tiles in row 0, 5 in row 1
    with vtprune.apply(next_model, vtprune.VisionDrop(**SCHEDULE)) as h:
        next_model(**row(next_batch, 0))
        assert h.stats.visual_tokens_per_layer == [3 * 14, 3 * 10, 3 * 7, 3 * 5]
        next_model(**row(next_batch, 1))
        assert h.stats.visual_tokens_per_layer == [5 * 14, 5 * 10, 5 * 7, 5 * 5]
    with vtprune.apply(next_model, vtprune.VisionDrop(ratio=0.25)) as h:
        next_model(**row(next_batch, 1))
        n = int((next_batch["input_ids"][1] == IMAGE_TOKEN).sum())
        assert h.stats.average_visual_tokens == pytest.approx(0.25 * n, rel=0.15)


def _official_tiles(model, tiles, dominant, contextual):
    """Official VisionZip/VisionDrop encoder stage on each tile: [CLS + dominant (raster), contextual] and the
    kept patch indices, written with torch only (CLIP layer -2's [CLS] attention summed over heads)."""
    tower = model.model.vision_tower
    out = tower(tiles, output_hidden_states=True)
    layer = (tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder).layers[-2]
    h_in = layer.layer_norm1(out.hidden_states[-3])
    a = layer.self_attn
    rows, kept = [], []
    for t in range(tiles.shape[0]):
        q = a.q_proj(h_in[t]).view(h_in.shape[1], a.num_heads, -1).transpose(0, 1)
        k = a.k_proj(h_in[t]).view(h_in.shape[1], a.num_heads, -1).transpose(0, 1)
        cls_attention = torch.softmax(q @ k.transpose(1, 2) * a.scale, -1)[:, 0, 1:].sum(0)
        keep = torch.zeros(h_in.shape[1], dtype=torch.bool)
        keep[0] = True
        keep[cls_attention.topk(dominant - 1).indices + 1] = True
        rows.append(merge(out.hidden_states[-2][t], k.mean(0), keep, contextual))
        kept.append(keep.nonzero().flatten())
    return model.model.multi_modal_projector(torch.stack(rows)), torch.stack(kept)


def test_encoder_layout_matches_official(next_model, next_batch):
    """restore_image_features_sorted (official code): base tile's tokens, crops' dominant patches in raster order
    over the whole grid, crops' [CLS], crops' contextual tokens; no newline, no unpadding."""
    x = row(next_batch, 1)  # 2x2 crops
    d, c, g, nh, nw = 12, 2, 8, 2, 2
    feats, keep_idx = _official_tiles(next_model, x["pixel_values"][0], d, c)
    base, crops = feats[0], feats[1:]
    restored = torch.zeros(nh * nw, g * g, feats.shape[-1])
    mask = torch.zeros(nh * nw, g * g, dtype=torch.bool)
    mask.scatter_(1, keep_idx[1:, 1:] - 1, True)
    restored[mask] = crops[:, 1:d].reshape(-1, feats.shape[-1])
    grid = restored.view(nh, nw, g, g, -1).permute(0, 2, 1, 3, 4).reshape(nh * g * nw * g, -1)
    grid_mask = mask.view(nh, nw, g, g).permute(0, 2, 1, 3).reshape(-1)
    expected = torch.cat([base, grid[grid_mask], crops[:, 0], crops[:, d:].reshape(-1, feats.shape[-1])])
    with vtprune.apply(next_model, vtprune.VisionZip(d, c)):
        got = next_model(**x).image_hidden_states
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pooled_tiles(next_model, next_batch):
    """UniformPool: every tile pooled to 4x4; the crops' pooled grids in raster order over the whole image."""
    x = row(next_batch, 1)
    out = next_model.model.vision_tower(x["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
    pooled = F.adaptive_avg_pool2d(out.reshape(5, 8, 8, -1).permute(0, 3, 1, 2), 4)  # [5, Dv, 4, 4]
    crops = pooled[1:].view(2, 2, -1, 4, 4).permute(0, 3, 1, 4, 2).reshape(64, -1)  # rows of the 8x8 pooled image
    expected = next_model.model.multi_modal_projector(torch.cat([pooled[0].flatten(1).T, crops]))
    with vtprune.apply(next_model, vtprune.UniformPool(16)):
        got = next_model(**x).image_hidden_states
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_input(next_model, next_batch):
    with pytest.raises(ValueError, match="64 patches"):  # per tile: known at apply()
        vtprune.apply(next_model, vtprune.VisionDrop(encoder=(60, 10), stages={}))
    with vtprune.apply(next_model, vtprune.VisionDrop(encoder=(12, 2), stages={1: (13, 2)})):
        with pytest.raises(ValueError, match="after layer 1 keeps 39 dominant.*only 42 visual tokens"):
            next_model(**row(next_batch, 0))
    with vtprune.apply(next_model, vtprune.VisionZip(10, 2)):
        with pytest.raises(ValueError, match="image_sizes"):
            next_model(**{k: v for k, v in next_batch.items() if k != "image_sizes"})
        bad = dict(next_batch, image_sizes=next_batch["image_sizes"].flip(0))
        with pytest.raises(ValueError, match="placeholder"):
            next_model(**bad)
