"""Adapter from a per-layer router (ALVTS, :mod:`vtprune.methods.alvts`) to the decoder-layer hook.

The router exposes ``prepare(language_model)``, ``layers_routed(num_layers)`` and
``route(layer_idx, normed_hidden, visual_spans, key_padding_mask) -> routed_idx [B, K]``; the layer itself then
runs through ``vtprune.ops.routed_layer`` (only the routed tokens pass through it, the others skip it
unchanged, positions stay the original ones).

Integration status: prefill without a KV cache is wired (``model(..., use_cache=False)`` and
``generate(..., use_cache=False)``). With a KV cache every routed layer caches a different subset of tokens,
so decoding needs one attention mask per layer (the prefill mask gathered at that layer's routed positions,
plus the decoded columns); that per-layer group is not built yet and a cached prefill is refused with an
error rather than decoding against the wrong mask.
"""

from __future__ import annotations

import importlib

from vtprune.methods.base import LayerCall, Method, Plan


class RoutedMethod(Method):
    name = "alvts"

    def __init__(self, router):
        super().__init__(getattr(router, "backend", "auto"))
        self.router = router
        self.routed: frozenset = frozenset()

    def plan(self, num_layers: int) -> Plan:
        self.routed = frozenset(self.router.layers_routed(num_layers))
        return self._plan(None, (), num_layers)

    def prepare(self, language_model) -> None:
        self.router.prepare(language_model)

    def run_layer(self, call: LayerCall):
        if call.layer_idx not in self.routed or not call.prefill or not bool((call.visual_spans[:, 1] > 0).any()):
            return None
        if call.kwargs.get("past_key_values") is not None:
            raise NotImplementedError(
                "ALVTS with a KV cache is not wired into the decoder loop yet (each layer would cache a different "
                "token subset); run with use_cache=False"
            )
        module = _routed_module()
        normed = call.layer.input_layernorm(call.hidden_states)
        idx = self.router.route(call.layer_idx, normed, call.visual_spans, call.key_padding_mask)
        mask = module.routed_attention_mask(call.layer.self_attn.config, idx, call.key_padding_mask,
                                            layer_idx=call.layer_idx, dtype=call.hidden_states.dtype)
        kw = {k: v for k, v in call.kwargs.items() if k not in ("attention_mask", "position_embeddings")}
        out = module.routed_layer(call.layer, call.hidden_states, idx, position_embeddings=call.kwargs[
            "position_embeddings"], attention_mask=mask, backend=self.backend, **kw)
        call.visual_tokens = idx.shape[1] - (int(call.key_padding_mask[0].sum()) - int(call.visual_spans[0, 1]))
        return out

    def _describe(self):
        return repr(self.router)


def _routed_module():
    try:
        return importlib.import_module("vtprune.ops.routed_layer")
    except ModuleNotFoundError as e:
        raise NotImplementedError("ALVTS needs vtprune.ops.routed_layer, which is not in this build yet") from e
