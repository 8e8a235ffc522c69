"""VisionDrop (Xu et al., AAAI 2026; official code github.com/Ruixxxx/VisionDrop), docs/methods.md#visiondrop.

Stage 1 in the vision encoder ([CLS] attention at the feature layer, keep [CLS] + ``dominant - 1`` patches,
merge the rest into ``contextual`` tokens); LLM stages after 1/4, 2/4 and 3/4 of the depth (layers 8/16/24 of
32) score the image tokens with the next layer's recomputed visual-to-visual attention, keep the top
``dominant`` and merge the rest.

Budgets. "Average tokens" is the mean visual-token count over the LLM layers. The official default (average
32) keeps 48 after the encoder, then 35, 26, 19 (split ``[42, 6] -> [30, 5] -> [22, 4] -> [16, 3]``). A budget
``tokens=T`` scales those totals by ``T / 32`` (so the encoder keeps 1.5x the average, the paper's rule) and
splits each total ``n`` into ``contextual = ceil(n / 8)`` and ``dominant = n - contextual``: that rule
reproduces the official 32-token split exactly and keeps the official ~7:1 dominant:contextual ratio.
Presets (encoder, stages):

====== ============ ============ ============ ============
tokens encoder      stage 1      stage 2      stage 3
====== ============ ============ ============ ============
32     42 + 6 = 48  30 + 5 = 35  22 + 4 = 26  16 + 3 = 19
64     84 + 12      61 + 9       45 + 7       33 + 5
128    168 + 24     122 + 18     91 + 13      66 + 10
192    252 + 36     183 + 27     136 + 20     99 + 15
====== ============ ============ ============ ============

``ratio=r`` gives the same shape as fractions of each row's original visual-token count (average ``r``), for
dynamic resolutions: the stage totals are ``min(1, a * t / 32)`` for the official totals ``t`` with ``a`` chosen
so that they average ``r``. Up to ``r = 2/3`` that is ``a = r`` (the encoder keeps ``1.5 r``); above it the
encoder (then the later stages) is capped at the whole image and the rest of the budget goes to the later
stages, so ``r = 1`` keeps every token at every stage. Each total below the whole image is split 7:1 into
dominant and contextual; a total of the whole image keeps every token. ``tokens=None`` keeps every token but
still runs the scoring and selection path.

``average=N`` (the shared budget of :mod:`vtprune.methods.budget`) solves, per image, the scale of the same
shape ``min(n, s * t)`` over the groups of layers the stages bound, so that the layer average is ``N``, with
whole-token counts rounded to meet it (exactly where the group sizes allow); each total splits as above.
"""

from __future__ import annotations

import math

from vtprune.methods.budget import Solved, check_average, exclusive, fit_average, group_lengths, stage_pairs
from vtprune.methods.schedule import EncoderStage, Stage, depth_scaled
from vtprune.methods.staged import Plan, StagedMethod

# Official LLaVA-1.5 totals at average 32 (encoder, after 8, 16, 24 layers) and their depth fractions.
OFFICIAL_TOTALS = (48, 35, 26, 19)
OFFICIAL_AVERAGE = 32
STAGE_FRACTIONS = (0.25, 0.5, 0.75)


DEFAULT_TOKENS = 64
_DEFAULT = object()  # tokens not given: DEFAULT_TOKENS unless ratio= or an explicit schedule is


def ratio_totals(ratio: float) -> list[float]:
    """Encoder and stage totals, as fractions of the image, that average ``ratio``: ``min(1, a * t / 32)`` for the
    official totals ``t``, with ``a`` found by capping the largest totals at the whole image one at a time."""
    shape = [t / OFFICIAL_AVERAGE for t in OFFICIAL_TOTALS]  # decreasing, mean 1
    if ratio == 1.0:
        return [1.0] * len(shape)
    total = ratio * len(shape)
    for capped in range(len(shape)):  # the first `capped` totals are the whole image
        a = (total - capped) / sum(shape[capped:])
        if a * shape[capped] <= 1.0:
            return [1.0] * capped + [a * s for s in shape[capped:]]
    raise AssertionError(f"no schedule for ratio {ratio}")  # unreachable for ratio < 1


def split(total: int) -> tuple[int, int]:
    """(dominant, contextual) for a stage total: contextual = ceil(total / 8) (official 42+6, 30+5, 22+4, 16+3)."""
    contextual = math.ceil(total / 8) if total > 1 else 0
    return total - contextual, contextual


def preset(tokens: int) -> tuple[tuple[int, int], ...]:
    """(dominant, contextual) of the encoder and the three LLM stages for an average budget ``tokens``."""
    totals = [max(1, round(t * tokens / OFFICIAL_AVERAGE)) for t in OFFICIAL_TOTALS]
    return tuple(split(t) for t in totals)


class VisionDrop(StagedMethod):
    """VisionDrop with a preset budget, a ratio, or an explicit schedule.

    Parameters
    ----------
    tokens : int or None, default 64
        Average visual tokens over the LLM layers (presets above); ``None`` keeps every token. Not together with
        ``ratio`` or an explicit schedule.
    ratio : float, optional
        Average kept fraction of each row's visual tokens instead of ``tokens`` (dynamic resolutions).
    average : number, optional
        Average visual tokens per decoder layer of each image (the shared budget, docs/methods.md "Budget
        table"), solved per image on the preset's shape; instead of every other budget argument.
    encoder : (dominant, contextual), optional
        Explicit encoder stage (``dominant`` counts [CLS]); with ``stages``, replaces the preset.
    stages : dict {layer: (dominant, contextual)}, optional
        Explicit LLM stages: prune after ``layer`` decoder layers. Counts may be ints, fractions or None.
    backend : "auto" | "reference" | "triton" | "cuda"

    Example
    -------
    >>> VisionDrop(encoder=(42, 6), stages={8: (30, 5), 16: (22, 4), 24: (16, 3)})  # official default
    """

    name = "visiondrop"

    def __init__(self, tokens: int | None = _DEFAULT, *, ratio: float | None = None, encoder=None, stages=None,
                 average: float | None = None, backend: str = "auto"):
        super().__init__(backend)
        self.average = check_average("VisionDrop", average)
        exclusive("VisionDrop", average, tokens=tokens is not _DEFAULT, ratio=ratio is not None,
                  encoder=encoder is not None, stages=stages is not None)
        explicit = encoder is not None or stages is not None
        if explicit and ratio is not None:
            raise ValueError("VisionDrop: give either ratio= or an explicit encoder=/stages= schedule, not both")
        if tokens is not _DEFAULT and (ratio is not None or explicit):
            other = "ratio=" if ratio is not None else "an explicit encoder=/stages= schedule"
            raise ValueError(f"VisionDrop: give either tokens= or {other}, not both (got tokens={tokens!r})")
        if tokens is _DEFAULT:
            tokens = DEFAULT_TOKENS
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, float) or not 0 < ratio <= 1):
            raise ValueError(f"VisionDrop ratio must be a float in (0, 1], got {ratio!r}")
        if not explicit and ratio is None and tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"VisionDrop tokens must be a positive int or None, got {tokens!r}")
        if stages is not None and not isinstance(stages, dict):
            raise ValueError(f"VisionDrop stages must be a dict {{layer: (dominant, contextual)}}, got {stages!r}")
        self.tokens = None if (explicit or ratio is not None or average is not None) else tokens
        self.ratio = ratio
        self._encoder = None if encoder is None else EncoderStage(*_pair("encoder", encoder))
        self._stages = None if stages is None else tuple(
            Stage(layer, *_pair(f"stages[{layer}]", v)) for layer, v in sorted(stages.items())
        )
        self._explicit = explicit

    def plan(self, num_layers: int) -> Plan:
        if self._explicit:
            return self._plan(self._encoder, self._stages or (), num_layers)
        layers = depth_scaled(STAGE_FRACTIONS, num_layers)
        if self.average is not None:
            lengths = group_lengths(layers, num_layers)

            def solve(n):
                return stage_pairs(self._fit(lengths, n), split)

            pairs = [(Solved(solve, g, 0), Solved(solve, g, 1)) for g in range(4)]
        elif self.ratio is not None:
            pairs = [(None, 0) if f == 1.0 else (f * 7 / 8, f / 8) for f in ratio_totals(self.ratio)]
        elif self.tokens is None:
            pairs = [(None, 0)] * 4
        else:
            pairs = preset(self.tokens)
        encoder = EncoderStage(*pairs[0])
        return self._plan(encoder, [Stage(layer, *p) for layer, p in zip(layers, pairs[1:])], num_layers)

    def average_counts(self, num_layers: int, n: int) -> tuple:
        return self._fit(group_lengths(depth_scaled(STAGE_FRACTIONS, num_layers), num_layers), n)

    def _fit(self, lengths, n):
        return fit_average(self.average, n, lengths, ("scale", OFFICIAL_TOTALS), 0, repr(self))

    def _describe(self) -> str:
        if self.average is not None:
            return f"average={self.average:g}"
        if self._explicit:
            return f"encoder={self._encoder}, stages={self._stages}"
        return f"ratio={self.ratio}" if self.ratio is not None else f"tokens={self.tokens}"


def _pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"VisionDrop {name} must be a (dominant, contextual) pair, got {value!r}")
    return tuple(value)
