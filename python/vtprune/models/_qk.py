"""Post-RoPE queries and keys of a decoder layer, recomputed from its input, per decoder type.

A decoder hook scores image tokens with a layer's attention (``PruneContext.qk``): the layer's input norm, its
q/k projections, per-head q/k norms where the decoder has them (Qwen3, ...), then RoPE at the current
positions — what the layer's own attention computes before the softmax (the official scoring of the
token-pruning papers). One helper serves LLaMA / Mistral / Qwen2-style layers and the decoders with q/k norms.
"""

from __future__ import annotations

import sys

import torch


def decoder_qk(layer, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(q [B, H, L, d], k [B, Hkv, L, d], scale)`` of decoder ``layer`` on its input ``hidden`` [B, L, D].

    ``layer.self_attn`` has ``q_proj``, ``k_proj``, ``head_dim``, ``scaling`` and optionally ``q_norm`` /
    ``k_norm`` (applied per head before RoPE, as Qwen3 does); RoPE is the attention module's own
    ``apply_rotary_pos_emb``.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    B, L, _ = h.shape
    q = attn.q_proj(h).view(B, L, -1, attn.head_dim)  # [B, L, H, d]
    k = attn.k_proj(h).view(B, L, -1, attn.head_dim)  # [B, L, Hkv, d]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin)
    return q, k, float(attn.scaling)


llama_qk = decoder_qk  # LLaMA / Mistral / Qwen2: no q/k norms
