"""ALVTS calibration: the oracle S*, the differentiable selector score, and held-out loss reduction."""

import pytest
import torch
from alvts_models import left_padded_positions, rope, spread_weights, tiny_config, tiny_layer
from transformers import LlamaForCausalLM

from vtprune._compat import cache_kwargs
from vtprune.alvts import calibrate, capture_layer_inputs, init_factors, selector_loss
from vtprune.alvts.calibrate import full_rank_scores, selector_scores
from vtprune.reference.lowrank_scores import lowrank_scores


def test_selector_scores_is_the_ops_reference():
    """Calibration must fit exactly what vtprune.ops.lowrank_scores computes (padding, no-text rows)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 13, 16, generator=gen, dtype=torch.float64)
    u, v = (torch.randn(16, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    spans = torch.tensor([[2, 6], [4, 9], [0, 13]])  # row 2: all visual, no text
    kpm = torch.ones(3, 13, dtype=torch.bool)
    kpm[1, :3] = False
    ours = selector_scores(h, u, v, spans, kpm)
    torch.testing.assert_close(ours, lowrank_scores(h, u, v, visual_spans=spans, key_padding_mask=kpm).float())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_rank_scores_match_the_layers_own_eager_attention(family):
    layer, rot, cfg = tiny_layer(family, attn="eager", dtype=torch.float64)
    from transformers.masking_utils import create_causal_mask

    B, L = 2, 11
    x = torch.randn(B, L, 64, dtype=torch.float64)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, :2] = False
    pos = left_padded_positions(kpm)
    pe = rope(rot, x, pos)
    h = layer.input_layernorm(x)
    mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=kpm, **cache_kwargs(None), position_ids=pos)
    _, weights = layer.self_attn(h, attention_mask=mask, position_embeddings=pe)  # eager: [B, H, L, L]
    probs = weights.mean(1)
    spans = torch.tensor([[1, 6], [3, 5]])
    expected = torch.zeros(B, 6, dtype=torch.float64)
    for b in range(B):  # the definition, row by row
        s, n = spans[b].tolist()
        text = [i for i in range(L) if kpm[b, i] and not s <= i < s + n]
        for c in range(n):
            v2v = probs[b, s:s + n, s + c].mean()
            t2v = probs[b, text, s + c].mean()
            expected[b, c] = v2v * t2v
    torch.testing.assert_close(full_rank_scores(layer, h, pe, spans, kpm).double(), expected, rtol=1e-5, atol=1e-9)


def _model():
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    spread_weights(model.model.layers, seed=3, std=0.3)
    return model


def _batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"inputs_embeds": torch.randn(4, 40, 64, generator=gen), "visual_spans": torch.tensor([[4, 24]] * 4)}
            for _ in range(n)]


def test_calibration_lowers_the_held_out_loss():
    model = _model()
    params = {k: p.clone() for k, p in model.named_parameters()}
    start = init_factors(model, 4)
    held_out = _batches(4, seed=100)
    before = selector_loss(model, held_out, start)
    tuned = calibrate(model, _batches(16, seed=1), factors=start, steps=200, lr=1e-2, progress=False)
    after = selector_loss(model, held_out, tuned)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert tuned.meta["source"] == "calibrated" and tuned.u[0].dtype == start.u[0].dtype
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())  # the model stays frozen
    assert not torch.equal(tuned.u[1], start.u[1]) and torch.equal(init_factors(model, 4).u[1], start.u[1])


def test_layer_records_and_model_batches_agree():
    model = _model()
    batches = _batches(2, seed=5)
    records = capture_layer_inputs(model, batches)
    assert torch.equal(records[0]["hidden_states"], batches[0]["inputs_embeds"])
    assert "position_embeddings" in records[0]["layer_kwargs"]
    start = init_factors(model, 4)
    assert selector_loss(model.model.layers, records, start) == selector_loss(model, batches, start)
    a = calibrate(model.model.layers, records, factors=start, steps=3, progress=False)
    b = calibrate(model, batches, factors=start, steps=3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.u + a.v, b.u + b.v))


def test_padded_batches_give_finite_factors():
    """Left-padded rows have fully masked softmax rows: gradients must stay finite."""
    model = _model()
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1, :5] = False
    batch = {"inputs_embeds": torch.randn(2, 20, 64), "attention_mask": kpm.long(),
             "visual_spans": torch.tensor([[2, 10], [7, 10]])}
    tuned = calibrate(model, [batch], steps=5, rank=4, progress=False)
    assert all(torch.isfinite(t).all() for t in tuned.u + tuned.v)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="visual_spans"):
        capture_layer_inputs(model, [{"inputs_embeds": torch.randn(1, 8, 64)}])
    with pytest.raises(ValueError, match="steps must be"):
        calibrate(model, _batches(1, 0), steps=-1)
    with pytest.raises(ValueError, match="lr must be"):
        calibrate(model, _batches(1, 0), lr=0.0)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="factors has 1 layers"):
        calibrate(model, _batches(1, 0), factors=init_factors(model.model.layers[:1], 4))
    with pytest.raises(ValueError, match="need a model to run"):
        calibrate(model.model.layers, _batches(1, 0))
