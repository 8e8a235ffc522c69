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
  so every frame group is its own unit (span) for every hook, with its own budget, like an image. Any number of
  images and frame groups may be mixed in one prompt (one vision-tower call; the units are put back in prompt
  order from the placeholder runs).
"""

from __future__ import annotations

import torch

from vtprune.models._decoder import DecoderPatch
from vtprune.models._patch import Encoded
from vtprune.models.qwen2_5_vl import _PIXELS, Qwen2_5_VLPatch, VisionScores, select_per_unit

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

    def install_scores(self, restore) -> None:
        if self.hooks.encoder and self.hooks.encoder_scores:  # every block is full attention: score the last
            self.scores = VisionScores(self.mm.visual.blocks[-1].attn, self.backend, restore)

    # ------------------------------------------------------------------ vision tower + encoder hook
    def encode(self, a) -> Encoded:
        """Per unit (an image, or one frame group of a video), in prompt order: its tokens with the deepstack
        levels appended along the channels (``[S, D * (1 + levels)]``), through the method's encoder hook."""
        self._held(a)
        # one tower call for every image and video
        grid = torch.cat([a[f"{k}_grid_thw"] for k in self.kinds])
        pixels = torch.cat([a[_PIXELS[k]] for k in self.kinds])
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
        sizes, n_image = self._unit_sizes(a, unit)
        scores = metric = None
        if self.scores is not None:  # patch level -> merged-token level: mean over each 2x2 group (no windows)
            scores = self.scores.scores.view(-1, unit).mean(1)
            metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)
        if len(self.kinds) == 2:  # images and videos in one call: the units in the prompts' order
            wide, scores, metric, sizes = self._prompt_ordered(a, wide, scores, metric, sizes, n_image)
        if not self.hooks.encoder:
            return Encoded(wide, sizes, sizes)
        return select_per_unit(self, wide, scores, metric, sizes, "image or frame group")

    # ------------------------------------------------------------------ prefill
    def prefill_embeds(self, call, embeds):
        """The deepstack channels come off the compacted prompt into the call's :class:`Deepstack`."""
        D = self.mm.get_input_embeddings().embedding_dim
        call.scratch[_DEEPSTACK] = Deepstack(list(embeds[..., D:].split(D, -1)))
        return embeds[..., :D]
