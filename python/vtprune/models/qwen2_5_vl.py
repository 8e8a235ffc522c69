"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): window-attention ViT with a 2x2 patch merger, Qwen2 LLM
(grouped-query attention) with 3-D M-RoPE positions.

Encoder stage (VisionDrop, VisionZip). The ViT has no [CLS] token, so, as docs/methods.md#visiondrop says for such
encoders, each patch is scored by the **visual-to-visual mean** of :func:`vtprune.ops.attention_with_scores` at
the last full-attention block (``fullatt_block_indexes[-1]``; its attention runs through the op, which returns the
block's own output too): the attention every patch receives, averaged over the heads and over all patches of
its image. The language model sees *merged* tokens (one per 2x2 patch group), so the stage runs after the
patch merger and a merged token's score is the **mean of its 2x2 group's scores** (the attention mass the group
receives, per patch); the merge metric is the block's pre-RoPE keys averaged over heads, also averaged over the
group (pre-RoPE: the 2-D rotary phase would make cosine similarity prefer spatial neighbours over similar
content). ``dominant`` / ``contextual`` are merged-token counts per image (ints) or fractions of the image's
merged tokens (``ratio=``, the natural budget for dynamic resolutions). ``UniformPool`` does not apply (a fixed
square grid does not fit Qwen's arbitrary aspect ratios) and is refused.

Positions (3-D M-RoPE). A Qwen image does not occupy one position per token: its tokens carry (t, h, w) grid
coordinates starting at the image's offset, and the text after it continues at ``offset + max(h, w)``, with
``rope_deltas`` (``max position + 1 - length``) continuing the count while decoding. Re-compacting, as VisionDrop
does for 1-D positions in LLaVA, would shift the kept tokens' h and w by the number of tokens dropped before
them and bend the image grid. We therefore **keep every kept token's original 3-D position** (a contextual token
takes its target's), in the encoder stage and in the LLM stages. Nothing needs moving: the image's extent in
position space is unchanged, the text after it keeps its positions, and ``rope_deltas`` and the positions
``generate()`` computes while decoding stay exactly the unpruned model's; only the KV cache is shorter, which
the per-group masks of :mod:`vtprune.models._decoder` handle. Token order in the sequence (and so the causal
mask) is ``[text, dominant (original order), contextual, text]`` as for LLaVA.
"""

from __future__ import annotations

import functools
import sys

import torch

from vtprune import ops
from vtprune.methods.schedule import resolve_count
from vtprune.models._decoder import DecoderPatch, llama_qk
from vtprune.models._patch import ModelPatch, place_images
from vtprune.models._sequence import Sequence

CLASS_NAME = "Qwen2_5_VLForConditionalGeneration"


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


def select_per_unit(plan, tokens, scores, metric, noun: str):
    """The encoder stage on each unit (an image; Qwen3-VL: or a video's frame group) alone: per unit ``[n_i, D]``
    tokens, ``[n_i]`` scores and ``[n_i, dk]`` merge metric -> (the ``d + c`` new tokens of each unit, the kept
    and target indices of each, concatenated)."""
    enc = plan.encoder
    units, kept = [], []
    for i, (x, s, m) in enumerate(zip(tokens, scores, metric)):
        n = x.shape[0]
        d = resolve_count(enc.dominant, n, n)
        c = resolve_count(enc.contextual, n, n) if enc.dominant is not None else 0
        if d + c > n:
            raise ValueError(f"{type(plan.method).__name__}: the encoder stage keeps {d} dominant + {c} contextual "
                             f"tokens but {noun} {i} has only {n} merged tokens")
        out, keep_idx, target_idx = ops.select_and_merge(s[None], x[None], m[None].to(x.dtype), d, c,
                                                         backend=plan.backend)
        units.append(out[0])
        kept.append(torch.cat([keep_idx[0], target_idx[0]]))
    return units, kept


def refuse_square_pool(plan, family: str) -> None:
    """UniformPool pools a fixed square grid, which does not fit images of any aspect ratio."""
    if plan.encoder is not None and plan.encoder.kind == "pool":
        raise ValueError(f"{type(plan.method).__name__}: uniform pooling to a square grid does not apply to "
                         f"{family}'s dynamic-resolution images; use a ratio-based method (e.g. "
                         "VisionDrop(ratio=...), VisionZip with fractions)")


def kept_positions(positions, mask, placeholders, counts_in: list, kept, place):
    """The prefill's :class:`Sequence` over the unpruned prompt (3-D positions ``[3, B, L]``, not re-compacted) and
    each new visual token's original position ``[3, S]``: a kept token its own, a contextual token its target's
    (``kept``: per unit the kept then target indices, or None without an encoder stage)."""
    B = mask.shape[0]
    unit_pos = torch.split(positions.permute(1, 2, 0)[placeholders].T, counts_in, dim=1)  # [3, n_i] each
    value_pos = torch.cat([p if k is None else p[:, k.to(p.device)]
                           for p, k in zip(unit_pos, kept or [None] * len(counts_in))], 1)
    seq = Sequence(mask, positions, torch.zeros(B, 2, dtype=torch.int64), torch.zeros(B, dtype=torch.int64),
                   recompact=False, pad_host=place.padding, tail_real=place.tail_real, left_padded=place.left_padded)
    return seq, value_pos


class Qwen2_5_VLPatch(ModelPatch):
    family = "Qwen2.5-VL"  # in messages; Qwen3-VL shares the decode positions

    def __init__(self, model, plan, restore):
        super().__init__(model, plan, restore)
        enc = plan.encoder
        refuse_square_pool(plan, self.family)
        visual = self.mm.visual
        self.scores = None
        self.window_index = None
        if enc is not None:
            block = visual.blocks[visual.fullatt_block_indexes[-1]]
            self.scores = VisionScores(block.attn, plan.backend, restore)
            permute = visual.permute_input_for_window_attn

            def record_window(x, window_index, *args, **kwargs):  # the tower's window order, to undo it
                self.window_index = window_index
                return permute(x, window_index, *args, **kwargs)

            restore.set_attr(visual, "permute_input_for_window_attn", record_window)
        self.decoder = DecoderPatch(self.lm, plan, llama_qk, restore)
        self.install(restore)

    # ------------------------------------------------------------------ vision tower + encoder stage
    def _encode(self, pixel_values, grid_thw):
        """Merged image tokens per image (raster order) and, with an encoder stage, the kept indices."""
        visual = self.mm.visual
        if self.scores is not None:
            self.scores.enabled = True
        try:
            merged = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw).pooler_output  # [M, D]
        finally:
            if self.scores is not None:
                self.scores.enabled = False
        unit = visual.spatial_merge_size**2
        sizes = (grid_thw.prod(-1) // unit).tolist()
        enc = self.plan.encoder
        if enc is None:
            return list(torch.split(merged, sizes)), None
        reverse = torch.argsort(self.window_index.to(merged.device))
        # patch level (window order) -> merged-token level (raster order): mean over each 2x2 group
        scores = self.scores.scores.view(-1, unit).mean(1)[reverse]
        metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)[reverse]
        return select_per_unit(self.plan, torch.split(merged, sizes), torch.split(scores, sizes),
                               torch.split(metric, sizes), "image")

    # ------------------------------------------------------------------ prefill
    def _prefill(self, original, a):
        input_ids, cache, mask_in = self._check_prefill(a)
        if a.get("pixel_values_videos") is not None:
            raise ValueError("vtprune: Qwen2.5-VL videos (pixel_values_videos) are not supported")
        grid = a.get("image_grid_thw")
        if grid is None:
            raise ValueError("vtprune: Qwen2.5-VL needs image_grid_thw with pixel_values")
        cfg = self.config
        B, L = input_ids.shape
        dev = input_ids.device
        placeholders = input_ids == cfg.image_token_id
        mask = mask_in if mask_in is not None else torch.ones(B, L, dtype=torch.long, device=dev)
        positions = self._positions(a, input_ids, mask, placeholders)  # [3, B, L]

        images, kept = self._encode(a["pixel_values"], grid)
        counts_in = (grid.prod(-1) // self.mm.visual.spatial_merge_size**2).tolist()
        counts_out = [x.shape[0] for x in images]
        place = place_images(placeholders, mask_in, counts_in, counts_out)
        images_of_row = place.images_of_row
        per_row = [len(i) for i in images_of_row]
        self._check_images_per_row(per_row)
        seq, value_pos = kept_positions(positions, mask, placeholders, counts_in, kept, place)
        embeds = self.mm.get_input_embeddings()(input_ids)
        features = torch.cat(images).to(embeds.dtype)
        embeds, _ = seq.compact(embeds, place.keep, place.slots, features, value_pos, kept=place.kept,
                                  dropped_padding=place.dropped)
        place.set_spans(seq, strict=self._reads_spans)
        call = self.decoder.prefill_call(seq, place.visual, None)
        call.orig_len = L
        a.pop("image_grid_thw", None)
        a.pop("mm_token_type_ids", None)
        return self._run_prefill(original, a, call, embeds, cache)

    def _positions(self, a, input_ids, mask, placeholders):
        """3-D positions [3, B, L] of the unpruned prompt: the given ones (generate passes [4, B, L], text
        positions first) or ``get_rope_index`` as the unpatched forward computes them (also setting
        ``rope_deltas`` for decoding)."""
        positions = a.get("position_ids")
        if positions is not None:
            if positions.dim() == 3 and positions.shape[0] == 4:
                return positions[1:]
            if positions.dim() == 3 and positions.shape[0] == 3:
                return positions
            raise ValueError(f"vtprune: Qwen2.5-VL position_ids must be [3, B, L] or [4, B, L] with an image, got "
                             f"shape {tuple(positions.shape)}")
        types = a.get("mm_token_type_ids")
        if types is None:
            types = placeholders.int()
        positions, deltas = self.mm.get_rope_index(input_ids, mm_token_type_ids=types,
                                                   image_grid_thw=a["image_grid_thw"], attention_mask=mask)
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
