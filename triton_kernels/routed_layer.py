"""Triton routed decoder layer (DESIGN §3.5): ``x[I] = Layer(x[I])`` with gather and scatter fused.

The decoder layer is re-run as its documented pre-norm structure (LLaMA / Mistral / Qwen2 / Qwen2.5-VL)::

    n1 = RMSNorm1(x[I])                 gather fused into the norm's read       (_routed_kernels)
    a  = layer.self_attn(n1)            the layer's own attention on [B, K, D] (SDPA / FlashAttention / eager)
    n2 = RMSNorm2(x[I] + a)             residual add and second norm fused; the sum overwrites ``a``
    x[I] = (x[I] + a) + layer.mlp(n2)   residual add fused with the scatter into ``x``   (in place)

Only ``[B, K, D]`` intermediates are allocated; ``x`` is updated in place, so skipped rows are never read or
written. The layer's own forward (and hooks registered on the decoder-layer module itself) is not called:
that is why only layer classes whose forward is exactly this structure are accepted.
"""

from __future__ import annotations

import torch

from vtprune.reference.routed_layer import gather_position_embeddings
from vtprune.triton_kernels._routed_kernels import add_scatter, gather_add_rmsnorm, gather_rmsnorm
from vtprune.triton_kernels._routed_ops import call

# Decoder layers whose forward is exactly norm -> self_attn -> residual -> norm -> mlp -> residual (checked
# against transformers 5.17-5.23). Others (Gemma's sandwich norms, (1 + w) norms, ...) would be silently
# wrong if re-implemented this way, so they are refused.
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2_5_VLDecoderLayer")


def _rmsnorm_params(layer, name: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    norm = getattr(layer, name, None)
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    D = x.shape[-1]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (D,) or not isinstance(eps, (int, float)):
        raise ValueError(
            f"backend='triton' for routed_layer: layer.{name} must be an RMSNorm with weight [D = {D}] and "
            f"variance_epsilon (LLaMA/Qwen2 style), got {type(norm).__name__}; use backend='reference'"
        )
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(
            f"backend='triton' for routed_layer: layer.{name}.weight must have hidden_states' dtype and device "
            f"({x.dtype}, {x.device}), got ({w.dtype}, {w.device})"
        )
    return w.contiguous(), float(eps)


def check_layer(layer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """Norm parameters ``(w1, eps1, w2, eps2)`` of a supported layer; ValueError otherwise."""
    if type(layer).__name__ not in SUPPORTED_LAYERS:
        raise ValueError(
            f"backend='triton' for routed_layer re-implements the decoder layer's forward and supports "
            f"{', '.join(SUPPORTED_LAYERS)}; got {type(layer).__name__} (use backend='reference')"
        )
    if hidden_states.stride(-1) != 1:
        raise ValueError(f"hidden_states must have unit stride on D (it is updated in place), "
                         f"got strides {hidden_states.stride()}")
    return (*_rmsnorm_params(layer, "input_layernorm", hidden_states),
            *_rmsnorm_params(layer, "post_attention_layernorm", hidden_states))


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, **layer_kwargs):
    """Triton backend of :func:`vtprune.ops.routed_layer` (arguments checked there)."""
    w1, eps1, w2, eps2 = check_layer(layer, hidden_states)
    x = hidden_states  # [B, L, D], updated in place
    idx = routed_idx.to(x.device).contiguous()  # [B, K]
    ops = torch.ops.vtprune
    normed = call(ops.routed_gather_rmsnorm, gather_rmsnorm, x, idx, w1, eps1)  # [B, K, D]
    kwargs = dict(layer_kwargs, position_ids=None)  # positions travel in the gathered (cos, sin)
    if cache_position is not None:
        kwargs["cache_position"] = cache_position
    attn = layer.self_attn(hidden_states=normed, attention_mask=attention_mask,
                           position_embeddings=gather_position_embeddings(position_embeddings, idx),
                           past_key_values=past_key_values, **kwargs)[0].contiguous()  # [B, K, D]
    del normed
    normed = call(ops.routed_gather_add_rmsnorm, gather_add_rmsnorm, x, idx, attn, w2, eps2)  # attn := mid
    mlp = layer.mlp(normed).contiguous()  # [B, K, D]
    call(ops.routed_add_scatter, add_scatter, x, idx, attn, mlp)
    return x
