"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): window-attention ViT with a 2x2 patch merger, Qwen2 LLM
(grouped-query attention) with 3-D M-RoPE positions.

Encoder hook. The ViT has no [CLS] token, so, as docs/methods.md#visiondrop says for such encoders, each patch is
scored by the **visual-to-visual mean** of :func:`vtprune.ops.attention_with_scores` at the last full-attention block
(``fullatt_block_indexes[-1]``; its attention runs through the op, which returns the block's own output too): the
attention every patch receives, averaged over the heads and over all patches of its image. The language model sees
*merged* tokens (one per 2x2 patch group), so the hook runs after the patch merger and a merged token's score is the
**mean of its 2x2 group's scores** (the attention mass the group receives, per patch); the merge metric is the block's
pre-RoPE keys averaged over heads, also averaged over the
group (pre-RoPE: the 2-D rotary phase would make cosine similarity prefer spatial neighbours over similar
content). The hook is called once per image (images differ in size), without a square grid
(``EncoderContext.grid`` is None: pooling to a fixed grid does not fit Qwen's arbitrary aspect ratios).

Positions (3-D M-RoPE). A Qwen image does not occupy one position per token: its tokens carry (t, h, w) grid
coordinates starting at the image's offset, and the text after it continues at ``offset + max(h, w)``, with
``rope_deltas`` (``max position + 1 - length``) continuing the count while decoding. Re-compacting, as the
1-D positions of LLaVA are, would shift the kept tokens' h and w by the number of tokens dropped before
them and bend the image grid. We therefore **keep every kept token's original 3-D position** (a contextual token
takes its target's), at the encoder hook and at the decoder hooks. Nothing needs moving: the image's extent in
position space is unchanged, the text after it keeps its positions, and ``rope_deltas`` and the positions
``generate()`` computes while decoding stay exactly the unpruned model's; only the KV cache is shorter, which
the per-group masks of :mod:`vtprune.models._decoder` handle. Token order in the sequence (and so the causal
mask) is ``[text, dominant (original order), contextual, text]`` as for LLaVA.

Several images and videos. Each image, and each frame group of a video (``pixel_values_videos`` with
``video_grid_thw``; ``second_per_grid_ts`` spaces the frame groups' temporal positions, as the unpatched
``get_rope_index`` does), is one unit: the encoder hook runs per unit and each unit is its own span in the
language model, also where a video's frame groups are adjacent in the prompt. Images and videos go through the
vision tower as the unpatched model sends them (one call each); the units are then put in prompt order.
"""

from __future__ import annotations

import functools
import sys

import torch

from vtprune import ops
from vtprune.methods.base import EncoderContext
from vtprune.models._patch import Encoded, ModelPatch
from vtprune.models._sequence import staged_to

CLASS_NAME = "Qwen2_5_VLForConditionalGeneration"
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


class VisionScores:
    """Patch of one ``Qwen2_5_VLVisionAttention`` (a full-attention block): the block's output and each patch's
    visual-to-visual score from ``attention_with_scores``, one image (``cu_seqlens`` chunk) at a time."""

    def __init__(self, attn, backend, restore):
        self.attn, self.backend = attn, backend
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        self.enabled = False
        self.scores = self.metric = None
        self.original = attn.forward
        restore.set_attr(attn, "forward", functools.wraps(self.original)(lambda *a, **k: self.forward(*a, **k)))

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, *args, **kwargs):
        # mirrors transformers Qwen2_5_VLVisionAttention.forward (qkv, 2-D rotary, attention per chunk, proj)
        if not self.enabled:
            return self.original(hidden_states, cu_seqlens, position_embeddings, *args, **kwargs)
        attn = self.attn
        n = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        # ---- vtprune ----
        self.metric = k.mean(1)  # [N, d] pre-RoPE keys averaged over heads
        q, k = self.rope(q, k, *position_embeddings)
        bounds = cu_seqlens.tolist()
        outs, scores = [], []
        for s, e in zip(bounds[:-1], bounds[1:]):  # one image per chunk in full-attention blocks
            qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n_i, d]
            span = torch.tensor([[0, e - s]])
            out, sc = ops.attention_with_scores(qi, ki, vi, query_spans=span, key_spans=span, causal=False,
                                                scale=float(attn.scaling), backend=self.backend)
            outs.append(out[0].transpose(0, 1).reshape(e - s, -1))
            scores.append(sc[0])
        self.scores = torch.cat(scores)  # [N] in the tower's window order
        # ---- end vtprune ----
        return attn.proj(torch.cat(outs).to(hidden_states.dtype))


def select_per_unit(patch: ModelPatch, tokens, scores, metric, sizes: list, noun: str) -> Encoded:
    """The method's encoder hook on each unit (an image; a video's frame group) alone, as a dynamic-resolution
    family calls it: ``tokens`` [M, D'], ``scores`` [M] and ``metric`` [M, dm] (or None) of all units, ``sizes``
    their token counts. Returns the units' new tokens, with each new token's position source. An int budget
    larger than a unit keeps all of its tokens (``Encoded.capped``)."""
    split = (lambda t: [None] * len(sizes)) if scores is None else (lambda t: torch.split(t, sizes))
    units, sources, capped = [], [], []
    for i, (x, s, m) in enumerate(zip(torch.split(tokens, sizes), split(scores), split(metric))):
        ctx = EncoderContext(x[None], None if s is None else s[None], None if m is None else m[None],
                             num_layers=patch.num_layers, describe=f"{noun} {i} has only {x.shape[0]} merged tokens",
                             cap=patch.cap_budgets)
        sel = patch.method.select_encoder(ctx)
        units.append(sel.tokens[0])
        sources.append(sel.origin[0])
        capped.append(bool(sel.capped))
    return Encoded(torch.cat(units), list(sizes), [x.shape[0] for x in units], sources=sources, capped=capped)


class Qwen2_5_VLPatch(ModelPatch):
    family = "Qwen2.5-VL"  # in messages (a subclassing family keeps them true)
    recompact = False  # 3-D M-RoPE: kept tokens keep their positions (module docstring)
    cap_budgets = True  # dynamic resolutions: an int budget larger than a unit keeps all of it

    def __init__(self, model, method, hooks, restore):
        self.scores = None
        self.window_index = None
        self.kinds = ()  # what the current prefill holds: "image", "video"
        super().__init__(model, method, hooks, restore)

    def install_scores(self, restore) -> None:
        if not (self.hooks.encoder and self.hooks.encoder_scores):
            return
        visual = self.mm.visual
        block = visual.blocks[visual.fullatt_block_indexes[-1]]
        self.scores = VisionScores(block.attn, self.backend, restore)
        permute = visual.permute_input_for_window_attn

        def record_window(x, window_index, *args, **kwargs):  # the tower's window order, to undo it
            self.window_index = window_index
            return permute(x, window_index, *args, **kwargs)

        restore.set_attr(visual, "permute_input_for_window_attn", record_window)

    # ------------------------------------------------------------------ vision tower + encoder hook
    def encode(self, a) -> Encoded:
        """Merged tokens per unit (an image; a video's frame group) in prompt order (raster order within a unit)
        and, with an encoder hook, each new token's source index. Images and videos each go through the tower
        as the unpatched model sends them (one call each)."""
        self._held(a)
        visual = self.mm.visual
        unit = visual.spatial_merge_size**2
        parts = [self._tower(a[_PIXELS[k]], a[f"{k}_grid_thw"], unit) for k in self.kinds]
        merged = torch.cat([p[0] for p in parts])
        sizes, n_image = self._unit_sizes(a, unit)
        scores = metric = None
        if self.scores is not None:
            scores, metric = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        if len(self.kinds) == 2:  # images and videos in one call: the units in the prompts' order
            merged, scores, metric, sizes = self._prompt_ordered(a, merged, scores, metric, sizes, n_image)
        if not self.hooks.encoder:
            return Encoded(merged, sizes, sizes)
        return select_per_unit(self, merged, scores, metric, sizes, "image or frame group")

    def _tower(self, pixels, grid, unit):
        """One vision-tower call: merged tokens [M, D] (raster order) and, when scoring, their scores and metric."""
        visual = self.mm.visual
        if self.scores is not None:
            self.scores.enabled = True
        try:
            merged = visual(pixels.type(visual.dtype), grid_thw=grid).pooler_output  # [M, D]
        finally:
            if self.scores is not None:
                self.scores.enabled = False
        if self.scores is None:
            return merged, None, None
        reverse = torch.argsort(self.window_index.to(merged.device))
        # patch level (window order) -> merged-token level (raster order): mean over each 2x2 group
        scores = self.scores.scores.view(-1, unit).mean(1)[reverse]
        metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)[reverse]
        return merged, scores, metric

    def _unit_sizes(self, a, unit: int):
        """Tokens per unit (each image, each frame group of each video; images first, as the tower runs them) and
        the number of image units, from one host read of the grids."""
        grid = torch.cat([a[f"{k}_grid_thw"] for k in self.kinds]).tolist()
        sizes = [h * w // unit for t, h, w in grid for _ in range(t)]
        n_image = sum(t for t, _, _ in grid[:len(a["image_grid_thw"])]) if "image" in self.kinds else 0
        return sizes, n_image

    def _prompt_ordered(self, a, tokens, scores, metric, sizes, n_image: int):
        """Image units then frame groups (the tower's order) -> the prompts' order (:func:`_prompt_order`)."""
        ids = a["input_ids"]
        order = _prompt_order(self.placeholders(ids), ids == self.config.video_token_id, sizes[:n_image],
                              sizes[n_image:])
        index = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[:i + 1])) for i in order])
        index = staged_to(index, tokens.device)
        tokens, sizes = tokens[index], [sizes[i] for i in order]
        if scores is not None:
            scores, metric = scores[index], metric[index]
        return tokens, scores, metric, sizes

    def _held(self, a) -> None:
        """What the prefill holds (``self.kinds``: "image", "video"), each with its grid."""
        self.kinds = tuple(k for k in ("image", "video") if a.get(_PIXELS[k]) is not None)
        for k in self.kinds:
            if a.get(f"{k}_grid_thw") is None:
                raise ValueError(f"vtprune: {self.family} needs {k}_grid_thw with {_PIXELS[k]}")

    def is_prefill(self, a) -> bool:
        return a.get("pixel_values") is not None or a.get("pixel_values_videos") is not None

    def placeholders(self, input_ids):
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    # ------------------------------------------------------------------ prefill
    def prefill_arguments(self, a) -> None:
        for key in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "pixel_values_videos",
                    "second_per_grid_ts"):
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
        extra = {} if a.get("second_per_grid_ts") is None else {"second_per_grid_ts": a["second_per_grid_ts"]}
        positions, deltas = self.mm.get_rope_index(input_ids, mm_token_type_ids=types,
                                                   image_grid_thw=a.get("image_grid_thw"),
                                                   video_grid_thw=a.get("video_grid_thw"), attention_mask=mask,
                                                   **extra)
        self.mm.rope_deltas = deltas
        return positions

    def _decode_positions(self, a, record, mask, q):
        positions = a.get("position_ids")
        if positions is not None:
            if positions.dim() == 3 and positions.shape[0] == 4:
                return positions[1:]
            if positions.dim() == 3:
                return positions
            raise ValueError(f"vtprune: {self.family} decoding needs [3, B, q] or [4, B, q] position_ids, got shape "
                             f"{tuple(positions.shape)}")
        deltas = self.mm.rope_deltas
        if deltas is None:
            raise ValueError("vtprune: decoding without position_ids needs the prefill's rope_deltas")
        # as the unpatched model: text position from the (unpruned) mask, plus the image's rope delta
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
        return (text + deltas.to(text.device)).expand(3, -1, -1)


def _prompt_order(placeholders, video, image_counts: list, video_counts: list) -> list:
    """Images and videos in one call: the order of the units (images ``0..I-1``, then frame groups) in the
    prompts, row-major. Each run of same-kind placeholders in a row takes the next units of its kind until its
    length is used up; one host read of the runs' kinds and lengths."""
    B, L = placeholders.shape
    kind = video.long()
    prev_ph = torch.nn.functional.pad(placeholders[:, :-1], (1, 0), value=False)
    prev_kind = torch.nn.functional.pad(kind[:, :-1], (1, 0))
    starts = placeholders & (~prev_ph | (prev_kind != kind))
    # every run holds whole units, so a valid prompt has at most one run per unit: fixed-size buffers (no
    # data-dependent sizes) and one host read of the runs' lengths and kinds
    units = len(image_counts) + len(video_counts)
    run = (starts.flatten().long().cumsum(0) - 1).clamp(0, units)  # run index of every position (row-major)
    ph = placeholders.flatten().long()
    lengths = torch.zeros(units + 1, dtype=torch.long, device=run.device).index_add_(0, run, ph)
    kinds = torch.zeros(units + 1, dtype=torch.long, device=run.device).scatter_reduce(0, run, kind.flatten() * ph,
                                                                                      "amax")
    host = torch.cat([lengths, kinds, starts.sum()[None]]).tolist()
    n_runs = host[-1]
    if n_runs > units:
        raise ValueError(f"the prompts hold {n_runs} runs of image / video placeholders, more than the {units} "
                         "images and frame groups given")
    lengths, run_kinds = host[:n_runs], host[units + 1:units + 1 + n_runs]
    queues = [list(range(len(image_counts))), [len(image_counts) + i for i in range(len(video_counts))]]
    counts = list(image_counts) + list(video_counts)
    order = []
    for k, n in zip(run_kinds, lengths):
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
