"""``vtprune.apply``: patch one model instance with a token-reduction method, and undo it.

Nothing global changes: only attributes of this instance and its submodules are set (the bound ``forward``
methods, and the instance's ``__deepcopy__`` / ``__reduce_ex__`` so that copies get their own patch and
pickling is refused clearly), and :meth:`Handle.remove` deletes them again, so the model is bit-for-bit the
unpatched one afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.flops import prefill_flops
from vtprune.methods.base import Method
from vtprune.models import FAMILIES
from vtprune.models._restore import Restorer

_ATTR = "_vtprune_handle"


@dataclass
class Stats:
    """Of the last prefill (a forward with images). The unsuffixed counts, FLOPs and selections are for batch row 0;
    the ``_per_row`` lists hold every row's.

    visual_tokens_per_layer : list[int]  visual tokens each decoder layer ran on
    average_visual_tokens : float  their mean (the "average tokens" budget convention)
    tokens_per_layer : list[int]  all real tokens (text + visual) each layer ran on
    flops, flops_unpruned : int  theoretical decoder prefill FLOPs (:func:`vtprune.flops.prefill_flops`) with
        and without pruning
    selections : list[dict]  per stage: original patch indices kept ("kept", -1 is [CLS]) and the contextual
        targets ("contextual"), for retention maps
    visual_tokens_per_row, tokens_per_row : list[list[int]]  [B][layers], the two per-layer counts of every row
    unit_stages : list[str]  the stages of the per-unit counts: "unpruned" (placeholders), "encoder" (after the
        encoder hook, when the method has one), "after layer N" (each decoder hook)
    unit_tokens : list[list[int]]  [units][stages], tokens each image unit of row 0 (an image; a video's frame
        group, in prompt order) holds at each stage of ``unit_stages``
    unit_tokens_per_row : list[list[list[int]]]  [B][units][stages], the same for every row
    capped : list[dict]  the units an int budget larger than themselves kept whole (dynamic resolutions): one
        ``{"row", "unit", "stage", "tokens"}`` per unit and stage
    """

    visual_tokens_per_layer: list
    average_visual_tokens: float
    tokens_per_layer: list
    flops: int
    flops_unpruned: int
    selections: list
    visual_tokens_per_row: list
    tokens_per_row: list
    unit_stages: list = None
    unit_tokens: list = None
    unit_tokens_per_row: list = None
    capped: list = None

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unpruned if self.flops_unpruned else 1.0


class Handle:
    """Returned by :func:`apply`. ``remove()`` (or leaving a ``with`` block) restores the original model."""

    def __init__(self, model, method, patch, restorer):
        self.model, self.method = model, method
        self._patch, self._restorer = patch, restorer
        self._last_call = None  # the last prefill's call, kept after remove()
        self._stats = (None, None)  # (call, its Stats): read from the device once

    @property
    def active(self) -> bool:
        return self._patch is not None

    @property
    def stats(self) -> Stats | None:
        """Statistics of the last prefill (also after :meth:`remove`), or None before the first one. The counts are
        kept on the device while the model runs and read here, once per prefill."""
        call = self._patch.last_call if self._patch is not None else self._last_call
        if call is None:
            return None
        if self._stats[0] is not call:
            self._stats = (call, _stats(self.model.config, call))
        return self._stats[1]

    def remove(self) -> None:
        if self._patch is None:
            return
        self._last_call = self._patch.last_call
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


def _stats(cfg, call) -> Stats:
    import torch

    from vtprune.models._decoder import resolve_selections

    if not call.visual_per_layer:
        visual = tokens = torch.zeros(0, len(call.original_visual), dtype=torch.int64)
    else:
        visual = torch.stack([v.long() for v in call.visual_per_layer])  # [layers, B]
        span = torch.stack([v.long() for v in call.span_per_layer])
        tokens = torch.stack(call.real_per_layer).long().cpu() - span + visual  # the one host read
    visual0, tokens0 = visual[:, 0].tolist(), tokens[:, 0].tolist()
    unpruned = tokens0[0] + int(call.original_visual[0]) - visual0[0] if tokens0 else 0
    stages = [name for name, _ in call.unit_counts]
    per_row = []
    if call.unit_counts:
        table = torch.stack([counts for _, counts in call.unit_counts], -1)  # [B, S, stages] on the host
        units = (call.unit_original > 0).sum(1).tolist()  # units of each row
        per_row = [table[b, :n].tolist() for b, n in enumerate(units)]
    return Stats(
        unit_stages=stages,
        unit_tokens=per_row[0] if per_row else [],
        unit_tokens_per_row=per_row,
        capped=list(call.capped),
        visual_tokens_per_layer=visual0,
        average_visual_tokens=sum(visual0) / len(visual0) if visual0 else 0.0,
        tokens_per_layer=tokens0,
        flops=prefill_flops(cfg, tokens0),
        flops_unpruned=prefill_flops(cfg, unpruned),
        selections=resolve_selections(call),
        visual_tokens_per_row=visual.T.tolist(),
        tokens_per_row=tokens.T.tolist(),
    )


def _family(model):
    import importlib

    import transformers

    name = type(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"vtprune.apply: unsupported model class {name}; supported: {', '.join(FAMILIES)}")
    # a subclass or a class of the same name from elsewhere may change forward, layers or caches: the patches
    # mirror transformers' own classes only
    expected = getattr(transformers, name, None)
    if type(model) is not expected:
        raise TypeError(f"vtprune.apply: model is a {type(model).__module__}.{name}, not transformers' {name} "
                        f"(subclasses and look-alike classes are not supported; the patch mirrors that class)")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def apply(model, method) -> Handle:
    """Patch ``model`` (this instance only) to run ``method``; returns a :class:`Handle`.

    Parameters
    ----------
    model : a supported ``transformers`` model instance (``LlavaForConditionalGeneration``,
        ``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``)
    method : a :class:`vtprune.methods.Method`: VisionDrop, FastV, VisionZip, PyramidDrop, UniformPool, ALVTS, or a
        subclass of your own (docs/methods.md, "Writing a method")

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
    if not isinstance(method, Method):
        raise TypeError(f"vtprune.apply: method must be a vtprune.methods.Method (VisionDrop(), FastV(), ALVTS(), or "
                        f"a subclass of your own), got {type(method).__name__}")
    num_layers = model.config.get_text_config().num_hidden_layers
    hooks = method.hooks(num_layers)
    if hooks.prune_after and hooks.prune_after[-1] >= num_layers:
        raise ValueError(f"{type(method).__name__}: a hook after layer {hooks.prune_after[-1]} leaves no decoder "
                         f"layer to prune for; the language model has {num_layers} layers")
    restorer = Restorer()
    try:
        method.prepare(model.model.language_model, vlm=model)
        patch = family(model, method, hooks, restorer)
        restorer.set_attr(model, "__deepcopy__", lambda memo: _deepcopy(model, memo))
        restorer.set_attr(model, "__reduce_ex__", _refuse_pickle)
    except BaseException:
        restorer.restore()
        raise
    handle = Handle(model, method, patch, restorer)
    model.__dict__[_ATTR] = handle
    return handle


def _deepcopy(model, memo):
    """``copy.deepcopy`` of a patched model: a copy of the unpatched model, patched with the same method (its own
    patch, running its own weights). The original keeps its patch, caches and statistics untouched."""
    import copy

    handle = model.__dict__[_ATTR]
    lifted = handle._restorer.lift()
    del model.__dict__[_ATTR]
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__[_ATTR] = handle
        handle._restorer.put_back(lifted)
    # e.g. ALVTS: the copy uses the same (possibly calibrated) selector factors
    handle.method.prepare_copy(model.model.language_model, clone.model.language_model)
    apply(clone, handle.method)
    return clone


def _refuse_pickle(protocol):
    raise TypeError("vtprune: a patched model cannot be pickled (torch.save(model), pickle.dumps): the patch is "
                    "bound to this instance. Save the unpatched model instead: model.save_pretrained(...) or "
                    "torch.save(model.state_dict()) (the weights are unchanged by the patch), or handle.remove() "
                    "first")
