"""Baselines on the same kernels (docs/methods.md (baselines)): FastV, VisionZip, PyramidDrop and uniform pooling.

They share VisionDrop's stage machinery so that benchmarks compare methods, not implementations.
"""

from __future__ import annotations

import math

from vtprune.methods.budget import Solved, check_average, exclusive, fit_average, group_lengths, stage_pairs
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
    average : number, optional  average visual tokens per decoder layer of each image (the shared budget): the
        first ``layer`` layers run on all ``n`` tokens, the kept count is solved per image; instead of
        ``ratio`` / ``tokens``
    """

    name = "fastv"

    def __init__(self, layer: int = 2, ratio: float = _UNSET, *, tokens: int | None = None,
                 average: float | None = None, backend="auto"):
        super().__init__(backend)
        self.average = check_average("FastV", average)
        exclusive("FastV", average, ratio=ratio is not _UNSET, tokens=tokens is not None)
        if average is not None:
            ratio = None
        elif tokens is not None:
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
        if self.average is not None:
            keep = Solved(lambda n: stage_pairs(self.average_counts(num_layers, n), _whole), 1, 0)
        return self._plan(None, [Stage(self.layer, keep, 0, query="last", score_layer="self")], num_layers)

    def average_counts(self, num_layers: int, n: int) -> tuple:
        return fit_average(self.average, n, group_lengths((self.layer,), num_layers), ("level",), 1, repr(self),
                           f"its first {self.layer} layers run on every visual token")

    def _describe(self):
        if self.average is not None:
            return f"layer={self.layer}, average={self.average:g}"
        return f"layer={self.layer}, " + (f"tokens={self.tokens}" if self.tokens is not None else f"ratio={self.ratio}")


class PyramidDrop(StagedMethod):
    """PyramidDrop (Xing et al., 2024): at 1/4, 2/4, 3/4 of the depth (8/16/24 of 32), keep ``ratio`` of the
    remaining image tokens ranked by the last instruction token's attention in the next layer (recomputed q/k,
    as in the official code).

    Parameters
    ----------
    ratio : float, default 0.5  the per-stage kept fraction (lambda)
    layers : tuple of int, optional  explicit stage layers instead of the depth-scaled 8/16/24
    average : number, optional  average visual tokens per decoder layer of each image (the shared budget):
        lambda is solved per image (kept counts ``n * lambda ** j``, rounded to meet the average); instead of
        ``ratio``
    """

    name = "pyramiddrop"

    def __init__(self, ratio: float = _UNSET, *, layers=None, average: float | None = None, backend="auto"):
        super().__init__(backend)
        self.average = check_average("PyramidDrop", average)
        exclusive("PyramidDrop", average, ratio=ratio is not _UNSET)
        self.ratio = None if average is not None else _ratio("PyramidDrop ratio", 0.5 if ratio is _UNSET else ratio)
        self.layers = None if layers is None else tuple(layers)

    def _layers(self, num_layers: int) -> tuple:
        return self.layers or depth_scaled((0.25, 0.5, 0.75), num_layers)

    def plan(self, num_layers: int) -> Plan:
        layers = self._layers(num_layers)
        if self.average is not None:
            def solve(n):
                return stage_pairs(self.average_counts(num_layers, n), _whole)

            keeps = [Solved(solve, i + 1, 0) for i in range(len(layers))]
        else:  # fractions of the original count: lambda, lambda^2, lambda^3 of the image
            keeps = [self.ratio ** (i + 1) for i in range(len(layers))]
        stages = [Stage(layer, keep, 0, query="last") for layer, keep in zip(layers, keeps)]
        return self._plan(None, stages, num_layers)

    def average_counts(self, num_layers: int, n: int) -> tuple:
        return fit_average(self.average, n, group_lengths(self._layers(num_layers), num_layers), ("geometric",), 1,
                           repr(self), "the layers before its first stage run on every visual token")

    def _describe(self):
        if self.average is not None:
            return f"average={self.average:g}, layers={self.layers}"
        return f"ratio={self.ratio}, layers={self.layers}"


class VisionZip(StagedMethod):
    """VisionZip (Yang et al., CVPR 2025): encoder stage only ([CLS] attention at the feature layer; keep
    [CLS] + ``dominant - 1`` patches and merge the rest into ``contextual`` tokens). Default 54 + 10 = 64.
    ``average=N`` (the shared budget) keeps ``round(N)`` tokens of each image, split 54:10 like the default."""

    name = "visionzip"

    def __init__(self, dominant=_UNSET, contextual=_UNSET, *, average: float | None = None, backend="auto"):
        super().__init__(backend)
        self.average = check_average("VisionZip", average)
        exclusive("VisionZip", average, dominant=dominant is not _UNSET, contextual=contextual is not _UNSET)
        # under average= the counts are solved per image (plan); the native pair stays the default's
        self.encoder = EncoderStage(54 if dominant is _UNSET else dominant, 10 if contextual is _UNSET else contextual)

    def plan(self, num_layers: int) -> Plan:
        encoder = self.encoder
        if self.average is not None:
            def solve(n):
                return stage_pairs(self.average_counts(num_layers, n), _zip_split)

            encoder = EncoderStage(Solved(solve, 0, 0), Solved(solve, 0, 1))
        return self._plan(encoder, (), num_layers)

    def average_counts(self, num_layers: int, n: int) -> tuple:
        return fit_average(self.average, n, (num_layers,), ("level",), 0, repr(self))

    def _describe(self):
        if self.average is not None:
            return f"average={self.average:g}"
        return f"dominant={self.encoder.dominant}, contextual={self.encoder.contextual}"


class UniformPool(StagedMethod):
    """Uniform pooling baseline: average-pool the encoder's patch grid to ``tokens`` tokens (a square number,
    e.g. 64 = 8x8 of LLaVA-1.5's 24x24) before the projector; [CLS] is dropped. ``average=N`` (the shared
    budget) pools to the square grid nearest ``N`` and is refused where no square lies within 2 % of it."""

    name = "pool"

    def __init__(self, tokens: int = _UNSET, *, average: float | None = None, backend="auto"):
        super().__init__(backend)
        self.average = check_average("UniformPool", average)
        exclusive("UniformPool", average, tokens=tokens is not _UNSET)
        tokens = _square(average) if average is not None else 64 if tokens is _UNSET else tokens
        check_count("UniformPool tokens", tokens, allow_zero=False)
        if not isinstance(tokens, int) or math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"UniformPool tokens must be a square number (a pooled grid), got {tokens!r}")
        self.tokens = tokens

    def plan(self, num_layers: int) -> Plan:
        return self._plan(EncoderStage(self.tokens, 0, kind="pool"), (), num_layers)

    def average_counts(self, num_layers: int, n: int) -> tuple:
        if self.tokens > n:
            raise ValueError(f"{self!r}: average={self.average:g} visual tokens per decoder layer is out of reach for "
                             f"an image of {n} patches: it pools to a square grid of at most {n} tokens")
        return (self.tokens,)

    def _describe(self):
        return f"average={self.average:g}" if self.average is not None else f"tokens={self.tokens}"


def _whole(total: int) -> tuple[int, int]:
    """A kept count without contextual tokens (FastV, PyramidDrop)."""
    return total, 0


def _zip_split(total: int) -> tuple[int, int]:
    """(dominant, contextual) of a VisionZip total in the default 54:10 proportion; dominant counts [CLS]."""
    contextual = min(total - 1, math.floor(total * 10 / 64 + 0.5))
    return total - contextual, contextual


def _square(average: float) -> int:
    """The square grid size nearest ``average`` (UniformPool pools to a square grid), within 2 %."""
    side = max(1, round(math.sqrt(average)))
    if abs(side * side - average) > 0.02 * average:
        lo, hi = math.isqrt(int(average)), math.isqrt(int(average)) + 1
        raise ValueError(f"UniformPool: average={average:g} cannot be met within 2 %: uniform pooling keeps a square "
                         f"grid of tokens, and the nearest are {lo * lo} ({lo}x{lo}) and {hi * hi} ({hi}x{hi})")
    return side * side
