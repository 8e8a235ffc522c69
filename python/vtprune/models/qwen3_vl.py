"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): full-attention ViT with a 2x2 patch merger and deepstack
mergers, Qwen3 LLM (grouped-query attention with q/k RMS norms) with interleaved 3-D M-RoPE.

What it shares with Qwen2.5-VL (:mod:`vtprune.models.qwen2_5_vl`, whose docstring explains the choices): the
visual-to-visual score of a ViT without [CLS] (:class:`~vtprune.models.qwen2_5_vl.VisionScores`, the 2x2-group
mean of the patches' scores and keys), the ratio budgets of dynamic resolutions, no ``UniformPool``, and the
positions: every kept token keeps its original 3-D position (a contextual token takes its target's), so
``rope_deltas`` and decoding are the unpruned model's. The interleaving of the M-RoPE frequencies happens in the
rotary embedding, from the same ``[3, B, L]`` positions.

What differs:

* **Vision tower.** Every block is full attention (no windows, so no window order to undo): the encoder stage
  scores at the **last block**, whose output the merger turns into the language model's tokens; ``cu_seqlens``
  chunks are single images or single frame groups of a video.
* **q/k norms.** The decoder's q and k pass a per-head RMS norm before RoPE; the q/k recompute of the LLM stages
  (:func:`normed_qk`) applies them, and so do ALVTS's factors (:mod:`vtprune.alvts.factors`) and calibration.
* **Deepstack.** The ViT blocks ``deepstack_visual_indexes`` feed extra mergers; their outputs (one ``[M, D]``
  per level) are added to the image positions after decoder layers ``0, 1, ...``. Pruning carries them with
  the tokens: the encoder stage selects and merges ``[features | deepstack levels]`` as one wide token, so a
  dropped token's deepstack features are dropped with it and a merged token gets the merged features with the
  same merge weights. In the language model every level is kept aligned with the current sequence as a
  ``[B, L, D]`` tensor (zero off the image tokens) and added to the input of the layer after its own
  (:class:`DeepstackDecoder`); an LLM stage that prunes before a level has been added prunes and merges the
  pending levels together with the hidden states, again as one wide token. A stage after layer ``j`` scores
  the hidden states *with* level ``j`` added, as the next layer sees them.
* **Videos.** ``pixel_values_videos`` are supported: Qwen3-VL's prompt puts a timestamp before each frame group,
  so every frame group is its own visual span and unit of the encoder stage (budgets per frame group). Methods
  that rank one span per row in the language model (LLM stages, ALVTS) therefore take a one-frame-group video
  only and refuse more with an error; encoder-only methods (VisionZip, an encoder-only VisionDrop) take any
  number of images and frame groups, also mixed in one prompt (one vision-tower call; the units are put back
  in prompt order from the placeholder runs).
"""

from __future__ import annotations

import sys

import torch

from vtprune.models._decoder import DecoderPatch
from vtprune.models._patch import ModelPatch, bound_arguments, place_images
from vtprune.models.qwen2_5_vl import Qwen2_5_VLPatch, VisionScores, kept_positions, refuse_square_pool, select_per_unit

CLASS_NAME = "Qwen3VLForConditionalGeneration"
_DEEPSTACK = "qwen3_vl_deepstack"  # key of the prefill call's Deepstack in Call.scratch


def normed_qk(layer, hidden, position_embeddings):
    """Post-RoPE q, k of a decoder layer with per-head q/k norms (Qwen3), recomputed from its input: input norm,
    q/k projections, q/k RMS norms, RoPE at the current positions. Returns ``(q [B, H, L, d], k [B, Hkv, L, d],
    scale)``."""
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    B, L, _ = h.shape
    q = attn.q_norm(attn.q_proj(h).view(B, L, -1, attn.head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(B, L, -1, attn.head_dim)).transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, *position_embeddings)
    return q, k, float(attn.scaling)


class Deepstack:
    """The deepstack levels of one prefill not yet added, each ``[B, L, D]`` aligned with the current sequence
    (zero off the image tokens); level ``j`` belongs after decoder layer ``j``."""

    def __init__(self, levels: list):
        self.pending = dict(enumerate(levels))

    def add(self, level: int, hidden: torch.Tensor) -> torch.Tensor:
        f = self.pending.pop(level, None)
        return hidden if f is None else hidden + f.to(hidden.dtype)


class DeepstackDecoder(DecoderPatch):
    """The shared decoder patch plus Qwen3-VL's deepstack: level ``j`` is added to the input of layer ``j + 1``
    (the output of the last layer for the last one), and an LLM stage prunes the pending levels with the hidden
    states (see the module docstring). Decode calls carry no deepstack (as in the unpatched model)."""

    def _wrap(self, i, layer, original):
        inner = super()._wrap(i, layer, original)
        last = i == len(self.layers) - 1

        def forward(hidden_states, *args, **kwargs):
            call = self.active
            ds = None if call is None or self._in_hook else call.scratch.get(_DEEPSTACK)
            if ds is None:
                return inner(hidden_states, *args, **kwargs)
            out = inner(ds.add(i - 1, hidden_states), *args, **kwargs)
            if last:
                out = (ds.add(i, out[0]), *out[1:]) if isinstance(out, tuple) else ds.add(i, out)
            return out

        return forward

    def _prune(self, call, stage, g, hidden, score_in, score_layer, kwargs):
        ds = call.scratch.get(_DEEPSTACK)
        if ds is None or not ds.pending:
            return super()._prune(call, stage, g, hidden, score_in, score_layer, kwargs)
        added = ds.add(stage.layer - 1, hidden)  # the level of the layer that just ran, before it is scored
        score_in = added if score_in is hidden else score_in
        levels = sorted(ds.pending)
        if not levels:
            return super()._prune(call, stage, g, added, score_in, score_layer, kwargs)
        D = hidden.shape[-1]
        wide = torch.cat([added, *(ds.pending[j].to(hidden.dtype) for j in levels)], -1)
        out = super()._prune(call, stage, g, wide, score_in, score_layer, kwargs)
        for n, j in enumerate(levels, 1):
            ds.pending[j] = out[..., n * D:(n + 1) * D]
        return out[..., :D]


class Qwen3VLPatch(ModelPatch):
    family = "Qwen3-VL"

    def __init__(self, model, plan, restore):
        super().__init__(model, plan, restore)
        enc = plan.encoder
        refuse_square_pool(plan, self.family)
        visual = self.mm.visual
        self.scores = None if enc is None else VisionScores(visual.blocks[-1].attn, plan.backend, restore)
        self.decoder = DeepstackDecoder(self.lm, plan, normed_qk, restore)
        self.install(restore)

    def forward(self, original, args, kwargs):
        a = bound_arguments(original, args, kwargs)
        if a.get("pixel_values_videos") is not None:  # a video prefill (its pixel_values are None)
            return self._prefill(original, a)
        return super().forward(original, args, kwargs)

    # ------------------------------------------------------------------ vision tower + encoder stage
    def _encode(self, pixel_values, grid_thw):
        """Per unit (an image, or one frame group of a video), in prompt order: its tokens with the deepstack
        levels appended along the channels ``[n_i, D * (1 + levels)]``, and with an encoder stage the kept
        indices (``None`` without)."""
        visual = self.mm.visual
        if self.scores is not None:
            self.scores.enabled = True
        try:
            out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
        finally:
            if self.scores is not None:
                self.scores.enabled = False
        wide = torch.cat([out.pooler_output, *out.deepstack_features], -1)  # [M, D * (1 + levels)]
        unit = visual.spatial_merge_size**2
        sizes = (grid_thw[:, 1:].prod(-1) // unit).repeat_interleave(grid_thw[:, 0]).tolist()  # per frame group
        enc = self.plan.encoder
        if enc is None:
            return list(torch.split(wide, sizes)), None
        # patch level -> merged-token level: mean over each 2x2 group (consecutive patches, no window order)
        scores = self.scores.scores.view(-1, unit).mean(1)
        metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)
        return select_per_unit(self.plan, torch.split(wide, sizes), torch.split(scores, sizes),
                               torch.split(metric, sizes), "image or frame group")

    # ------------------------------------------------------------------ prefill
    def _prefill(self, original, a):
        input_ids, cache, mask_in = self._check_prefill(a)
        cfg = self.config
        kinds = [k for k in ("image", "video") if a.get("pixel_values" if k == "image" else "pixel_values_videos")
                 is not None]
        for k in kinds:
            if a.get(f"{k}_grid_thw") is None:
                raise ValueError(f"vtprune: Qwen3-VL needs {k}_grid_thw with "
                                 f"{'pixel_values' if k == 'image' else 'pixel_values_videos'}")
        B, L = input_ids.shape
        dev = input_ids.device
        image_ph, video_ph = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        placeholders = (image_ph & ("image" in kinds)) | (video_ph & ("video" in kinds))
        mask = mask_in if mask_in is not None else torch.ones(B, L, dtype=torch.long, device=dev)
        types = a.get("mm_token_type_ids")
        if types is None:
            types = image_ph.int() + 2 * video_ph.int()
        positions = self._positions(a, input_ids, mask, types)  # [3, B, L]

        # one tower call for every image and video; units (images, frame groups) then put in prompt order
        grid = torch.cat([a[f"{k}_grid_thw"] for k in kinds])
        pixels = torch.cat([a["pixel_values" if k == "image" else "pixel_values_videos"] for k in kinds])
        units, kept = self._encode(pixels, grid)
        unit = self.mm.visual.spatial_merge_size**2
        counts_in = (grid[:, 1:].prod(-1) // unit).repeat_interleave(grid[:, 0]).tolist()
        if len(kinds) == 2:
            n_image = int(a["image_grid_thw"][:, 0].sum())
            order = _prompt_order(placeholders, video_ph, counts_in[:n_image], counts_in[n_image:])
            units, counts_in = [units[i] for i in order], [counts_in[i] for i in order]
            kept = None if kept is None else [kept[i] for i in order]
        counts_out = [x.shape[0] for x in units]
        place = place_images(placeholders, mask_in, counts_in, counts_out)
        per_row = [len(i) for i in place.images_of_row]
        if "video" in kinds and self._reads_spans and any(n > 1 for n in per_row):
            raise ValueError(f"{type(self.plan.method).__name__} ranks one visual span per prompt in the language "
                             f"model, and each frame group of a Qwen3-VL video is its own span (a timestamp "
                             f"separates them): batch rows hold {per_row} images and frame groups (use one image "
                             "or a one-frame-group video per prompt, or an encoder-only method such as VisionZip)")
        self._check_images_per_row(per_row)
        seq, value_pos = kept_positions(positions, mask, placeholders, counts_in, kept, place)
        embeds = self.mm.get_input_embeddings()(input_ids)
        features = torch.cat(units).to(embeds.dtype)  # [S, D * (1 + levels)]
        D = embeds.shape[-1]
        # the deepstack levels ride along as extra channels (zero on text), so they are compacted with the tokens
        wide = torch.cat([embeds, embeds.new_zeros(B, L, features.shape[-1] - D)], -1)
        wide, _ = seq.compact(wide, place.keep, place.slots, features, value_pos, kept=place.kept,
                              dropped_padding=place.dropped)
        place.set_spans(seq, strict=self._reads_spans)
        call = self.decoder.prefill_call(seq, place.visual, None)
        call.orig_len = L
        call.scratch[_DEEPSTACK] = Deepstack(list(wide[..., D:].split(D, -1)))
        for key in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "pixel_values_videos"):
            a.pop(key, None)
        return self._run_prefill(original, a, call, wide[..., :D], cache)

    def _positions(self, a, input_ids, mask, types):
        """3-D positions [3, B, L] of the unpruned prompt: the given ones (generate passes [4, B, L], text
        positions first) or ``get_rope_index`` as the unpatched forward computes them (also setting
        ``rope_deltas`` for decoding)."""
        positions = a.get("position_ids")
        if positions is not None:
            if positions.dim() == 3 and positions.shape[0] in (3, 4):
                return positions[-3:]
            raise ValueError(f"vtprune: Qwen3-VL position_ids must be [3, B, L] or [4, B, L] with an image or "
                             f"video, got shape {tuple(positions.shape)}")
        positions, deltas = self.mm.get_rope_index(input_ids, mm_token_type_ids=types,
                                                   image_grid_thw=a.get("image_grid_thw"),
                                                   video_grid_thw=a.get("video_grid_thw"), attention_mask=mask)
        self.mm.rope_deltas = deltas
        return positions

    # decoding continues the unpruned model's 3-D positions exactly as for Qwen2.5-VL
    _decode_positions = Qwen2_5_VLPatch._decode_positions


def _prompt_order(placeholders, video, image_counts: list, video_counts: list) -> list:
    """Images and videos in one call: the order of the units (images ``0..I-1``, then frame groups) in the
    prompts, row-major. Each run of same-kind placeholders in a row takes the next units of its kind until its
    length is used up; one host read of the runs' kinds and lengths."""
    B, L = placeholders.shape
    kind = video.long()
    prev_ph = torch.nn.functional.pad(placeholders[:, :-1], (1, 0), value=False)
    prev_kind = torch.nn.functional.pad(kind[:, :-1], (1, 0))
    starts = placeholders & (~prev_ph | (prev_kind != kind))
    run = starts.flatten().long().cumsum(0) - 1  # run index of every position (row-major)
    ph = placeholders.flatten()
    n_runs = int(starts.sum())
    lengths = torch.zeros(n_runs, dtype=torch.long, device=run.device).index_add_(0, run[ph], torch.ones_like(run[ph]))
    run_kinds = kind.flatten()[starts.flatten()]
    queues = [list(range(len(image_counts))), [len(image_counts) + i for i in range(len(video_counts))]]
    counts = list(image_counts) + list(video_counts)
    order = []
    for k, n in zip(run_kinds.tolist(), lengths.tolist()):
        while n > 0 and queues[k]:
            i = queues[k].pop(0)
            order.append(i)
            n -= counts[i]
        if n != 0:
            raise ValueError(f"the prompts' {'video' if k else 'image'} placeholder runs do not match the "
                             f"{'videos (frame groups)' if k else 'images'} given (their sizes or count)")
    if any(queues):
        raise ValueError(f"the prompts hold placeholders for fewer images / frame groups than given "
                         f"({len(queues[0])} images and {len(queues[1])} frame groups left over)")
    return order
