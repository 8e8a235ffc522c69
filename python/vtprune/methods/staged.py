"""Methods described by a budget schedule: an optional encoder stage and LLM stages (VisionDrop and the baselines).

A :class:`StagedMethod` turns its :class:`Plan` (:meth:`StagedMethod.plan`, the schedule of
:mod:`vtprune.methods.schedule`) into the hook points of :class:`vtprune.methods.base.Method` and implements them
with the public ops: at the encoder hook, keep the top ``dominant`` patches by attention score and merge the rest
into ``contextual`` tokens (:func:`vtprune.ops.select_and_merge`), or pool the patch grid; after a decoder layer,
score the image tokens with the recomputed attention of the stage's query (the image tokens themselves, or the
last prompt token) and select and merge the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtprune import ops
from vtprune.methods.base import EncoderContext, Hooks, Method, ModelInfo, PruneContext, Selection
from vtprune.methods.budget import refuse_tiled
from vtprune.methods.schedule import EncoderStage, Stage, check_stages, resolve_count


@dataclass(frozen=True)
class Plan:
    """A staged method bound to a language model depth: its encoder stage and LLM stages."""

    encoder: EncoderStage | None
    stages: tuple[Stage, ...]
    backend: str
    method: Method = field(compare=False)


class StagedMethod(Method):
    """Base of the schedule-driven methods. Subclasses implement :meth:`plan` and, where they take the shared
    ``average=`` budget (:mod:`vtprune.methods.budget`), :meth:`average_counts`."""

    average = None  # the shared budget: average visual tokens per decoder layer, or None (native knobs)

    def plan(self, num_layers: int) -> Plan:
        raise NotImplementedError

    def average_counts(self, num_layers: int, n: int) -> tuple:
        """Under ``average=``: the visual tokens each group of layers runs on for an image of ``n`` tokens
        (groups bounded by the prune points); raises ``ValueError`` naming ``average`` when out of reach."""
        raise NotImplementedError

    def _plan(self, encoder, stages, num_layers) -> Plan:
        stages = tuple(stages)
        check_stages(stages, num_layers, type(self).__name__)
        return Plan(encoder=encoder, stages=stages, backend=self.backend, method=self)

    def hooks(self, num_layers: int) -> Hooks:
        plan = self.plan(num_layers)
        enc = plan.encoder
        return Hooks(encoder=enc is not None, encoder_scores=enc is not None and enc.kind == "select",
                     prune_after=tuple(s.layer for s in plan.stages))

    def _stage(self, layer: int, num_layers: int) -> Stage:
        return next(s for s in self.plan(num_layers).stages if s.layer == layer)

    # ------------------------------------------------------------------ apply-time budget check
    def check_model(self, info: ModelInfo) -> None:
        """Refuse a schedule whose int counts exceed what an image of this model holds (per tile for LLaVA-NeXT):
        every image would fail at its first forward otherwise. Dynamic resolutions are checked per image."""
        if self.average is not None:
            refuse_tiled(repr(self), self.average, info.model)
            if info.patches is not None:  # fixed resolution: an unreachable average fails here, not per image
                self.average_counts(info.num_layers, info.patches)
        plan = self.plan(info.num_layers)
        enc = plan.encoder
        if enc is not None and enc.kind == "pool" and info.grid is None:
            raise ValueError(f"{type(self).__name__}: uniform pooling to a square grid does not apply to "
                             f"{info.model}'s dynamic-resolution images; use a ratio-based method (e.g. "
                             "VisionDrop(ratio=...), VisionZip with fractions)")
        P = info.patches
        if P is None:
            return
        side = info.grid
        cls = 1 if info.has_cls else 0
        avail, what = P + cls, f"{P} patches ({side}x{side})" + (" + [CLS]" if cls else "")
        if enc is not None and enc.dominant is not None:
            if enc.kind == "pool":
                total, limit = enc.dominant, P
            else:
                total = resolve_count(enc.dominant, P, P) + resolve_count(enc.contextual, P, P)
                limit = P + cls
            if total > limit:
                raise ValueError(f"{self!r}: its encoder stage keeps {total} tokens per image but a "
                                 f"{info.model} image has {what}; lower the budget")
            avail, what = total, f"{total} tokens after the encoder stage"
        for st in plan.stages:
            if not isinstance(st.dominant, int):
                continue
            total = st.dominant + resolve_count(st.contextual, P, avail)
            if total > avail + info.extra_per_image:
                raise ValueError(f"{self!r}: the stage after layer {st.layer} keeps {total} visual tokens per "
                                 f"image but a {info.model} image has {what}; lower the budget")
            avail, what = total, f"{total} tokens after layer {st.layer}"

    # ------------------------------------------------------------------ encoder hook
    def select_encoder(self, ctx: EncoderContext) -> Selection:
        enc = self.plan(ctx.num_layers).encoder
        patches = ctx.tokens
        I, P = patches.shape[:2]
        if enc.kind == "pool":
            side = math.isqrt(enc.dominant)
            g = ctx.grid
            grid = patches.reshape(I, g, g, -1).permute(0, 3, 1, 2)
            tokens = F.adaptive_avg_pool2d(grid.float(), side).to(patches.dtype).flatten(2).transpose(1, 2)
            keep = torch.arange(side * side).expand(I, -1)
            return Selection(tokens, keep, None, cls=False, grid=side)
        has_cls = ctx.cls is not None
        keep_all = enc.dominant is None
        # [CLS] counts as a dominant token where the tower has one (official VisionZip / VisionDrop)
        d = P if keep_all else resolve_count(enc.dominant, P, P) - (1 if has_cls else 0)
        c = 0 if keep_all else resolve_count(enc.contextual, P, P)
        if ctx.cap and d >= 0 and d + c > P:  # dynamic resolutions: a smaller image keeps every token
            keep = torch.arange(P, device=patches.device).expand(I, P)
            return Selection(patches, keep, None, capped=True)
        if d < 0 or d + c > P:
            shown = f"{d + 1} dominant (with [CLS])" if has_cls else f"{d} dominant"
            raise ValueError(f"{type(self).__name__}: the encoder stage keeps {shown} + {c} contextual tokens but "
                             f"{ctx.describe}")
        if d == 0:  # only [CLS] is dominant: rank nothing, merge everything
            keep_idx = torch.empty(I, 0, dtype=torch.int64, device=patches.device)
            tokens = ops.contextual_merge(patches, ctx.metric, keep_idx, c, backend=self.backend)
            target_idx = None
        else:
            tokens, keep_idx, target_idx = ops.select_and_merge(ctx.scores, patches, ctx.metric.to(patches.dtype),
                                                                d, c, backend=self.backend)
        # a keep-all stage feeds [CLS] only where the unpatched model does
        return Selection(tokens, keep_idx, target_idx, cls=has_cls and (not keep_all or ctx.cls_fed), keep_all=keep_all)

    # ------------------------------------------------------------------ decoder hook
    def select_visual(self, ctx: PruneContext) -> Selection:
        stage = self._stage(ctx.layer, ctx.num_layers)
        n = ctx.count
        d = resolve_count(stage.dominant, ctx.original, n, ctx.per)
        c = resolve_count(stage.contextual, ctx.original, n, ctx.per) if stage.dominant is not None else 0
        if d + c > n and ctx.cap:  # dynamic resolutions: a smaller unit keeps every token
            keep = torch.arange(n, device=ctx.tokens.device).expand(len(ctx.rows), n)
            return Selection(ctx.visual(ctx.tokens), keep, None, capped=True)
        if d + c > n:
            raise ValueError(f"{type(self).__name__}: the stage after layer {stage.layer} keeps {d} dominant + {c} "
                             f"contextual tokens but batch row {ctx.rows[0]} has only {n} visual tokens left; "
                             "lower the budget")
        q, k, scale = ctx.qk(stage.score_layer)
        queries = ctx.image_queries() if stage.query == "image" else ctx.last_token_queries()
        scores = ops.attention_scores(q, k, query_spans=queries, key_spans=ctx.spans, causal=True,
                                      key_padding_mask=ctx.key_padding_mask, scale=scale, backend=self.backend)
        metric = ctx.visual(k.mean(1))  # post-RoPE keys averaged over heads
        tokens, keep_idx, target_idx = ops.select_and_merge(scores, ctx.visual(ctx.tokens), metric, d, c,
                                                            backend=self.backend)
        return Selection(tokens, keep_idx, target_idx)
