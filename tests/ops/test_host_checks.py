"""The host-side checks of the public ops read CPU index tensors once and remember what they read: the
remembered values must never outlive the tensor's contents, and inference tensors must work too."""

import pytest
import torch

from vtprune import _host, ops


def _qk():
    return torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)


def test_in_place_change_of_spans_is_seen():
    q, k = _qk()
    spans = torch.tensor([[0, 4], [1, 3]])
    assert ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True).shape == (2, 4)
    spans[1, 1] = 9  # now past L = 8: the remembered summary must not be reused
    with pytest.raises(ValueError, match="key_spans|query_spans"):
        ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True)
    spans[1, 1] = 6  # a wider valid span widens the output
    assert ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True).shape == (2, 6)


def test_inference_tensors_are_read_every_call():
    q, k = _qk()
    with torch.inference_mode():
        spans = torch.tensor([[0, 4], [1, 3]])
        assert ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True).shape == (2, 4)
        spans[0, 1] = 5  # inference tensors carry no version counter: nothing may be cached for them
        assert ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True).shape == (2, 5)
        lengths = torch.tensor([3, 5])
        with pytest.raises(ValueError, match=r"lengths: every length must lie in \[4, 5\]"):
            ops.topk_keep_order(torch.randn(2, 5), 4, lengths=lengths)


def test_in_place_change_of_keep_idx_is_seen():
    x = torch.randn(2, 6, 4)
    keep = torch.tensor([[0, 2], [1, 3]])
    assert ops.contextual_merge(x, x, keep, 1).shape == (2, 3, 4)
    keep[0, 1] = 0  # no longer ascending
    with pytest.raises(ValueError, match="keep_idx must be strictly ascending"):
        ops.contextual_merge(x, x, keep, 1)


def test_keep_idx_is_bounded_per_row_by_its_length():
    x = torch.randn(2, 6, 4)
    keep = torch.tensor([[0, 4], [0, 4]])
    assert ops.contextual_merge(x, x, keep, 0, lengths=torch.tensor([6, 5])).shape == (2, 2, 4)
    with pytest.raises(ValueError, match="keep_idx must be strictly ascending"):
        ops.contextual_merge(x, x, keep, 0, lengths=torch.tensor([6, 4]))  # row 1 keeps position 4 of 4


def test_summaries():
    assert _host.spans_summary(torch.tensor([[2, 3], [0, 5]])) == (0, 3, 5, 5)
    assert _host.values_summary(torch.tensor([4, 2, 7])) == (2, 7, (4, 2, 7))
    assert _host.rows_summary(torch.tensor([[0, 2, 5], [1, 3, 4]])) == (True, 0, (5, 4))
    assert _host.rows_summary(torch.tensor([[0, 2, 5], [1, 1, 4]]))[0] is False
    assert _host.host_max(torch.tensor([[2, 3], [0, 5]])) == 5
    assert _host.host_max(torch.tensor([3, 1])) == 3


def test_shape_checks_remembered_per_signature_still_see_every_value():
    """A call whose tensors' shapes passed before skips only the shape checks: values and scalars are checked."""
    x = torch.randn(2, 6, 4)
    keep = torch.tensor([[0, 2], [1, 3]])
    assert ops.contextual_merge(x, x, keep, 1).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="num_contextual must be an int"):
        ops.contextual_merge(x, x, keep, True)  # True == 1 and hashes alike: the signature tells them apart
    with pytest.raises(ValueError, match="exceeds the tokens available"):
        ops.contextual_merge(x, x, keep, 5)
    with pytest.raises(ValueError, match="keep_idx must be strictly ascending"):
        ops.contextual_merge(x, x, torch.tensor([[2, 0], [1, 3]]), 1)  # same signature, other values
    q, k = _qk()
    spans = torch.tensor([[0, 4], [1, 3]])
    ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True)
    with pytest.raises(ValueError, match="scale must be"):
        ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True, scale=-1.0)
    with pytest.raises(ValueError, match="causal must be a bool"):
        ops.attention_scores(q, k, query_spans=spans, key_spans=spans, causal="yes")
    with pytest.raises(ValueError, match="key_spans: every span"):
        ops.attention_scores(q, k, query_spans=spans, key_spans=torch.tensor([[0, 4], [5, 4]]), causal=True)


def test_fused_routed_layer_rechecks_a_replaced_norm():
    """The fused walk remembers a checked layer by identity: a norm weight replaced later is checked again."""
    pytest.importorskip("triton.language", reason="Triton is not installed")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=8)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    h = torch.randn(1, 6, 16)
    pe = LlamaRotaryEmbedding(cfg)(h, torch.arange(6)[None])
    idx = torch.tensor([[0, 2, 5]])
    with torch.no_grad():
        ops.routed_layer(layer, h.clone(), idx, position_embeddings=pe, backend="triton")
        layer.post_attention_layernorm.weight = torch.nn.Parameter(torch.ones(16, dtype=torch.float64))
        with pytest.raises(ValueError, match="post_attention_layernorm.weight must have hidden_states' dtype"):
            ops.routed_layer(layer, h.clone(), idx, position_embeddings=pe, backend="triton")
