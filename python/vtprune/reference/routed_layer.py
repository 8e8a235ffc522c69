"""Reference routed decoder layer (docs/ops.md#routed_layer): gather, the layer's own forward, scatter back.

``y = x; y[I] = Layer(x[I])`` where the layer runs on the compact routed sequence ``x[I]`` with the routed
tokens' original RoPE positions (the full sequence's ``(cos, sin)`` gathered at ``I``) and the caller's mask
for the routed sequence. Skipped tokens are not touched; with ``I = arange(L)`` every gather is the identity,
so the result is bit-identical to calling the layer on ``x``.
"""

from __future__ import annotations

import torch

from vtprune._compat import cache_kwargs
from vtprune._routed_fused import gather_position_embeddings


def call_layer(layer, hidden, *, position_embeddings, attention_mask, past_key_values, cache_position,
               layer_kwargs) -> torch.Tensor:
    """``layer(hidden, ...)`` with the routed call's conventions; returns the output hidden states.

    ``position_ids`` is not forwarded: positions are carried by ``position_embeddings``, and non-contiguous
    ids would make FlashAttention-2 read a batch-1 routed sequence as packed sequences.
    """
    kwargs = dict(layer_kwargs, position_ids=None)
    if cache_position is not None:
        kwargs["cache_position"] = cache_position
    out = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                **cache_kwargs(past_key_values), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, **layer_kwargs):
    B, L, D = hidden_states.shape
    idx = routed_idx.to(hidden_states.device)
    rows = idx[:, :, None].expand(B, idx.shape[1], D)
    x = hidden_states.gather(1, rows)  # [B, K, D]
    y = call_layer(layer, x, position_embeddings=gather_position_embeddings(position_embeddings, idx),
                   attention_mask=attention_mask, past_key_values=past_key_values, cache_position=cache_position,
                   layer_kwargs=layer_kwargs)
    return hidden_states.scatter_(1, rows, y.to(hidden_states.dtype))  # in place, like the Triton path
