"""Triton routed decoder layer (docs/ops.md#routed_layer): ``x[I] = Layer(x[I])`` with gather and scatter fused.

The decoder layer is re-run as its documented pre-norm structure (LLaMA / Mistral / Qwen2 / Qwen2.5-VL)::

    n1 = RMSNorm1(x[I])                 gather fused into the norm's read       (_routed_kernels)
    a  = layer.self_attn(n1)            the layer's own attention on [B, K, D] (SDPA / FlashAttention / eager)
    n2 = RMSNorm2(x[I] + a)             residual add and second norm fused; the sum overwrites ``a``
    x[I] = (x[I] + a) + layer.mlp(n2)   residual add fused with the scatter into ``x``   (in place)

The walk is shared with the CUDA backend (:mod:`vtprune._routed_fused`); this module supplies the
Triton row kernels.
"""

from __future__ import annotations

from functools import partial

import torch

from vtprune._host import to_device_i64
from vtprune._routed_fused import fused_routed_layer
from vtprune.triton_kernels._routed_kernels import add_scatter, gather_add_rmsnorm, gather_rmsnorm
from vtprune.triton_kernels._routed_ops import call

# custom ops while torch.compile traces, the launchers directly in eager mode (registered by _routed_ops' import)
_KERNELS = (partial(call, torch.ops.vtprune.routed_gather_rmsnorm, gather_rmsnorm),
            partial(call, torch.ops.vtprune.routed_gather_add_rmsnorm, gather_add_rmsnorm),
            partial(call, torch.ops.vtprune.routed_add_scatter, add_scatter))


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, **layer_kwargs):
    """Triton backend of :func:`vtprune.ops.routed_layer` (arguments checked there)."""
    return fused_routed_layer(layer, hidden_states, to_device_i64(routed_idx, hidden_states.device), _KERNELS,
                              backend="triton", position_embeddings=position_embeddings,
                              attention_mask=attention_mask, past_key_values=past_key_values,
                              cache_position=cache_position, layer_kwargs=layer_kwargs)
