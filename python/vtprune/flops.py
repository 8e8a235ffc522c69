"""Theoretical prefill FLOPs of a LLaMA/Qwen2-style decoder from its config and per-layer token counts.

Per decoder layer that runs on ``n`` tokens (one multiply-add = 2 FLOPs)::

    projections  2·n·D·(H·dh)          q
               + 2·2·n·D·(Hkv·dh)      k and v (grouped-query attention shrinks these)
               + 2·n·(H·dh)·D          o
    attention    2·n²·H·dh + 2·n²·H·dh   Q·Kᵀ and A·V over the full n×n square
    gated MLP    3 · 2·n·D·I           gate, up and down projections

with hidden size ``D``, ``H`` query heads, ``Hkv`` key/value heads, head size ``dh`` and MLP width ``I``.
The attention term counts the full square, not the causal half: that is the convention of FastV,
PyramidDrop and VisionDrop, so our figures compare with theirs (e.g. LLaVA-1.5-7B at ~680 tokens gives the
9.06 TFLOPs VisionDrop reports). Norms, RoPE, softmax and biases are left out (lower order). The LM head
(``2·n·D·V``) is added only with ``include_lm_head=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a transformers config (a VLM config's text config is used) or a plain dict."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            intermediate, layers = int(get("intermediate_size")), int(get("num_hidden_layers"))
        except TypeError as e:
            raise ValueError(
                "config must define hidden_size, num_attention_heads, intermediate_size and num_hidden_layers"
            ) from e
        head_dim = get("head_dim", None) or hidden // heads
        return cls(hidden, intermediate, heads, int(get("num_key_value_heads", None) or heads), int(head_dim),
                   layers, int(get("vocab_size", 0) or 0))


def layer_flops(shape: DecoderShape, n: int) -> int:
    """FLOPs of one decoder layer on ``n`` tokens (formula in the module docstring)."""
    D, I, H, Hkv, dh = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    proj = 2 * n * D * H * dh + 2 * 2 * n * D * Hkv * dh + 2 * n * H * dh * D
    attn = 4 * n * n * H * dh
    mlp = 3 * 2 * n * D * I
    return proj + attn + mlp


def prefill_flops(config, tokens_per_layer: int | Sequence[int], *, include_lm_head: bool = False) -> int:
    """Prefill FLOPs of the decoder stack.

    Parameters
    ----------
    config : transformers config or dict  (LLaMA/Qwen2-style; a VLM config uses its text config)
    tokens_per_layer : int or sequence of int  total tokens (text + visual) each layer runs on; an int means
        the same count in every layer
    include_lm_head : bool  add ``2·n·D·V`` for the logits of the last layer's ``n`` tokens

    Example
    -------
    >>> cfg = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32)
    >>> round(prefill_flops(cfg, 680) / 1e12, 2)
    9.05
    """
    shape = DecoderShape.from_config(config)
    counts = [tokens_per_layer] * shape.layers if isinstance(tokens_per_layer, int) else list(tokens_per_layer)
    if len(counts) != shape.layers:
        raise ValueError(f"tokens_per_layer must have one count per layer ({shape.layers}), got {len(counts)}")
    if any((not isinstance(n, int)) or n < 0 for n in counts):
        raise ValueError(f"tokens_per_layer must hold non-negative ints, got {counts}")
    total = sum(layer_flops(shape, n) for n in counts)
    if include_lm_head:
        total += 2 * counts[-1] * shape.hidden * shape.vocab
    return total
