"""Differences between the ``transformers`` and Triton releases vtprune supports, in one place.

Supported: transformers 5.17 up to the cap in ``pyproject.toml``, Triton 3.6 to 3.9. Each shim names the
release that needs it. Code elsewhere calls these helpers instead of testing attributes itself, so that a
new release is one edit here (and a line in the CI report that found it).
"""

from __future__ import annotations

import dataclasses

import torch


def with_image_features(out, features: torch.Tensor):
    """A copy of a multimodal model output that carries the projected image ``features`` [N, D].

    transformers 5.24 turned ``image_hidden_states`` into a read-only property over a new field
    ``image_outputs`` (a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the features);
    5.17-5.23 have ``image_hidden_states`` as a field. The copy goes through the dataclass constructor
    (``dataclasses.replace``), never through attribute assignment, which a release may forbid.
    """
    fields = {f.name for f in dataclasses.fields(out)}
    if "image_outputs" in fields:  # transformers >= 5.24
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return dataclasses.replace(out, image_outputs=BaseModelOutputWithPooling(pooler_output=features))
    if "image_hidden_states" in fields:  # transformers 5.17 - 5.23
        return dataclasses.replace(out, image_hidden_states=features)
    return out


def vision_encoder_layers(tower):
    """The encoder layers of a CLIP vision tower: releases before 5.x nested them under ``vision_model``."""
    return getattr(tower, "vision_model", tower).encoder.layers


def _cache_keyword() -> str:
    """The keyword under which transformers passes a KV cache to models, layers and mask builders.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is accepted with a deprecation
    warning until 5.40); 5.17 - 5.23 take ``past_key_values``. Read once from ``create_causal_mask``'s signature.
    """
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


CACHE_KW = _cache_keyword()


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for calling a transformers model, layer or mask builder of the installed release."""
    return {CACHE_KW: cache}


def cache_from(kwargs: dict):
    """The KV cache among a call's keyword arguments, under either name (a caller may still use the old one)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def output_cache(out):
    """The KV cache a model output carries (``cache`` from 5.24, ``past_key_values`` before)."""
    fields = {f.name for f in dataclasses.fields(out)}
    return getattr(out, "cache" if "cache" in fields else "past_key_values", None)
