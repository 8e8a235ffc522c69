"""The shared budget ``average=N``: an average of N visual tokens per decoder layer, on every method's own schedule.

Each method keeps its native knobs; ``average=`` asks instead for the comparison axis of the papers, the mean
over the decoder layers of the visual tokens each layer runs on for one image (what
``handle.stats.average_visual_tokens`` reports). A method describes its schedule *shape* as groups of layers
that run on one count each (an encoder stage counts for every layer up to the first LLM stage) and a one-parameter
family of counts, ``t`` in ``[0, 1]`` from the least it can keep to keeping everything:

* ``"scale"`` (VisionDrop): ``min(n, s * w_g)`` for fixed weights ``w`` (the official totals): one scale ``s``;
* ``"geometric"`` (PyramidDrop): ``n * t ** j`` after the ``j``-th stage (the kept ratio ``lambda = t``);
* ``"level"`` (FastV, ALVTS, VisionZip): one count ``t * n`` after the fixed groups.

Groups before the method's first prune point (``fixed`` of them) run on all ``n`` tokens. :func:`fit_average`
solves ``t`` for the average, rounds the counts and then moves single counts by one token, as long as that brings
the realised average closer to the target, keeping counts non-increasing and in ``[1, n]``; it raises a
``ValueError`` naming ``average`` when the target lies outside what the shape reaches or when integer counts
cannot come within :data:`TOLERANCE` of it.
"""

from __future__ import annotations

import functools
import math

TOLERANCE = 0.02  # the realised average lies within 2 % of the target
# families whose int budgets count per 336 px tile and whose images hold different numbers of tiles
TILED = ("LlavaNextForConditionalGeneration",)


def check_average(owner: str, average) -> float | None:
    """Validate an ``average=`` argument (None: not given); returns it as a float."""
    if average is None:
        return None
    if isinstance(average, bool) or not isinstance(average, (int, float)) or not math.isfinite(average) \
            or average < 1:
        raise ValueError(f"{owner} average must be a number >= 1 (visual tokens per decoder layer), got {average!r}")
    return average  # as given: an int stays an int in configs


def exclusive(owner: str, average, **native) -> None:
    """Refuse ``average=`` together with native budget knobs (``native``: name -> whether it was given)."""
    given = [name for name, was_given in native.items() if was_given]
    if average is not None and given:
        raise ValueError(f"{owner}: give either average= or {' / '.join(n + '=' for n in given)}, not both "
                         f"(average= replaces the native budget knobs: {', '.join(n + '=' for n in native)})")


def refuse_tiled(owner: str, average, model: str) -> None:
    """``average=`` counts one image's tokens; LLaVA-NeXT's images are tiled (budgets per tile, tiles per image
    vary), which the shared knob does not cover."""
    if average is not None and model in TILED:
        raise ValueError(f"{owner}: average= counts the visual tokens of one image, which {model} tiles into a "
                         "varying number of 336 px tiles; use the native knobs there (tokens= per tile, ratio=)")


def group_lengths(layers, num_layers: int) -> tuple[int, ...]:
    """Decoder layers in each group bounded by the prune points ``layers`` (after that many layers)."""
    bounds = [0, *layers, num_layers]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def layer_average(lengths, counts) -> float:
    """The mean over the layers of the counts their groups run on."""
    return sum(n * c for n, c in zip(lengths, counts)) / sum(lengths)


def _curve(shape: tuple, n: int, fixed: int, groups: int, t: float) -> list[float]:
    kind = shape[0]
    free = groups - fixed
    if kind == "scale":  # weights of the free groups, largest first; t = 1 puts the smallest at n
        w = shape[1]
        x = [min(float(n), t * n * wi / w[-1]) for wi in w]
    elif kind == "geometric":
        x = [n * t ** (j + 1) for j in range(free)]
    elif kind == "level":
        x = [t * n] * free
    else:
        raise ValueError(f"unknown schedule shape {kind!r}")
    return [float(n)] * fixed + [max(1.0, v) for v in x]


@functools.lru_cache(maxsize=4096)
def fit_average(average: float, n: int, lengths: tuple, shape: tuple, fixed: int, owner: str,
                floor_reason: str = "") -> tuple[int, ...]:
    """Integer counts, one per group of ``lengths`` layers, in ``shape`` (module docstring), whose layer average
    is ``average`` within :data:`TOLERANCE`, for an image of ``n`` visual tokens; the first ``fixed`` groups are
    ``n``. Raises ``ValueError`` naming ``average`` and the reachable range when there is none."""
    L, G = sum(lengths), len(lengths)
    lo = layer_average(lengths, _curve(shape, n, fixed, G, 0.0))
    if not lo - 1e-9 <= average <= n:
        why = f" ({floor_reason})" if floor_reason and average < lo else ""
        raise ValueError(f"{owner}: average={average:g} visual tokens per decoder layer is out of reach for an image "
                         f"of {n} visual tokens on {L} decoder layers: it reaches {lo:.2f} to {n}{why}")
    a, b = 0.0, 1.0
    for _ in range(60):  # the average grows with t: bisect
        m = (a + b) / 2
        a, b = (m, b) if layer_average(lengths, _curve(shape, n, fixed, G, m)) < average else (a, m)
    x = _curve(shape, n, fixed, G, b)
    c = [n] * fixed + [min(n, max(1, math.floor(v + 0.5))) for v in x[fixed:]]
    target = average * L
    while True:  # one token at a time, the least distorting move that brings the total closer
        err = target - sum(k * v for k, v in zip(lengths, c))
        best = None
        for g in range(fixed, G):
            for d in (1, -1):
                new = c[g] + d
                if not 1 <= new <= n or (g > 0 and new > c[g - 1]) or (g + 1 < G and new < c[g + 1]):
                    continue
                left = abs(err - d * lengths[g])
                if left < abs(err) - 1e-9:
                    key = (abs(new - x[g]), left)
                    if best is None or key < best[0]:
                        best = (key, g, new)
        if best is None:
            break
        c[best[1]] = best[2]
    got = layer_average(lengths, c)
    if abs(got - average) > TOLERANCE * average:
        raise ValueError(f"{owner}: average={average:g} visual tokens per decoder layer cannot be met within "
                         f"{TOLERANCE:.0%} by whole token counts for an image of {n} visual tokens on {L} decoder "
                         f"layers (the closest is {got:.2f}, counts {c} on groups of {list(lengths)} layers)")
    return tuple(c)


def stage_pairs(counts, split) -> tuple[tuple[int, int], ...]:
    """(dominant, contextual) per group from its total: ``split(total)``, or the whole count kept as dominant
    where a group keeps what the one before left (nothing to merge)."""
    pairs = []
    for g, total in enumerate(counts):
        pairs.append((total, 0) if g > 0 and total == counts[g - 1] else split(total))
    return tuple(pairs)


class Solved:
    """A count spec (:func:`vtprune.methods.schedule.resolve_count`) solved per image from ``average=``: part
    ``part`` (0 dominant, 1 contextual) of group ``group``'s pair in ``solve(n)`` for an image of ``n`` tokens.
    ``per`` (LLaVA-NeXT tiles) does not apply: the budget counts the image."""

    __slots__ = ("solve", "group", "part")

    def __init__(self, solve, group: int, part: int):
        self.solve, self.group, self.part = solve, group, part

    def resolve(self, original: int) -> int:
        return self.solve(original)[self.group][self.part]

    def __repr__(self):
        return f"Solved(group={self.group}, part={'dominant' if self.part == 0 else 'contextual'})"
