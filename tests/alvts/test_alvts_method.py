"""The ALVTS method object: routing decisions, keep-all exactness, batch handling, caching, errors."""

import pytest
import torch
from alvts_models import left_padded_positions, spread_weights, tiny_config
from transformers import DynamicCache, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from vtprune._compat import cache_kwargs
from vtprune.alvts import init_factors
from vtprune.methods.alvts import ALVTS
from vtprune.ops.lowrank_scores import lowrank_scores
from vtprune.ops.routed_layer import routed_key_padding_mask


def tiny_model(attn="sdpa"):
    model = LlamaForCausalLM(tiny_config("llama", attn)).eval()
    spread_weights(model.model.layers, seed=2)
    return model


def batch(B=2, L=24, pads=(0, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 64, generator=gen)
    kpm = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]
    return x, kpm


def expected_route(a, layer, x, spans, kpm, k):
    """All real text + the reference top-k image tokens of each row (plain torch, row by row)."""
    u, v = a.selector_factors(1)
    s = lowrank_scores(layer.input_layernorm(x), u, v, visual_spans=spans, key_padding_mask=kpm, backend="reference")
    rows = []
    for b in range(x.shape[0]):
        start, n = spans[b].tolist()
        top = (torch.topk(s[b, :n], k[b]).indices + start).tolist()
        text = [i for i in range(x.shape[1]) if kpm[b, i] and not start <= i < start + n]
        rows.append(sorted(text + top))
    return rows


def test_routes_text_and_the_top_k_image_tokens():
    model = tiny_model()
    a = ALVTS(keep=5)
    a.prepare(model.model)
    x, kpm = batch(pads=(0, 0))
    spans = torch.tensor([[3, 12], [6, 12]])
    layer = model.model.layers[1]
    idx = a.route(1, layer.input_layernorm(x), spans, kpm).idx
    assert idx.dtype == torch.int64 and idx.shape == (2, 12 + 5)
    assert idx.tolist() == expected_route(a, layer, x, spans, kpm, [5, 5])


def test_routes_the_top_k_of_each_image_unit():
    """Several units per row ([B, S, 2] spans): each unit routes its own top min(keep, n) tokens, ranked by the
    scores of that unit as its row's visual span; the text between the units is routed as text."""
    model = tiny_model()
    a = ALVTS(keep=4)
    a.prepare(model.model)
    x, kpm = batch(pads=(0, 0))
    layer = model.model.layers[1]
    spans = torch.tensor([[[2, 6], [10, 3]], [[5, 8], [0, 0]]])  # row 0: units of 6 and 3 (text 8-9), row 1: one
    idx = a.route(1, layer.input_layernorm(x), spans, kpm).idx
    expected = []
    for b in range(2):
        units = [u for u in spans[b].tolist() if u[1]]
        routed = set(range(x.shape[1])) - {p for s, n in units for p in range(s, s + n)}
        for s, n in units:  # the unit alone as the row's visual span
            routed |= set(expected_route(a, layer, x[b:b + 1], torch.tensor([[s, n]]), kpm[b:b + 1],
                                         [min(4, n)])[0]) & set(range(s, s + n))
        expected.append(sorted(routed))
    K = max(len(r) for r in expected)
    assert idx.shape == (2, K)
    assert idx[0].tolist() == expected[0]
    assert set(expected[1]) <= set(idx[1].tolist())  # row 1 needs fewer: it fills with its next-best image tokens


def test_rows_with_different_image_counts_fill_with_padding_then_images():
    model = tiny_model()
    a = ALVTS(keep=4)
    a.prepare(model.model)
    x, kpm = batch(pads=(0, 6))
    spans = torch.tensor([[2, 16], [8, 10]])  # row 0: 8 text + 16 image; row 1: 6 pad + 8 text + 10 image
    idx = a.route(1, model.model.layers[1].input_layernorm(x), spans, kpm).idx
    assert idx.shape == (2, 8 + 4)  # K = max(text + k) = 12 for both rows: row 1 needs no filling
    assert idx.tolist() == expected_route(a, model.model.layers[1], x, spans, kpm, [4, 4])
    spans = torch.tensor([[2, 16], [8, 3]])  # row 1: 15 text + all 3 image = its 18 real tokens; row 0: 8 + 4
    r = a.route(1, model.model.layers[1].input_layernorm(x), spans, kpm)
    idx = r.idx
    assert idx.shape == (2, 18)  # K = 18; row 0 fills 6 slots with its next-best image tokens (no padding)
    assert idx[0].tolist() == expected_route(a, model.model.layers[1], x, spans, kpm, [10, 3])[0]
    assert idx[1].tolist() == list(range(6, 24))
    # the 6 fill tokens are marked: row 0's routed image tokens outside its own top 4
    top4 = set(expected_route(a, model.model.layers[1], x, spans, kpm, [4, 3])[0])
    assert r.num_fill == 6 and r.masked
    assert [i for i, f in zip(idx[0].tolist(), r.fill[0].tolist()) if f] == sorted(set(idx[0].tolist()) - top4)
    assert not r.fill[1].any()


def test_padding_fills_before_image_tokens():
    model = tiny_model()
    a = ALVTS(keep=2)
    a.prepare(model.model)
    x, kpm = batch(pads=(0, 4))
    spans = torch.tensor([[4, 6], [10, 6]])  # row 0: 18 text; row 1: 4 pad + 14 text
    idx = a.route(1, model.model.layers[1].input_layernorm(x), spans, kpm).idx
    assert idx.shape == (2, 20)
    row1 = set(idx[1].tolist())
    assert {0, 1, 2, 3} <= row1  # all padding routed before any extra image token
    assert len(row1 & set(range(10, 16))) == 2
    r = a.route(1, model.model.layers[1].input_layernorm(x), spans, kpm)
    assert r.fill is None and r.num_fill == 0 and r.masked  # padding only: masked as keys, no fill token
    x, kpm = batch(pads=(0, 0))
    r = a.route(1, model.model.layers[1].input_layernorm(x), torch.tensor([[4, 6], [10, 6]]), kpm)
    assert r.fill is None and not r.masked  # same text and image counts: plain causal routed sequence


def test_fill_tokens_are_not_keys_and_leave_the_layer_unchanged():
    model = tiny_model()
    lm = model.model
    a = ALVTS(keep=4)
    a.prepare(lm)
    x, kpm = batch(pads=(0, 6))
    spans = torch.tensor([[2, 16], [8, 3]])  # row 0 fills 6 slots with image tokens (see above)
    pe = lm.rotary_emb(x, left_padded_positions(kpm))
    layer = lm.layers[1]
    with torch.no_grad():
        r = a.route(1, layer.input_layernorm(x), spans, kpm)
        out, idx, routed_kpm = a.forward_layer(1, layer, x.clone(), visual_spans=spans, key_padding_mask=kpm,
                                               position_embeddings=pe, config=lm.config)
        assert torch.equal(idx, r.idx) and torch.equal(routed_kpm, kpm.gather(1, idx) & ~r.fill)
        fill = idx[0][r.fill[0]]
        assert torch.equal(out[0, fill], x[0, fill])  # bit for bit: as if skipped
        own = idx[0][~r.fill[0]]  # row 0's text and top 4 alone: what the row routes without batch-mates
        alone = layer(x[:1, own], attention_mask=None, position_embeddings=tuple(t[:1, own] for t in pe))
        alone = alone[0] if isinstance(alone, tuple) else alone
    torch.testing.assert_close(out[0, own], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.isclose(out[0, own], x[0, own]).all(-1).any()


def test_row_without_image_and_ratio_budget():
    model = tiny_model()
    x, kpm = batch(pads=(0, 0))
    layer = model.model.layers[1]
    a = ALVTS(ratio=0.25)
    a.prepare(model.model)
    spans = torch.tensor([[3, 12], [6, 0]])  # row 1 has no image: all 24 positions are text
    idx = a.route(1, layer.input_layernorm(x), spans, kpm).idx
    assert idx.shape == (2, 24) and idx[1].tolist() == list(range(24))
    spans = torch.tensor([[3, 12], [6, 9]])
    idx = a.route(1, layer.input_layernorm(x), spans, kpm).idx
    assert idx.shape == (2, max(12 + 3, 15 + 2))  # floor(0.25 * 12) = 3, floor(0.25 * 9) = 2
    assert a.visual_budget(torch.tensor([576, 2880])).tolist() == [144, 720]
    assert ALVTS(ratio=64 / 576).visual_budget(torch.tensor([576])).tolist() == [64]
    assert ALVTS(keep=64).visual_budget(torch.tensor([576, 40])).tolist() == [64, 40]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_reproduces_the_unpatched_model_exactly(attn):
    model = tiny_model(attn)
    lm = model.model
    x, kpm = batch()
    spans = torch.tensor([[3, 12], [8, 10]])
    pos = left_padded_positions(kpm)
    expected = lm(inputs_embeds=x, attention_mask=kpm.long(), position_ids=pos).last_hidden_state
    a = ALVTS(keep=None, first_layer=0)
    a.prepare(lm)
    pe = lm.rotary_emb(x, pos)
    h = x.clone()
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            assert a.layers_routed(2)[i]
            h, idx, _ = a.forward_layer(i, layer, h, visual_spans=spans, key_padding_mask=kpm, position_embeddings=pe,
                                     config=lm.config)
            assert idx.shape == (2, 24)
        assert torch.equal(lm.norm(h), expected)


def test_forward_layer_with_cache_then_decode():
    model = tiny_model()
    lm = model.model
    x, kpm = batch()
    spans = torch.tensor([[3, 12], [8, 10]])
    a = ALVTS(keep=4)
    a.prepare(lm)
    pos = left_padded_positions(kpm)
    pe = lm.rotary_emb(x, pos)
    cache = DynamicCache(config=lm.config)
    layer = lm.layers[1]
    with torch.no_grad():
        _, idx, cached_kpm = a.forward_layer(1, layer, x.clone(), visual_spans=spans, key_padding_mask=kpm,
                                             position_embeddings=pe, config=lm.config, past_key_values=cache,
                                             use_cache=True)
        assert cache.get_seq_length(1) == idx.shape[1] == 12 + 4
        x1 = torch.randn(2, 1, 64)
        pe1 = lm.rotary_emb(x1, pos[:, -1:] + 1)
        no_image = torch.tensor([[0, 0], [0, 0]])
        assert torch.equal(cached_kpm, routed_key_padding_mask(idx, kpm))  # no fill here: padding only
        out, idx1, _ = a.forward_layer(1, layer, x1.clone(), visual_spans=no_image, key_padding_mask=None,
                                    position_embeddings=pe1, config=lm.config, past_key_values=cache, use_cache=True,
                                    past_key_padding_mask=cached_kpm)
        assert idx1.tolist() == [[0], [0]]
        # the plain layer on the compacted prefill, then the same step
        plain = DynamicCache(config=lm.config)
        rows = torch.arange(2)[:, None]
        kc = kpm[rows, idx]
        layer(x[rows, idx], attention_mask=create_causal_mask(config=lm.config, inputs_embeds=x[rows, idx],
                                                              attention_mask=kc, **cache_kwargs(plain),
                                                              layer_idx=1),
              position_embeddings=tuple(t[rows, idx] for t in pe), **cache_kwargs(plain), use_cache=True)
        kc1 = torch.cat([kc, torch.ones(2, 1, dtype=torch.bool)], 1)
        expected = layer(x1, attention_mask=create_causal_mask(config=lm.config, inputs_embeds=x1, attention_mask=kc1,
                                                               **cache_kwargs(plain), layer_idx=1),
                         position_embeddings=pe1, **cache_kwargs(plain), use_cache=True)
    assert torch.equal(out, expected)


def test_layers_routed_and_prepare_cache(tmp_path):
    model = tiny_model()
    assert ALVTS().layers_routed(4) == [False, True, True, True]
    assert ALVTS(first_layer=0).layers_routed(2) == [True, True]
    a = ALVTS(keep=8, rank=3)
    f = a.prepare(model.model)
    assert f.rank == 3 and a.prepare(model.model) is f  # cached per model
    other = tiny_model()
    spread_weights(other.model.layers, seed=7)
    g = a.prepare(other.model)  # a second model keeps its own factors; the first keeps its
    assert g is not f and a.prepare(model.model) is f and a.prepare(other.model) is g
    assert not torch.equal(g.u[1], f.u[1]) and torch.equal(g.u[1], init_factors(other.model, 3).u[1])
    assert torch.equal(a.selector_factors(1, model.model.layers[1])[0], f.u[1])
    assert torch.equal(a.selector_factors(1, other.model.layers[1])[0], g.u[1])
    path = tmp_path / "f.safetensors"
    f.save(path)
    b = ALVTS(keep=8, factors=str(path))
    assert all(torch.equal(x, y) for x, y in zip(b.prepare(model.model).u, f.u))
    bf16 = tiny_model().to(torch.bfloat16)
    c = ALVTS(keep=8, factors=f)
    c.prepare(bf16.model)
    assert c.selector_factors(0)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):
        ALVTS(factors=init_factors(model.model.layers[:1], 3)).prepare(model.model)
    with pytest.raises(ValueError, match="rank 3, ALVTS was given rank=4"):
        ALVTS(factors=f, rank=4).prepare(model.model)


def test_prepare_calibrates_when_asked():
    model = tiny_model()
    batches = [{"inputs_embeds": torch.randn(2, 16, 64), "visual_spans": torch.tensor([[2, 8]] * 2)}]
    a = ALVTS(rank=4, calibration={"batches": batches, "steps": 2, "progress": False})
    assert a.prepare(model.model).meta["source"] == "calibrated"


def test_errors():
    with pytest.raises(ValueError, match="keep= or ratio="):
        ALVTS(keep=64, ratio=0.1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="keep must be"):
            ALVTS(keep=bad)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="ratio must be"):
            ALVTS(ratio=bad)
    with pytest.raises(ValueError, match="first_layer"):
        ALVTS(first_layer=-1)
    with pytest.raises(ValueError, match="skipped_as_keys=True is not supported"):
        ALVTS(skipped_as_keys=True)
    with pytest.raises(ValueError, match="backend must be"):
        ALVTS(backend="gpu")
    with pytest.raises(ValueError, match="calibration must be"):
        ALVTS(calibration={"steps": 3})
    with pytest.raises(ValueError, match="factors must be"):
        ALVTS(factors=3)
    with pytest.raises(ValueError, match="call prepare"):
        ALVTS().route(0, torch.zeros(1, 4, 64), torch.tensor([[0, 2]]), None)
    a = ALVTS()
    model = tiny_model()
    a.prepare(model.model)
    with pytest.raises(ValueError, match="layer_idx must be in"):
        a.route(2, torch.zeros(1, 4, 64), torch.tensor([[0, 2]]), None)


def test_one_object_routes_two_models_with_their_own_factors():
    first, second = tiny_model(), tiny_model()
    spread_weights(second.model.layers, seed=9)
    x, kpm = batch(pads=(0, 0))
    spans = torch.tensor([[3, 12], [6, 12]])
    h = first.model.layers[1].input_layernorm(x)
    alone = ALVTS(keep=3)
    alone.prepare(first.model)
    expected = alone.route(1, h, spans, kpm).idx
    shared = ALVTS(keep=3)
    shared.prepare(first.model)
    shared.prepare(second.model)  # must not replace the first model's factors
    with pytest.raises(ValueError, match="prepared for 2 models: pass layer="):
        shared.route(1, h, spans, kpm)
    assert torch.equal(shared.route(1, h, spans, kpm, layer=first.model.layers[1]).idx, expected)
    theirs = shared.route(1, h, spans, kpm, layer=second.model.layers[1]).idx
    other = ALVTS(keep=3)
    other.prepare(second.model)
    assert torch.equal(theirs, other.route(1, h, spans, kpm).idx) and not torch.equal(theirs, expected)
    with pytest.raises(ValueError, match="not decoder layer 0 of a model this ALVTS was prepared for"):
        shared.route(0, h, spans, kpm, layer=tiny_model().model.layers[0])
