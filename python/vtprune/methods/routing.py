"""The layer hook of ALVTS (:mod:`vtprune.methods.alvts`): a per-layer selection whose skipped tokens pass through.

The router (an :class:`~vtprune.methods.alvts.ALVTS`) gives ``layers_routed(num_layers) -> list[bool]``,
``visual_budget(counts)`` and ``forward_layer(...)`` (input norm, selector, top-k, routed mask and
:func:`vtprune.ops.routed_layer` in one call): only the routed tokens (all text + the top-k image tokens) pass
through a routed layer, the others skip it unchanged, every token keeps its original position.

**Prefill** (a forward with an image). Each routed layer routes its own tokens. With a KV cache the layer caches
only its K routed tokens, so each layer keeps the key padding mask of what it cached (False for padding and for
the fill tokens of a batch whose rows need different numbers of routed tokens; None when every cached token is
a key, known on the host), per cache object.

**Decoding** (a call that continues such a cache). New tokens are text, and text is always routed: every new
token runs through every layer. A routed layer attends to its own cache, so it gets its own attention mask:
its cached tokens' padding, then the new tokens' columns (appended to the layer's record after the call).
Where neither the layer's cache nor the new tokens hold padding the mask is the plain causal one, built without
a device read (one read per call checks the new tokens' columns, none per layer). Positions are the unpruned
model's (ALVTS keeps original positions; the decoder patch continues them from the full prompt length). Layers
before ``first_layer`` run unchanged on the full cache.

Routing layer 0 with a KV cache is refused: ``transformers`` (``generate``, the mask builders) and the decoder
patch read the sequence length from layer 0's cache, which must therefore hold every token.

Statistics: per layer and batch row, the image tokens routed through the layer: the sum of the row's units' ``k``
(fill tokens, which leave the layer unchanged, do not count; see :class:`vtprune.methods.alvts.ALVTS`), computed on
the host.

Nothing of a call is kept on the router (which may serve several models and threads): the
prefill's per-layer cache records go in the call's ``state`` (kept with its KV cache by the decoder patch), what
one forward computes once for all its layers in the call's ``scratch``.
"""

from __future__ import annotations

import copy

import torch

from vtprune._compat import cache_from
from vtprune.methods.base import LayerCall
from vtprune.ops.routed_layer import routed_attention_mask

# arguments of the decoder-layer call that the routed call replaces or takes by name
_OWN = ("attention_mask", "position_embeddings", "past_key_values", "cache")


def run_routed_layer(router, call: LayerCall):
    """The layer hook of a per-layer router (:meth:`vtprune.methods.alvts.ALVTS.run_layer`): route a routed
    layer's prefill call, run its decode calls against its own cache; ``None`` (run the layer unchanged) for a
    layer the router does not route."""
    if not router.layers_routed(call.num_layers)[call.layer_idx]:
        return None
    cache = cache_from(call.kwargs)
    if not call.prefill:
        return _decode(call, cache)
    # {layer index: (P, key padding mask [B, P] of the tokens that layer cached, or None: all keys)}
    records = call.state.setdefault("alvts_cached", {})
    if not bool((call.visual_spans[..., 1] > 0).any()):
        return None  # no image in the batch: nothing to route, the layer runs (and caches) in full
    if cache is not None and call.layer_idx == 0:
        raise ValueError(
            f"{router!r}: routing decoder layer 0 with a KV cache is not supported (transformers' generate "
            "and mask code read the sequence length from layer 0's cache); use first_layer >= 1 (the default) "
            "or use_cache=False"
        )
    kw = {k: v for k, v in call.kwargs.items() if k not in _OWN}
    hidden, idx, routed_kpm = router.forward_layer(
        call.layer_idx, _unhooked(call.layer, call.call), call.hidden_states, visual_spans=call.visual_spans,
        key_padding_mask=call.key_padding_mask, position_embeddings=call.kwargs["position_embeddings"],
        config=call.layer.self_attn.config, past_key_values=cache, scratch=call.scratch, **kw)
    if cache is not None:
        records[call.layer_idx] = (idx.shape[1], routed_kpm)
    call.visual_tokens = _visual_k(router, call.visual_spans, call.scratch)
    return hidden


def _decode(call: LayerCall, cache):
    """One decoding call at a routed layer: every new token runs, against this layer's own cache."""
    records = call.state.get("alvts_cached")
    record = None if records is None or cache is None else records.get(call.layer_idx)
    if record is None:  # the prefill did not route (no image): the layer cached everything
        return None
    i = call.layer_idx
    B, q = call.hidden_states.shape[:2]
    cached = int(cache.get_seq_length(i))
    length, past = record
    if length != cached:
        raise RuntimeError(f"vtprune ALVTS: layer {i} cached {cached} tokens but its record covers "
                           f"{length}; the cache was changed outside the patched model (cropped, reordered, "
                           "reused?)")
    # Once per decoding call, not per routed layer: every routed layer caches the same number of tokens, so
    # the layers whose cached keys hold no padding share one mask. The entry holds the tensors it was built
    # from and is used only for those very objects (a layer with routed padding has its own ``past``).
    masks = call.scratch.setdefault("alvts_decode_masks", {})
    hit = masks.get((cached, q, call.hidden_states.dtype))
    if hit is not None and hit[0] is past and hit[1] is call.key_padding_mask:
        kpm, mask = hit[2], hit[3]
    else:
        kpm = None  # [B, cached + q], None: every key is real (the plain causal mask, no device read)
        new_cols = call.key_padding_mask[:, -q:]
        if past is not None or _new_columns_padded(call.key_padding_mask, q, call.scratch):
            ones = torch.ones(B, cached, dtype=torch.bool, device=new_cols.device) if past is None else past
            kpm = torch.cat([ones, new_cols.to(ones.device)], 1)
        new = torch.arange(q, device=call.hidden_states.device).expand(B, q)
        mask = routed_attention_mask(call.layer.self_attn.config, new, kpm, cache, layer_idx=i,
                                     dtype=call.hidden_states.dtype, materialize=kpm is not None)
        masks[(cached, q, call.hidden_states.dtype)] = (past, call.key_padding_mask, kpm, mask)
    out = call.call(call.hidden_states, **dict(call.kwargs, attention_mask=mask))
    records[i] = (cached + q, kpm)
    return out


def _visual_k(router, spans, scratch: dict) -> torch.Tensor:
    """Image tokens each row routes through a routed layer: the sum of its units' ``k`` [B] on the CPU (fill tokens
    do not count); once per forward. ``spans``: [B, S, 2] (or [B, 2], one unit per row)."""
    seen = scratch.get("alvts_k")
    if seen is None or seen[0] is not spans:
        seen = scratch["alvts_k"] = (spans, router.unit_budgets(spans.cpu()).sum(1))
    return seen[1]


def _new_columns_padded(key_padding_mask, q: int, scratch: dict) -> bool:
    """Whether the new tokens' columns hold padding: one host read per decoding call (the patch passes the
    same mask tensor to every layer of a call)."""
    if scratch.get("new_columns_real"):  # the decoder patch already knows: no read
        return False
    seen = scratch.get("alvts_new_cols")
    if seen is None or seen[0] is not key_padding_mask or seen[1] != q:
        seen = scratch["alvts_new_cols"] = (key_padding_mask, q, not bool(key_padding_mask[:, -q:].all()))
    return seen[2]


def _unhooked(layer: torch.nn.Module, forward) -> torch.nn.Module:
    """A view of ``layer`` (same class, same submodules and parameters) whose ``__call__`` runs ``forward`` without
    the layer's own module hooks. The routed call runs the layer on the compact routed sequence; the hooks (e.g.
    transformers' ``output_hidden_states`` capture) fire once, on the wrapped call with the full sequence."""
    view = copy.copy(layer)
    for name, value in vars(layer).items():
        if "hooks" in name and isinstance(value, dict):
            view.__dict__[name] = type(value)()
    view.__dict__["forward"] = forward
    return view
