"""ALVTS (Chen et al., CVPR 2026, arXiv 2606.14277), docs/methods.md#alvts: adaptive layer-wise visual token selection.

Before every routed decoder layer a low-rank selector (:func:`vtprune.ops.lowrank_scores`) scores the image
tokens; all text tokens plus the top ``k`` image tokens run through the layer (:func:`vtprune.ops.routed_layer`)
and the others skip it unchanged, back in their original order, selectable again at the next layer.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch

from vtprune._backend import BACKENDS
from vtprune._host import to_device_i64
from vtprune.alvts.calibrate import calibrate, capture_layer_inputs
from vtprune.alvts.factors import SelectorFactors, decoder_layers, init_factors
from vtprune.methods.base import Hooks, LayerCall, Method, ModelInfo
from vtprune.methods.budget import check_average, exclusive, fit_average, group_lengths, refuse_tiled
from vtprune.methods.routing import run_routed_layer
from vtprune.ops.lowrank_scores import lowrank_scores
from vtprune.ops.routed_layer import routed_attention_mask, routed_layer
from vtprune.ops.topk_keep_order import topk_keep_order


class _DefaultKeep(int):
    """The default ``keep=64``, distinguishable from an explicit 64 (which may not be combined with ratio)."""


_KEEP_DEFAULT = _DefaultKeep(64)

# Priorities of the final top-K over all positions (see ALVTS.route): text > picked image > padding >
# other image tokens, whose scores (products of probabilities, in [0, 1]) are halved into [0, 0.5].
_TEXT, _PICKED, _PADDING = 4.0, 3.0, 2.0


class ALVTS(Method):
    """ALVTS token routing with a fixed per-layer budget.

    Parameters
    ----------
    keep : int or None, default 64
        Image tokens routed through each layer, per batch row (``min(keep, N)`` for a row with ``N`` image
        tokens): 192 / 128 / 64 of LLaVA-1.5's 576, 320 of LLaVA-NeXT's 2880. ``None`` (and no ``ratio``)
        keeps every token but still runs the scoring and selection, and reproduces the unpatched model.
    ratio : float in (0, 1], optional
        ``k = floor(ratio * N)`` per row instead of ``keep`` (the paper's uniform ``r``); not with ``keep``.
    average : number, optional
        Average image tokens per decoder layer of each row's image (the shared budget, docs/methods.md "Budget
        table"): the layers before ``first_layer`` run on all ``N``, so ``k`` is solved per row from
        ``(first_layer * N + (layers - first_layer) * k) / layers``, rounded to the nearest whole count; not
        with ``keep`` or ``ratio``.
    rank : int, optional
        Selector rank R; default ``hidden_size // 16`` (the paper's 256 at D = 4096, 128 at D = 2048).
    first_layer : int, default 1
        First routed decoder layer; earlier layers run on every token.
    factors : SelectorFactors, path to a saved one, or None (SVD initialisation at :meth:`prepare`)
    calibration : dict, optional
        Keyword arguments of :func:`vtprune.alvts.calibrate` (``batches`` required, ``steps``, ``lr``, ...),
        run at :meth:`prepare` from the initial factors.
    skipped_as_keys : bool, default False
        Whether skipped tokens still serve as keys/values of the layer's attention; only ``False`` exists.
    backend : "auto" | "reference" | "triton" | "cuda"

    Decisions where the paper is silent
    -----------------------------------
    * **First layers.** Layer 0 runs in full by default (``first_layer=1``; ``first_layer=0`` routes every
      layer as the paper states). Layer 0 sees raw, uncontextualised embeddings, whose selector scores say
      little; and with a KV cache a full layer 0 holds the whole sequence, so ``past_key_values.get_seq_length()``
      (layer 0 by default in transformers' generation and mask code) stays the true length. The price: at
      keep 64 of 576 (K ~ 138 of L ~ 650) one full layer of 32 adds ~12% to the routed model's layer FLOPs
      (3% of the unpruned model's); ``first_layer=0`` is the setting for reproducing the paper's numbers.
    * **Skipped tokens are not keys** (``skipped_as_keys=False``): the paper sends only the selected tokens
      "through the layer", and only then does the attention cost shrink to K^2; with the KV cache each layer
      caches just its routed tokens. Serving skipped tokens as keys would need their K/V projections inside
      the layer's own attention module, which the Hugging Face modules cannot take; not offered.
    * **Positions are the original ones**: each routed token keeps its RoPE position in the full sequence
      (the routed ``(cos, sin)`` are gathered, causal order = original order). Re-compacting per layer would
      give a token a different position in every layer and break the shared decode positions.
    * **Batches with different image counts.** The routed count K must be uniform over the batch. Each row
      routes its real text tokens and its top ``k_b`` image tokens; ``K = max_b (text_b + k_b)``, and rows
      that need fewer fill the difference first with their own padding positions, then with their next-best
      image tokens (*fill* tokens, :attr:`Route.fill`). Neither padding nor a fill token is a key of the layer's
      attention (both are False in the routed key padding mask, and stay masked in the layer's KV cache while
      decoding), and a fill token's hidden state is put back after the layer, so it is exactly as if it had
      skipped the layer: a row's output does not depend on its batch-mates. Only the real routed image tokens
      (``k_b``) count in the statistics. A padded row (fewer image tokens than the longest row) does not push
      the others' K up. Keep-all routes all L positions (no fill). A row without an image (count 0) routes its
      text.
    * **Biases** (Qwen2's q/k biases) are left out of the SVD initialisation (see
      :mod:`vtprune.alvts.factors`: the key bias cancels in the softmax, the query bias's per-key prior cannot
      be expressed by the selector); calibration fits against the biased, RoPE'd attention.

    One ``ALVTS`` object may serve several models at once, also from several threads: :meth:`prepare` builds (or
    calibrates) the factors of each language model separately, every call finds the factors of the model its
    decoder layer belongs to, and nothing of a call is kept on the object (the per-forward routing plan lives in
    the ``scratch`` dict the caller passes).

    Integration API: :meth:`prepare` once per model, :meth:`layers_routed`, then per routed layer either
    :meth:`route` + :func:`vtprune.ops.routed_layer` (masking the fill tokens and restoring their rows, as
    :meth:`forward_layer` does), or :meth:`forward_layer` which does norm, route, mask and routed layer in one
    call.

    Example
    -------
    >>> handle = vtprune.apply(model, ALVTS(keep=64))
    """

    name = "alvts"

    def __init__(self, keep: int | None = _KEEP_DEFAULT, *, ratio: float | None = None, average: float | None = None,
                 rank: int | None = None, first_layer: int = 1,
                 factors: SelectorFactors | str | os.PathLike | None = None, calibration: dict | None = None,
                 skipped_as_keys: bool = False, backend: str = "auto"):
        average = check_average("ALVTS", average)
        exclusive("ALVTS", average, keep=keep is not _KEEP_DEFAULT, ratio=ratio is not None)
        if average is not None:
            keep = None
        elif ratio is not None:
            if keep is not _KEEP_DEFAULT:
                raise ValueError(f"ALVTS: give keep= or ratio=, not both (got keep={keep!r}, ratio={ratio!r})")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"ALVTS ratio must be a float in (0, 1], got {ratio!r}")
            keep = None
        elif keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"ALVTS keep must be a positive int or None, got {keep!r}")
        keep = None if keep is None else int(keep)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"ALVTS rank must be a positive int or None, got {rank!r}")
        if isinstance(first_layer, bool) or not isinstance(first_layer, int) or first_layer < 0:
            raise ValueError(f"ALVTS first_layer must be an int >= 0, got {first_layer!r}")
        if factors is not None and not isinstance(factors, (SelectorFactors, str, os.PathLike)):
            raise ValueError(f"ALVTS factors must be SelectorFactors, a path or None, got {type(factors).__name__}")
        if calibration is not None and (not isinstance(calibration, dict) or "batches" not in calibration):
            raise ValueError("ALVTS calibration must be a dict of vtprune.alvts.calibrate keyword arguments with "
                             f"'batches', got {calibration!r}")
        if skipped_as_keys is not False:
            raise ValueError("ALVTS skipped_as_keys=True is not supported: skipped tokens would need K/V inside the "
                             "layer's own attention module; only skipped_as_keys=False (the paper's routing) exists")
        if backend not in BACKENDS:
            raise ValueError(f"ALVTS backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(backend)
        self.keep, self.ratio, self.rank, self.first_layer = keep, ratio, rank, first_layer
        self.average = average
        self.factors, self.calibration = factors, calibration
        self.skipped_as_keys = False
        # language model -> its factors (one entry per prepared model; dropped with the model)
        self._prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def keep_all(self) -> bool:
        return self.keep is None and self.ratio is None and self.average is None

    def __repr__(self) -> str:
        budget = f"average={self.average:g}" if self.average is not None else \
            f"ratio={self.ratio}" if self.ratio is not None else f"keep={self.keep}"
        return f"ALVTS({budget}, rank={self.rank}, first_layer={self.first_layer}, backend={self.backend!r})"

    # ------------------------------------------------------------------ the method's hooks
    def hooks(self, num_layers: int) -> Hooks:
        """ALVTS uses only the layer hook (:meth:`run_layer`): no encoder stage, nothing is dropped."""
        return Hooks()

    def check_model(self, info: ModelInfo) -> None:
        """Under ``average=``: refuse tiled images and an average the model's fixed-resolution images cannot
        reach."""
        if self.average is None:
            return
        refuse_tiled(repr(self), self.average, info.model)
        if info.patches is not None:
            self.average_k(int(info.patches), info.num_layers)

    def average_k(self, n: int, num_layers: int) -> int:
        """Under ``average=``: the image tokens routed per routed layer, ``k``, for an image of ``n`` tokens."""
        if self.first_layer >= num_layers:
            raise ValueError(f"{self!r}: first_layer={self.first_layer} routes none of the {num_layers} decoder "
                             "layers, so average= cannot be met")
        lengths = group_lengths((self.first_layer,), num_layers) if self.first_layer else (num_layers,)
        fixed = 1 if self.first_layer else 0
        return fit_average(self.average, n, lengths, ("level",), fixed, repr(self),
                           f"the layers before first_layer={self.first_layer} run on every visual token")[-1]

    def _depth(self) -> int:
        """The decoder depth ``average=`` is solved for: the prepared models' (:meth:`prepare` admits one)."""
        depths = {len(state.attn) for state in list(self._prepared.values())}
        if len(depths) != 1:
            raise ValueError(f"{self!r}: average= needs the model's depth: call prepare(language_model) first, or "
                             "pass num_layers")
        return depths.pop()

    def run_layer(self, call: LayerCall):
        """A routed layer's call: in prefill the routed tokens run the layer (:meth:`forward_layer`) and the others
        pass through; while decoding every new token runs against the layer's own (routed) cache
        (:mod:`vtprune.methods.routing`). Layers before ``first_layer`` run unchanged."""
        return run_routed_layer(self, call)

    # ------------------------------------------------------------------ model-facing API
    def prepare(self, language_model, vlm=None) -> SelectorFactors:
        """Build (SVD), load or calibrate the selector factors of every decoder layer; cached per model.

        Each layer's ``U, V`` are stored on that layer's device and in its dtype. Several models may be prepared
        (each keeps its own factors). Returns the factors.

        Parameters
        ----------
        language_model : the decoder whose layers are routed (e.g. ``vlm.model.language_model``)
        vlm : the whole vision-language model, optional. Calibration batches that carry images
            (``pixel_values``, ...) run through it, so the layers are calibrated on encoded image tokens;
            ``vtprune.apply`` passes it. Without it, calibration batches run through ``language_model`` and
            must hold only what its forward takes (``input_ids`` / ``inputs_embeds``, ``attention_mask``, ...).
        """
        state = self._prepared.get(language_model)
        if state is not None:
            return state.factors
        layers = decoder_layers(language_model)
        if self.average is not None and self._prepared and self._depth() != len(layers):
            raise ValueError(f"{self!r}: average= solves k for one model depth, but this object already serves a "
                             f"model of {self._depth()} decoder layers and this one has {len(layers)}; use one "
                             "ALVTS object per model depth")
        if vlm is not None and not any(m is language_model for m in vlm.modules()):
            raise ValueError(f"vlm: a {type(vlm).__name__} that does not contain the given language model "
                             f"({type(language_model).__name__})")
        factors = self.factors
        if isinstance(factors, (str, os.PathLike)):
            factors = SelectorFactors.load(factors)
        elif factors is None:
            factors = init_factors(layers, self.rank)
        # layer count, width and (when recorded) the model fingerprint
        path = isinstance(self.factors, (str, os.PathLike))
        factors.check_model(layers, source=f"factors file {os.fspath(self.factors)!r}" if path else "factors")
        if self.rank is not None and factors.rank != self.rank:
            raise ValueError(f"factors have rank {factors.rank}, ALVTS was given rank={self.rank}")
        if self.calibration is not None:
            options = dict(self.calibration)
            batches = options.pop("batches")
            if not all(isinstance(b, dict) and "hidden_states" in b for b in batches):
                # run the batches through the VLM (images encoded), record the first decoder layer's inputs
                batches = capture_layer_inputs(language_model if vlm is None else vlm, batches, layers=layers)
            factors = calibrate(layers, batches, factors=factors, **options)
        uv = []
        for i, layer in enumerate(layers):
            w = layer.self_attn.q_proj.weight
            u, v = factors[i]
            if w.device.type != "meta":  # offloaded weights (accelerate): resolved at call time instead
                u, v = u.to(w.device, w.dtype), v.to(w.device, w.dtype)
            uv.append((u, v))
        self._prepared[language_model] = _Prepared(factors, uv, [layer.self_attn for layer in layers], {})
        return factors

    def prepare_copy(self, source, copy) -> None:
        """Register ``copy`` (a deep copy of the prepared language model ``source``) with ``source``'s factors, so a
        copied model routes as the original without building or calibrating them again."""
        state = self._prepared.get(source)
        if state is None or copy in self._prepared:
            return
        layers = decoder_layers(copy)
        self._prepared[copy] = _Prepared(state.factors, list(state.uv), [layer.self_attn for layer in layers], {})

    def selector_factors(self, layer_idx: int, layer=None, *, like: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` of decoder layer ``layer_idx`` as :meth:`route` uses them.

        ``layer`` (the decoder layer itself) picks the model when this object was prepared for several. ``like``:
        a tensor whose device and dtype the factors must have (the layer's input at call time, so the factors
        follow ``model.to(dtype)`` and offloading); one converted copy is cached per (device, dtype). Without it,
        the layer's device and dtype at :meth:`prepare`.
        """
        state = self._state(layer_idx, layer)
        uv = state.uv
        if not 0 <= layer_idx < len(uv):
            raise ValueError(f"layer_idx must be in [0, {len(uv)}), got {layer_idx}")
        u, v = uv[layer_idx]
        if like is None or (u.device == like.device and u.dtype == like.dtype):
            return u, v
        if u.device.type == "meta":
            raise ValueError(f"ALVTS: the selector factors of layer {layer_idx} are on the meta device (the model "
                             "was offloaded when they were built); pass factors= (a SelectorFactors or a file)")
        key = (layer_idx, like.device, like.dtype)
        moved = state.moved.get(key)
        if moved is None:  # a dict write is atomic: two threads at worst both convert
            moved = state.moved[key] = (u.to(like.device, like.dtype), v.to(like.device, like.dtype))
        return moved

    def _state(self, layer_idx: int, layer) -> _Prepared:
        """The prepared model whose decoder layer ``layer_idx`` is ``layer`` (matched by its attention module,
        so a shallow copy of the layer matches too); with ``layer=None`` the only prepared model."""
        states = list(self._prepared.values())
        if not states:
            raise ValueError("ALVTS.route: call prepare(language_model) first (no selector factors yet)")
        if layer is None:
            if len(states) > 1:
                raise ValueError(f"ALVTS is prepared for {len(states)} models: pass layer= (the decoder layer) so "
                                 "route / selector_factors use that model's selector factors")
            return states[0]
        attn = getattr(layer, "self_attn", None)
        for state in states:
            if 0 <= layer_idx < len(state.attn) and state.attn[layer_idx] is attn:
                return state
        raise ValueError(f"layer: not decoder layer {layer_idx} of a model this ALVTS was prepared for "
                         "(call prepare(language_model) for its model first)")

    def layers_routed(self, num_layers: int) -> list[bool]:
        """Per decoder layer, whether :meth:`route` decides its tokens (False: the layer runs on all)."""
        return [i >= self.first_layer for i in range(num_layers)]

    def visual_budget(self, counts: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Image tokens routed per row, ``k_b``, from the rows' image counts (int64 [B] on the CPU). ``num_layers``
        (under ``average=``): the model's depth, by default the prepared models' one."""
        if self.keep_all:
            return counts.clone()
        if self.average is not None:
            depth = self._depth() if num_layers is None else num_layers
            return torch.tensor([self.average_k(int(n), depth) if n > 0 else 0 for n in counts], dtype=torch.int64)
        if self.ratio is not None:
            # floor(r N); the tiny slack absorbs float error such as (64 / 576) * 576 = 63.999...
            return torch.tensor([math.floor(self.ratio * int(n) + 1e-9) for n in counts], dtype=torch.int64)
        return counts.clamp(max=self.keep)

    def unit_budgets(self, spans: torch.Tensor) -> torch.Tensor:
        """Image tokens routed per image unit, int64 [B, S], from host spans [B, S, 2] (or [B, 2], one unit per
        row): :meth:`visual_budget` of each unit's count."""
        counts = _units(spans)[..., 1]
        return self.visual_budget(counts.flatten()).view(counts.shape)

    def _batch_plan(self, visual_spans, key_padding_mask, L: int, device, scratch: dict | None) -> _BatchPlan:
        """The routing plan of this batch (see :class:`_BatchPlan`): one host read (the rows' real-token counts)
        per forward pass, none per layer.

        Cached in ``scratch`` (the caller's per-forward dict; never on this object, which may serve several models
        and threads) on the identity of the span and mask tensors, which the model patch passes unchanged to every
        layer of a forward pass.
        """
        if scratch is not None:
            pk = scratch.get("alvts_plan")
            if pk is not None and pk[0] is visual_spans and pk[1] is key_padding_mask and pk[2:4] == (L, device):
                return pk[4]
        spans = _units(visual_spans.detach().cpu())
        B, S = spans.shape[:2]
        k_unit = self.unit_budgets(spans)  # [B, S]: the budget is per unit
        k, counts = k_unit.sum(1), spans[..., 1].sum(1)
        known = None if scratch is None else scratch.get("real_tokens")  # the model patch's host counts
        if key_padding_mask is None:
            real = torch.full_like(counts, L)
        elif known is not None and known.shape == counts.shape:
            real = known
        else:
            real = key_padding_mask.sum(1).cpu()
        need = real - counts + k  # text + k per row
        K = L if self.keep_all else max(1, int(need.max()))
        slack = K - need  # routed beyond each row's own text + k: its padding first, then its fill image tokens
        pad_fill = torch.minimum(L - real, slack)
        fill = int((slack - pad_fill).max())
        # one scoring entry per (row, unit), row-major; lowrank_scores needs a non-empty span: an absent unit
        # scores a 1-token dummy, ignored below
        flat = spans.reshape(B * S, 2)
        score_spans = torch.stack([flat[:, 0].clamp(max=L - 1), flat[:, 1].clamp(min=1)], 1)
        plan = _BatchPlan(to_device_i64(k_unit.flatten(), device), to_device_i64(flat, device), K, score_spans, fill,
                          bool((pad_fill > 0).any()) or fill > 0, S)
        if scratch is not None:
            scratch["alvts_plan"] = (visual_spans, key_padding_mask, L, device, plan)
        return plan

    def route(self, layer_idx: int, normed_hidden: torch.Tensor, visual_spans: torch.Tensor,
              key_padding_mask: torch.Tensor | None, *, layer=None, scratch: dict | None = None) -> Route:
        """Which positions run through decoder layer ``layer_idx``: a :class:`Route` (``idx [B, K]`` ascending,
        the ``fill`` marks and the host flag ``masked``).

        Every real text token, the ``k`` highest-scoring tokens of each image unit (``visual_budget`` of the
        unit's count; selector scores of :func:`vtprune.ops.lowrank_scores` on ``normed_hidden``, each unit scored
        as the visual span of its row), then padding and next-best image tokens (fill) to bring rows up to the
        batch's uniform K (see the class docstring). No host read except once per batch.

        Parameters
        ----------
        layer_idx : decoder layer index (selects its factors; :meth:`prepare` must have run)
        normed_hidden : Tensor [B, L, D]  the layer's input_layernorm applied to its input
        visual_spans : int64 Tensor [B, S, 2]  ``(start, count)`` of each image unit of a row (an image; a
            video's frame group; count 0: none), or [B, 2] for one unit per row
        key_padding_mask : bool Tensor [B, L] or None  True for a real token
        layer : the decoder layer, optional; needed when this object was prepared for several models (it picks
            the model's factors)
        scratch : dict, optional  the caller's per-forward-pass dict: the batch plan is computed once per pass and
            kept there (without it, once per call)

        Returns
        -------
        :class:`Route`, tensors on normed_hidden's device.
        """
        u, v = self.selector_factors(layer_idx, layer, like=normed_hidden)
        B, L, _ = normed_hidden.shape
        dev = normed_hidden.device
        plan = self._batch_plan(visual_spans, key_padding_mask, L, dev, scratch)
        k, spans, S = plan.k, plan.spans, plan.units  # per scoring entry (row, unit): [B * S], [B * S, 2]
        h, kpm = normed_hidden, key_padding_mask
        if S > 1:
            # one scoring row per unit. Not the hidden states repeated: their low-rank projections [B, L, 2R], with
            # identity factors that pick them back out (a = h u, b = h v as the op computes them)
            R = u.shape[1]
            h = torch.cat([normed_hidden @ u, normed_hidden @ v], -1).repeat_interleave(S, 0)
            eye = torch.eye(R, dtype=u.dtype, device=dev)
            u, v = torch.cat([eye, torch.zeros_like(eye)]), torch.cat([torch.zeros_like(eye), eye])
            kpm = None if kpm is None else kpm.repeat_interleave(S, 0)
        scores = lowrank_scores(h, u, v, visual_spans=plan.score_spans, key_padding_mask=kpm,
                                backend=self.backend)  # [B * S, V] float32
        del h
        E, Vm = scores.shape
        t = torch.arange(Vm, device=dev)
        valid = t < spans[:, 1:]  # [E, V]
        # rank of each token in its unit: score descending, ties to the lower position (stable sort)
        order = torch.sort(torch.where(valid, scores, -1.0), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, t.expand(E, Vm).contiguous())
        picked = valid & (rank < k[:, None])
        real = torch.ones(B, L, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
        prio = torch.where(real, _TEXT, _PADDING)  # [B, L]
        vis_prio = torch.where(picked, _PICKED, 0.5 * scores)  # [E, V]
        vpos = (spans[:, :1] + t).clamp(max=L - 1)  # [E, V]
        # write every unit's priorities at their positions in its row; entries past a unit's count go to a dump
        # column L
        at = torch.where(valid, vpos, L).view(B, S * Vm)
        prio = torch.cat([prio, prio.new_zeros(B, 1)], 1).scatter_(1, at, vis_prio.view(B, S * Vm))[:, :L]
        idx = topk_keep_order(prio, plan.K, backend=self.backend)
        # fill: routed image tokens below the picked ones (their priorities are halved scores, under _PADDING)
        fill = prio.gather(1, idx) < _PADDING if plan.fill else None
        return Route(idx, fill, plan.fill, plan.masked)

    def forward_layer(self, layer_idx: int, layer, hidden_states: torch.Tensor, *, visual_spans, key_padding_mask,
                      position_embeddings, config, past_key_values=None, past_key_padding_mask=None,
                      scratch: dict | None = None,
                      **layer_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Norm, route, mask and :func:`vtprune.ops.routed_layer` for one routed layer call (in place).

        Fill tokens (:attr:`Route.fill`) are masked as keys and their rows restored after the layer: a small
        ``[B, F, D]`` copy of their inputs, F the most fill tokens of a row (none is made when no row has any).

        Parameters
        ----------
        layer_idx, layer : the decoder layer and its index
        hidden_states : Tensor [B, L, D]  the layer's input, updated in place
        visual_spans, key_padding_mask : as in :meth:`route` (key_padding_mask covers the L current tokens)
        position_embeddings : (cos, sin) of the L current tokens
        config : the language model's config (its attention backend decides the mask's form)
        past_key_values : Cache, optional; the layer caches only its routed tokens
        past_key_padding_mask : bool [B, P], optional  key padding of the P tokens this layer has cached (the
            third value this method returned for them); None: all of them are keys
        scratch : dict, optional  per-forward-pass dict (see :meth:`route`)
        **layer_kwargs : passed to the layer (``use_cache``, ...)

        Returns
        -------
        (hidden_states, routed_idx [B, K], routed key padding mask): the last is bool [B, K], False for the
        routed padding and fill tokens, or None when every routed token is a key (known on the host, no device
        read). Keep it to decode against this layer's cache later (``past_key_padding_mask``).
        """
        if torch.is_grad_enabled() and (hidden_states.requires_grad or layer.self_attn.q_proj.weight.requires_grad):
            # the routed layer writes its output into hidden_states in place, which autograd cannot differentiate
            raise RuntimeError("ALVTS is inference only: run the model under torch.no_grad() or "
                               "torch.inference_mode() (gradients are enabled and the layer's inputs or weights "
                               "require grad)")
        normed = layer.input_layernorm(hidden_states)
        r = self.route(layer_idx, normed, visual_spans, key_padding_mask, layer=layer, scratch=scratch)
        del normed
        B, L, D = hidden_states.shape
        dev = hidden_states.device
        idx = r.idx
        routed_kpm = None
        if r.masked:
            routed_kpm = torch.ones(B, idx.shape[1], dtype=torch.bool, device=dev) if key_padding_mask is None \
                else key_padding_mask.bool().gather(1, idx)
            if r.fill is not None:
                routed_kpm = routed_kpm & ~r.fill
        P = 0 if past_key_values is None else int(past_key_values.get_seq_length(layer_idx))
        kpm = None  # [B, P + K] keys of this call: cached, then routed
        if routed_kpm is not None or (P > 0 and past_key_padding_mask is not None):
            past = past_key_padding_mask if past_key_padding_mask is not None else \
                torch.ones(B, P, dtype=torch.bool, device=dev)
            cur = routed_kpm if routed_kpm is not None else torch.ones(B, idx.shape[1], dtype=torch.bool, device=dev)
            kpm = torch.cat([past.to(dev).bool(), cur], 1)
        # the routed columns are already gathered: index them with arange over the last K columns
        mask = routed_attention_mask(config, _compact_index(B, idx.shape[1], dev), kpm, past_key_values,
                                     layer_idx=layer_idx, dtype=hidden_states.dtype, materialize=kpm is not None)
        saved = None
        if r.fill is not None:
            # the fill tokens first in each row (F slots; rows with fewer fill them with distinct non-fill routed
            # positions, whose post-layer value is written back unchanged)
            slots = r.fill.to(torch.int8).topk(r.num_fill, dim=1).indices  # [B, F]
            pos = idx.gather(1, slots)[:, :, None].expand(B, r.num_fill, D)
            saved = (pos, r.fill.gather(1, slots)[:, :, None], hidden_states.gather(1, pos))
        out = routed_layer(layer, hidden_states, idx, position_embeddings=position_embeddings, attention_mask=mask,
                           past_key_values=past_key_values, backend=self.backend, **layer_kwargs)
        if saved is not None:
            pos, is_fill, before = saved
            out.scatter_(1, pos, torch.where(is_fill, before, out.gather(1, pos)))
        return out, idx, routed_kpm


def _units(spans: torch.Tensor) -> torch.Tensor:
    """Spans as [B, S, 2]: a [B, 2] tensor is one unit per row."""
    return spans[:, None] if spans.dim() == 2 else spans


class Route(NamedTuple):
    """What :meth:`ALVTS.route` decides for one layer call.

    idx : int64 Tensor [B, K]  routed positions, ascending per row
    fill : bool Tensor [B, K] or None  True for an image token routed only to bring its row up to the batch's
        uniform K (not one of the row's top ``k``): it must not be a key and must leave the layer unchanged.
        None when no row has one (known on the host).
    num_fill : int  the most fill tokens in one row (0 when ``fill`` is None)
    masked : bool  whether any routed token (padding or fill) must be masked as a key; False: the routed
        sequence needs only the causal mask (known on the host, no device read)
    """

    idx: torch.Tensor
    fill: torch.Tensor | None
    num_fill: int
    masked: bool


class _BatchPlan(NamedTuple):
    """Per forward pass, per scoring entry (row, unit; row-major, ``units`` per row): ``k`` [B * S] and ``spans``
    [B * S, 2] on the device; the uniform ``K``, the spans for scoring [B * S, 2] on the CPU, the most fill image
    tokens of a row and whether any routed token is padding or fill."""

    k: torch.Tensor
    spans: torch.Tensor
    K: int
    score_spans: torch.Tensor
    fill: int
    masked: bool
    units: int = 1


class _Prepared(NamedTuple):
    """One prepared language model: its factors, per layer ``(U, V)`` on the layer's device and dtype at
    :meth:`ALVTS.prepare` (where they stay when the layer was offloaded), its layers' attention modules (to recognise
    the model from a layer), and copies converted at call time, per ``(layer, device, dtype)``."""

    factors: SelectorFactors
    uv: list
    attn: list
    moved: dict


def _compact_index(B: int, K: int, device) -> torch.Tensor:
    return torch.arange(K, device=device).expand(B, K)
