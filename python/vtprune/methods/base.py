"""What every method is: an optional vision-encoder stage, LLM stages, and an optional per-layer hook.

A method object is a plain description; :func:`vtprune.apply` binds it to a model (``plan``) and the model
family's patch runs it. Methods that replace whole layer calls (ALVTS routes a subset of tokens through
each layer) implement :meth:`Method.run_layer`; the decoder patch calls it for every layer call, prefill
and decode (``LayerCall.prefill`` tells which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune._backend import BACKENDS
from vtprune.methods.schedule import EncoderStage, Stage, check_stages


@dataclass(frozen=True)
class Plan:
    """A method bound to a language model depth: what the model patch executes."""

    encoder: EncoderStage | None
    stages: tuple[Stage, ...]
    backend: str
    method: Method = field(compare=False)


@dataclass
class LayerCall:
    """Everything a per-layer hook may need about one decoder-layer call (prefill or decode).

    ``call(hidden_states, **kwargs)`` runs the layer as the unpatched model would; ``kwargs`` already hold the
    attention mask, position embeddings and cache for this layer's group. ``visual_spans`` is int64 [B, 2]
    ``(start, count)`` of the image tokens (count 0 for a row without an image); ``key_padding_mask`` is
    bool [B, L], True for a real token.

    A method object may serve several models and threads at once, so a hook keeps nothing on ``self`` between
    calls: what it caches for the rest of a forward call goes in ``scratch``, what decoding needs from the prefill
    in ``state`` (both belong to this model's call).
    """

    layer_idx: int
    layer: torch.nn.Module
    call: object
    hidden_states: torch.Tensor
    kwargs: dict
    visual_spans: torch.Tensor
    key_padding_mask: torch.Tensor
    prefill: bool
    visual_tokens: torch.Tensor | None = None  # set by a hook that processes fewer visual tokens: [B], for stats
    num_layers: int = 0  # decoder layers of the model
    scratch: dict = field(default_factory=dict)  # per forward call, shared by its layers (one model, one call)
    state: dict = field(default_factory=dict)  # per prefill, kept with its KV cache for the decode calls after it


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`plan`."""

    name = "method"

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def plan(self, num_layers: int) -> Plan:
        raise NotImplementedError

    def _plan(self, encoder, stages, num_layers) -> Plan:
        stages = tuple(stages)
        check_stages(stages, num_layers, type(self).__name__)
        return Plan(encoder=encoder, stages=stages, backend=self.backend, method=self)

    def prepare(self, language_model, vlm=None) -> None:
        """Called once by :func:`vtprune.apply` with the language model and the whole model ``vlm`` (e.g. to build
        low-rank factors, calibrated on image batches run through ``vlm``)."""

    def run_layer(self, call: LayerCall):
        """Replace one decoder-layer call; return its output, or ``None`` to run the layer unchanged."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return f"backend={self.backend!r}"
