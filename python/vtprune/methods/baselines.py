"""Baselines on the same kernels (docs/methods.md (baselines)): FastV, VisionZip, PyramidDrop and uniform pooling.

They share VisionDrop's stage machinery so that benchmarks compare methods, not implementations.
"""

from __future__ import annotations

import math

from vtprune.methods.schedule import EncoderStage, Stage, check_count, depth_scaled
from vtprune.methods.staged import Plan, StagedMethod

_UNSET = object()  # an argument not given (its default applies unless a conflicting one is given)


def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class FastV(StagedMethod):
    """FastV (Chen et al., 2024): after ``layer`` decoder layers, keep the image tokens that the last prompt
    token attends to most in the layer that just ran (layer ``K - 1``'s attention, head-averaged, as in the
    official code), for the rest of the prefill.

    Parameters
    ----------
    layer : int, default 2  FastV's K
    ratio : float, default 0.5  fraction of the visual tokens **kept** (FastV's R is ``1 - ratio``)
    tokens : int, optional  an absolute kept count instead of ``ratio`` (not together with ``ratio``)
    """

    name = "fastv"

    def __init__(self, layer: int = 2, ratio: float = _UNSET, *, tokens: int | None = None, backend="auto"):
        super().__init__(backend)
        if tokens is not None:
            if ratio is not _UNSET:
                raise ValueError(f"FastV: give either ratio= or tokens=, not both (got ratio={ratio!r}, "
                                 f"tokens={tokens!r})")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"FastV tokens must be a positive int count (a kept fraction is ratio=), "
                                 f"got {tokens!r}")
            ratio = None
        else:
            ratio = _ratio("FastV ratio", 0.5 if ratio is _UNSET else ratio)
        self.layer, self.ratio, self.tokens = layer, ratio, tokens
        Stage(layer, 1)  # validates layer

    def plan(self, num_layers: int) -> Plan:
        keep = self.tokens if self.tokens is not None else self.ratio
        return self._plan(None, [Stage(self.layer, keep, 0, query="last", score_layer="self")], num_layers)

    def _describe(self):
        return f"layer={self.layer}, " + (f"tokens={self.tokens}" if self.tokens is not None else f"ratio={self.ratio}")


class PyramidDrop(StagedMethod):
    """PyramidDrop (Xing et al., 2024): at 1/4, 2/4, 3/4 of the depth (8/16/24 of 32), keep ``ratio`` of the
    remaining image tokens ranked by the last instruction token's attention in the next layer (recomputed q/k,
    as in the official code).

    Parameters
    ----------
    ratio : float, default 0.5  the per-stage kept fraction (lambda)
    layers : tuple of int, optional  explicit stage layers instead of the depth-scaled 8/16/24
    """

    name = "pyramiddrop"

    def __init__(self, ratio: float = 0.5, *, layers=None, backend="auto"):
        super().__init__(backend)
        self.ratio = _ratio("PyramidDrop ratio", ratio)
        self.layers = None if layers is None else tuple(layers)

    def plan(self, num_layers: int) -> Plan:
        layers = self.layers or depth_scaled((0.25, 0.5, 0.75), num_layers)
        # fractions of the original count: lambda, lambda^2, lambda^3 of the image
        stages = [Stage(layer, self.ratio ** (i + 1), 0, query="last") for i, layer in enumerate(layers)]
        return self._plan(None, stages, num_layers)

    def _describe(self):
        return f"ratio={self.ratio}, layers={self.layers}"


class VisionZip(StagedMethod):
    """VisionZip (Yang et al., CVPR 2025): encoder stage only ([CLS] attention at the feature layer; keep
    [CLS] + ``dominant - 1`` patches and merge the rest into ``contextual`` tokens). Default 54 + 10 = 64."""

    name = "visionzip"

    def __init__(self, dominant=54, contextual=10, *, backend="auto"):
        super().__init__(backend)
        self.encoder = EncoderStage(dominant, contextual)

    def plan(self, num_layers: int) -> Plan:
        return self._plan(self.encoder, (), num_layers)

    def _describe(self):
        return f"dominant={self.encoder.dominant}, contextual={self.encoder.contextual}"


class UniformPool(StagedMethod):
    """Uniform pooling baseline: average-pool the encoder's patch grid to ``tokens`` tokens (a square number,
    e.g. 64 = 8x8 of LLaVA-1.5's 24x24) before the projector; [CLS] is dropped."""

    name = "pool"

    def __init__(self, tokens: int = 64, *, backend="auto"):
        super().__init__(backend)
        check_count("UniformPool tokens", tokens, allow_zero=False)
        if not isinstance(tokens, int) or math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"UniformPool tokens must be a square number (a pooled grid), got {tokens!r}")
        self.tokens = tokens

    def plan(self, num_layers: int) -> Plan:
        return self._plan(EncoderStage(self.tokens, 0, kind="pool"), (), num_layers)

    def _describe(self):
        return f"tokens={self.tokens}"
