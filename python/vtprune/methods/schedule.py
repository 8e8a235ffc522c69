"""Token schedules: how many visual tokens each stage keeps, resolved against a concrete model and image.

A *count spec* is what a user writes for one stage and is turned into a number per batch row by
:func:`resolve_count`:

* ``int``: an absolute count (the official VisionDrop code uses absolute counts, e.g. ``[30, 5]``);
* ``float`` in ``(0, 1]``: a fraction of the row's **original** visual-token count (the image placeholders
  before any pruning, e.g. 576 for LLaVA-1.5); the schedule then follows dynamic resolutions (LLaVA-NeXT,
  Qwen2.5-VL) where absolute counts cannot;
* ``None``: keep every token that reaches the stage (the "keep-all" budget used to check that the pruning
  path reproduces the unpatched model);
* a :class:`vtprune.methods.budget.Solved`: a count solved per image from a method's ``average=`` budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vtprune.methods.budget import Solved

QUERIES = ("image", "last")
SCORE_LAYERS = ("next", "self")


def check_count(name: str, spec, *, allow_zero: bool) -> None:
    """Validate one count spec; errors name the argument."""
    if spec is None or isinstance(spec, Solved):
        return
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(f"{name} must be an int count, a float fraction in (0, 1] or None, got {spec!r}")
    if isinstance(spec, int) and (spec < 0 or (spec == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {spec}")
    if isinstance(spec, float) and not (0.0 <= spec <= 1.0 and (allow_zero or spec > 0.0)):
        raise ValueError(f"{name} as a fraction must lie in {'[0' if allow_zero else '(0'}, 1], got {spec}")


def resolve_count(spec, original: int, current: int, per: int = 1) -> int:
    """The count a spec asks for in a row with ``original`` visual tokens of which ``current`` remain.

    ``per``: an int count is per unit of the image and multiplied by ``per`` (LLaVA-NeXT counts per 336 px crop,
    so one schedule gives LLaVA-1.5's budget per crop); fractions and ``None`` ignore it.
    """
    if spec is None:
        return current
    if isinstance(spec, Solved):
        return spec.resolve(original)
    if isinstance(spec, float):
        # round half up, and never let a positive fraction round a non-empty image to zero tokens
        n = int(math.floor(spec * original + 0.5))
        return max(n, 1) if spec > 0 and original > 0 else n
    return spec * per


@dataclass(frozen=True)
class EncoderStage:
    """Prune inside the vision encoder, before the projector (VisionDrop stage 1, VisionZip).

    ``dominant`` counts the [CLS] token where the encoder has one (official code: ``--dominant 42`` keeps [CLS]
    plus 41 patches). ``kind="pool"`` replaces selection by average pooling of the patch grid.
    """

    dominant: int | float | None
    contextual: int | float = 0
    kind: str = "select"

    def __post_init__(self):
        check_count("encoder dominant", self.dominant, allow_zero=False)
        check_count("encoder contextual", self.contextual, allow_zero=True)
        if self.kind not in ("select", "pool"):
            raise ValueError(f"EncoderStage.kind must be 'select' or 'pool', got {self.kind!r}")


@dataclass(frozen=True)
class Stage:
    """Prune inside the language model after ``layer`` decoder layers (before ``layers[layer]``), prefill only.

    ``query``: whose attention ranks the image tokens: ``"image"`` (the image tokens themselves, VisionDrop's
    visual-to-visual score) or ``"last"`` (the last prompt token: FastV, PyramidDrop).
    ``score_layer``: ``"next"`` recomputes q/k with the next layer's weights (official VisionDrop and
    PyramidDrop); ``"self"`` uses the layer that just ran (FastV ranks with layer K-1's own attention).
    """

    layer: int
    dominant: int | float | None
    contextual: int | float = 0
    query: str = "image"
    score_layer: str = "next"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"stage layer must be an int >= 1 (prune after that many layers), got {self.layer!r}")
        check_count(f"stage {self.layer} dominant", self.dominant, allow_zero=False)
        check_count(f"stage {self.layer} contextual", self.contextual, allow_zero=True)
        if self.query not in QUERIES:
            raise ValueError(f"stage query must be one of {QUERIES}, got {self.query!r}")
        if self.score_layer not in SCORE_LAYERS:
            raise ValueError(f"stage score_layer must be one of {SCORE_LAYERS}, got {self.score_layer!r}")


def check_stages(stages: tuple[Stage, ...], num_layers: int, method: str) -> None:
    """Stages must be strictly increasing and leave at least one layer after the last one."""
    layers = [s.layer for s in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"{method}: stage layers must be strictly increasing, got {layers}")
    if layers and layers[-1] >= num_layers:
        raise ValueError(
            f"{method}: a stage after layer {layers[-1]} leaves no decoder layer to prune for; the language "
            f"model has {num_layers} layers"
        )


def depth_scaled(fractions: tuple[float, ...], num_layers: int) -> tuple[int, ...]:
    """Stage layers at fractions of the depth (8/16/24 of 32 layers = 1/4, 2/4, 3/4), kept distinct."""
    out = []
    for f in fractions:
        layer = max(1, min(num_layers - 1, round(f * num_layers)))
        if out and layer <= out[-1]:
            layer = out[-1] + 1
        out.append(layer)
    if out and out[-1] >= num_layers:
        raise ValueError(f"a language model with {num_layers} layers is too shallow for {len(fractions)} stages")
    return tuple(out)
