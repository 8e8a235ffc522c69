"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): full-attention ViT with a 2x2 patch merger and deepstack
mergers, Qwen3 LLM (grouped-query attention with q/k RMS norms) with interleaved 3-D M-RoPE.

What it shares with Qwen2.5-VL (:mod:`vtprune.models.qwen2_5_vl`, whose docstring explains the choices): the
visual-to-visual score of a ViT without [CLS] (:class:`~vtprune.models.qwen2_5_vl.VisionScores`, the 2x2-group
mean of the patches' scores and keys), the ratio budgets of dynamic resolutions, no square patch grid to pool,
and the positions: every kept token keeps its original 3-D position (a contextual token takes its target's), so
``rope_deltas`` and decoding are the unpruned model's. The interleaving of the M-RoPE frequencies happens in the
rotary embedding, from the same ``[3, B, L]`` positions.

What differs:

* **Vision tower.** Every block is full attention (no windows, so no window order to undo): the encoder hook's
  scores come from the **last block**, whose output the merger turns into the language model's tokens;
  ``cu_seqlens`` chunks are single images or single frame groups of a video.
* **q/k norms.** The decoder's q and k pass a per-head RMS norm before RoPE; the q/k recompute of the decoder hooks
  (:func:`vtprune.models._qk.decoder_qk`) applies them, and so do the low-rank selector factors
  (:mod:`vtprune.alvts.factors`) and their calibration.
* **Deepstack.** The ViT blocks ``deepstack_visual_indexes`` feed extra mergers; their outputs (one ``[M, D]``
  per level) are added to the image positions after decoder layers ``0, 1, ...``. Pruning carries them with
  the tokens: the encoder hook selects and merges ``[features | deepstack levels]`` as one wide token
  (``EncoderContext.tokens``), so a dropped token's deepstack features are dropped with it and a merged token
  gets the merged features with the same merge weights. In the language model every level is kept aligned with
  the current sequence as a ``[B, L, D]`` tensor (zero off the image tokens) and added to the input of the layer
  after its own (:class:`DeepstackDecoder`); a decoder hook that prunes before a level has been added selects
  and merges the pending levels together with the hidden states, again as one wide token
  (``PruneContext.tokens``). A hook after layer ``j`` scores the hidden states *with* level ``j`` added, as the
  next layer sees them (``PruneContext.hidden``); level ``j`` itself is selected and merged with the tokens and
  added at the next layer's input, so the layers' recorded outputs (``output_hidden_states``) are the unpatched
  model's.
* **Videos.** ``pixel_values_videos`` are supported: Qwen3-VL's prompt puts a timestamp before each frame group,
  so every frame group is its own visual span and unit of the encoder hook (budgets per frame group). Methods
  that read one span per row in the language model (decoder or layer hooks) therefore take a one-frame-group
  video only and refuse more with an error; encoder-only methods take any number of images and frame groups,
  also mixed in one prompt (one vision-tower call; the units are put back in prompt order from the placeholder
  runs).
"""

from __future__ import annotations

import torch

from vtprune.models._decoder import DecoderPatch
from vtprune.models._patch import Encoded
from vtprune.models.qwen2_5_vl import Qwen2_5_VLPatch, VisionScores, select_per_unit

CLASS_NAME = "Qwen3VLForConditionalGeneration"
_DEEPSTACK = "qwen3_vl_deepstack"  # key of the prefill call's Deepstack in Call.scratch


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
    (the output of the last layer for the last one), and a decoder hook selects and merges the pending levels
    with the hidden states (see the module docstring). Decode calls carry no deepstack (as in the unpatched
    model)."""

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

    def _prune(self, call, after, g, hidden, layer_in, kwargs, tokens=None):
        ds = call.scratch.get(_DEEPSTACK)
        if ds is None or not ds.pending:
            return super()._prune(call, after, g, hidden, layer_in, kwargs, tokens)
        # scored as the next layer sees it: with the level of the layer that just ran added. That level stays
        # pending (selected and merged with the others) and is added at the next layer's input as usual, so the
        # layer's recorded output is the unpatched model's (before the deepstack add)
        level = ds.pending.get(after - 1)
        scored = hidden if level is None else hidden + level.to(hidden.dtype)
        levels = sorted(ds.pending)
        D = hidden.shape[-1]
        wide = torch.cat([hidden, *(ds.pending[j].to(hidden.dtype) for j in levels)], -1)
        out = super()._prune(call, after, g, scored, layer_in, kwargs, tokens=wide)
        for n, j in enumerate(levels, 1):
            ds.pending[j] = out[..., n * D:(n + 1) * D]
        return out[..., :D]


class Qwen3VLPatch(Qwen2_5_VLPatch):
    family = "Qwen3-VL"
    decoder_patch = DeepstackDecoder

    def __init__(self, model, method, hooks, restore):
        self.kinds = ()  # what the current prefill holds: "image", "video"
        super().__init__(model, method, hooks, restore)

    def install_scores(self, restore) -> None:
        if self.hooks.encoder and self.hooks.encoder_scores:  # every block is full attention: score the last
            self.scores = VisionScores(self.mm.visual.blocks[-1].attn, self.backend, restore)

    def is_prefill(self, a) -> bool:
        return a.get("pixel_values") is not None or a.get("pixel_values_videos") is not None

    def placeholders(self, input_ids):
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    # ------------------------------------------------------------------ vision tower + encoder hook
    def encode(self, a) -> Encoded:
        """Per unit (an image, or one frame group of a video), in prompt order: its tokens with the deepstack
        levels appended along the channels (``[S, D * (1 + levels)]``), through the method's encoder hook."""
        self._held(a)
        # one tower call for every image and video
        grid = torch.cat([a[f"{k}_grid_thw"] for k in self.kinds])
        pixels = torch.cat([a["pixel_values" if k == "image" else "pixel_values_videos"] for k in self.kinds])
        visual = self.mm.visual
        if self.scores is not None:
            self.scores.enabled = True
        try:
            out = visual(pixels.type(visual.dtype), grid_thw=grid)
        finally:
            if self.scores is not None:
                self.scores.enabled = False
        wide = torch.cat([out.pooler_output, *out.deepstack_features], -1)  # [M, D * (1 + levels)]
        unit = visual.spatial_merge_size**2
        sizes = (grid[:, 1:].prod(-1) // unit).repeat_interleave(grid[:, 0]).tolist()  # per image / frame group
        scores = metric = None
        if self.scores is not None:  # patch level -> merged-token level: mean over each 2x2 group (no windows)
            scores = self.scores.scores.view(-1, unit).mean(1)
            metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)
        order = list(range(len(sizes)))
        if len(self.kinds) == 2:  # images and videos in one call: the units in the prompts' order
            ids = a["input_ids"]
            n_image = int(a["image_grid_thw"][:, 0].sum())
            order = _prompt_order(self.placeholders(ids), ids == self.config.video_token_id, sizes[:n_image],
                                  sizes[n_image:])
            index = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[:i + 1])) for i in order]).to(wide.device)
            wide, sizes = wide[index], [sizes[i] for i in order]
            scores, metric = (None, None) if scores is None else (scores[index], metric[index])
        if not self.hooks.encoder:
            return Encoded(wide, sizes, sizes)
        return select_per_unit(self, wide, scores, metric, sizes, "image or frame group")

    def _held(self, a) -> None:
        """What the prefill holds (``self.kinds``: "image", "video"), each with its grid."""
        self.kinds = tuple(k for k, key in (("image", "pixel_values"), ("video", "pixel_values_videos"))
                           if a.get(key) is not None)
        for k in self.kinds:
            if a.get(f"{k}_grid_thw") is None:
                raise ValueError(f"vtprune: {self.family} needs {k}_grid_thw with "
                                 f"{'pixel_values' if k == 'image' else 'pixel_values_videos'}")

    def _check_images_per_row(self, per_row: list) -> None:
        if "video" in self.kinds and self._reads_spans and any(n > 1 for n in per_row):
            raise ValueError(f"{type(self.method).__name__} ranks one visual span per prompt in the language "
                             f"model, and each frame group of a Qwen3-VL video is its own span (a timestamp "
                             f"separates them): batch rows hold {per_row} images and frame groups (use one image "
                             "or a one-frame-group video per prompt, or an encoder-only method)")
        super()._check_images_per_row(per_row)

    # ------------------------------------------------------------------ prefill
    def prefill_embeds(self, call, embeds):
        """The deepstack channels come off the compacted prompt into the call's :class:`Deepstack`."""
        D = self.mm.get_input_embeddings().embedding_dim
        call.scratch[_DEEPSTACK] = Deepstack(list(embeds[..., D:].split(D, -1)))
        return embeds[..., :D]

    def prefill_arguments(self, a) -> None:
        for key in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "pixel_values_videos"):
            a.pop(key, None)

    def positions(self, a, input_ids, mask, placeholders):
        """3-D positions [3, B, L] of the unpruned prompt: the given ones (generate passes [4, B, L], text
        positions first) or ``get_rope_index`` as the unpatched forward computes them (also setting
        ``rope_deltas`` for decoding)."""
        self._held(a)
        positions = a.get("position_ids")
        if positions is not None:
            if positions.dim() == 3 and positions.shape[0] in (3, 4):
                return positions[-3:]
            raise ValueError(f"vtprune: {self.family} position_ids must be [3, B, L] or [4, B, L] with an image or "
                             f"video, got shape {tuple(positions.shape)}")
        types = a.get("mm_token_type_ids")
        if types is None:
            types = (input_ids == self.config.image_token_id).int() + 2 * (input_ids == self.config.video_token_id)
        positions, deltas = self.mm.get_rope_index(input_ids, mm_token_type_ids=types,
                                                   image_grid_thw=a.get("image_grid_thw"),
                                                   video_grid_thw=a.get("video_grid_thw"), attention_mask=mask)
        self.mm.rope_deltas = deltas
        return positions


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
