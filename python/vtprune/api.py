"""``vtprune.apply``: patch one model instance with a token-reduction method, and undo it.

Nothing global changes: only bound ``forward`` attributes of this instance's submodules are replaced, and
:meth:`Handle.remove` deletes them again, so the model is bit-for-bit the unpatched one afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.flops import prefill_flops
from vtprune.methods.base import Method
from vtprune.models._restore import Restorer

SUPPORTED = {
    "LlavaForConditionalGeneration": "vtprune.models.llava:LlavaPatch",
    "LlavaNextForConditionalGeneration": "vtprune.models.llava_next:LlavaNextPatch",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.models.qwen2_5_vl:Qwen2_5_VLPatch",
}
_ATTR = "_vtprune_handle"


@dataclass
class Stats:
    """Of the last prefill (a forward with images). Counts are for batch row 0.

    visual_tokens_per_layer : list[int]  visual tokens each decoder layer ran on
    average_visual_tokens : float  their mean (the "average tokens" budget convention)
    tokens_per_layer : list[int]  all real tokens (text + visual) each layer ran on
    flops, flops_unpruned : int  theoretical decoder prefill FLOPs (:func:`vtprune.flops.prefill_flops`) with
        and without pruning
    selections : list[dict]  per stage: original patch indices kept ("kept", -1 is [CLS]) and the contextual
        targets ("contextual"), for retention maps
    """

    visual_tokens_per_layer: list
    average_visual_tokens: float
    tokens_per_layer: list
    flops: int
    flops_unpruned: int
    selections: list

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unpruned if self.flops_unpruned else 1.0


class Handle:
    """Returned by :func:`apply`. ``remove()`` (or leaving a ``with`` block) restores the original model."""

    def __init__(self, model, method, patch, restorer):
        self.model, self.method = model, method
        self._patch, self._restorer = patch, restorer

    @property
    def active(self) -> bool:
        return self._patch is not None

    @property
    def stats(self) -> Stats | None:
        """Statistics of the last prefill, or None before the first one."""
        if self._patch is None or self._patch.last_call is None:
            return None
        call = self._patch.last_call
        cfg = self.model.config
        visual = list(call.visual_per_layer)
        tokens = list(call.tokens_per_layer)
        unpruned = tokens[0] + int(call.original_visual[0]) - visual[0] if tokens else 0
        return Stats(
            visual_tokens_per_layer=visual,
            average_visual_tokens=sum(visual) / len(visual) if visual else 0.0,
            tokens_per_layer=tokens,
            flops=prefill_flops(cfg, tokens),
            flops_unpruned=prefill_flops(cfg, unpruned),
            selections=list(call.selections),
        )

    def remove(self) -> None:
        if self._patch is None:
            return
        self._restorer.restore()
        self.model.__dict__.pop(_ATTR, None)
        self._patch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        return f"Handle({type(self.model).__name__}, {self.method!r}, active={self.active})"


def _family(model):
    import importlib

    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"vtprune.apply: unsupported model class {name}; supported: {', '.join(SUPPORTED)}")
    module, cls = SUPPORTED[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _as_method(method):
    if isinstance(method, Method):
        return method
    # ALVTS from vtprune.methods.alvts exposes prepare/route/layers_routed; adapt it to the layer hook
    if all(hasattr(method, a) for a in ("prepare", "route", "layers_routed")):
        from vtprune.methods.routing import RoutedMethod

        return RoutedMethod(method)
    raise TypeError(f"vtprune.apply: method must be a vtprune method object (VisionDrop(), FastV(), ...), "
                    f"got {type(method).__name__}")


def apply(model, method) -> Handle:
    """Patch ``model`` (this instance only) to run ``method``; returns a :class:`Handle`.

    Parameters
    ----------
    model : a supported ``transformers`` model instance (``LlavaForConditionalGeneration``,
        ``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``)
    method : VisionDrop, FastV, VisionZip, PyramidDrop, UniformPool or ALVTS instance

    Example
    -------
    >>> with vtprune.apply(model, vtprune.VisionDrop(tokens=64)) as handle:   # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=32)
    ...     print(handle.stats.average_visual_tokens)
    """
    family = _family(model)
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError(f"vtprune.apply: this {type(model).__name__} is already patched "
                           f"({model.__dict__[_ATTR].method!r}); call handle.remove() first")
    method = _as_method(method)
    text_config = model.config.get_text_config()
    plan = method.plan(text_config.num_hidden_layers)
    restorer = Restorer()
    try:
        method.prepare(model.model.language_model, vlm=model)
        patch = family(model, plan, restorer)
    except BaseException:
        restorer.restore()
        raise
    handle = Handle(model, method, patch, restorer)
    model.__dict__[_ATTR] = handle
    return handle
