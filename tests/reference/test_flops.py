"""vtprune.flops against hand-computed values."""

import pytest
from transformers import LlamaConfig

from vtprune.flops import DecoderShape, layer_flops, prefill_flops

TINY = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
            num_hidden_layers=2, vocab_size=10)


def test_tiny_by_hand():
    # n = 3, D = 8, I = 16, H = 2, Hkv = 1, dh = 4:
    # q 2*3*8*8 = 384, k+v 2*2*3*8*4 = 384, o 2*3*8*8 = 384, attention 4*9*2*4 = 288, MLP 6*3*8*16 = 2304
    assert layer_flops(DecoderShape.from_config(TINY), 3) == 3744
    # layer 0 on 3 tokens, layer 1 on 1 token: q 128 + kv 128 + o 128 + attn 32 + mlp 768 = 1184
    assert prefill_flops(TINY, [3, 1]) == 3744 + 1184
    assert prefill_flops(TINY, [3, 1], include_lm_head=True) == 3744 + 1184 + 2 * 1 * 8 * 10


def test_llava_7b_matches_the_published_figure():
    """VisionDrop reports 9.06 TFLOPs for LLaVA-1.5-7B at 576 image tokens (+ ~100 text tokens)."""
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
    assert prefill_flops(cfg, 680) / 1e12 == pytest.approx(9.06, rel=0.01)


def test_errors():
    with pytest.raises(ValueError, match="one count per layer"):
        prefill_flops(TINY, [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative ints"):
        prefill_flops(TINY, [1, -2])
    with pytest.raises(ValueError, match="config must define"):
        prefill_flops(dict(hidden_size=4), 3)
