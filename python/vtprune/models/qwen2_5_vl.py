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
"""

from __future__ import annotations

import functools
import sys

import torch

from vtprune import ops
from vtprune.methods.base import EncoderContext
from vtprune.models._patch import Encoded, ModelPatch

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


def select_per_unit(patch: ModelPatch, tokens, scores, metric, sizes: list, noun: str) -> Encoded:
    """The method's encoder hook on each unit (an image; a video's frame group) alone, as a dynamic-resolution
    family calls it: ``tokens`` [M, D'], ``scores`` [M] and ``metric`` [M, dm] (or None) of all units, ``sizes``
    their token counts. Returns the units' new tokens, with each new token's position source."""
    split = (lambda t: [None] * len(sizes)) if scores is None else (lambda t: torch.split(t, sizes))
    units, sources = [], []
    for i, (x, s, m) in enumerate(zip(torch.split(tokens, sizes), split(scores), split(metric))):
        ctx = EncoderContext(x[None], None if s is None else s[None], None if m is None else m[None],
                             num_layers=patch.num_layers, describe=f"{noun} {i} has only {x.shape[0]} merged tokens")
        sel = patch.method.select_encoder(ctx)
        units.append(sel.tokens[0])
        sources.append(sel.origin[0])
    return Encoded(torch.cat(units), list(sizes), [x.shape[0] for x in units], sources=sources)


class Qwen2_5_VLPatch(ModelPatch):
    family = "Qwen2.5-VL"  # in messages (a subclassing family keeps them true)
    recompact = False  # 3-D M-RoPE: kept tokens keep their positions (module docstring)

    def __init__(self, model, method, hooks, restore):
        self.scores = None
        self.window_index = None
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
        """Merged image tokens per image (raster order) and, with an encoder hook, each new token's source index."""
        pixel_values, grid_thw = a["pixel_values"], a["image_grid_thw"]
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
        if not self.hooks.encoder:
            return Encoded(merged, sizes, sizes)
        scores = metric = None
        if self.scores is not None:
            reverse = torch.argsort(self.window_index.to(merged.device))
            # patch level (window order) -> merged-token level (raster order): mean over each 2x2 group
            scores = self.scores.scores.view(-1, unit).mean(1)[reverse]
            metric = self.scores.metric.view(-1, unit, self.scores.metric.shape[-1]).mean(1)[reverse]
        return select_per_unit(self, merged, scores, metric, sizes, "image")

    # ------------------------------------------------------------------ prefill
    def prefill_arguments(self, a) -> None:
        a.pop("image_grid_thw", None)
        a.pop("mm_token_type_ids", None)

    def positions(self, a, input_ids, mask, placeholders):
        """3-D positions [3, B, L] of the unpruned prompt: the given ones (generate passes [4, B, L], text
        positions first) or ``get_rope_index`` as the unpatched forward computes them (also setting
        ``rope_deltas`` for decoding)."""
        if a.get("pixel_values_videos") is not None:
            raise ValueError(f"vtprune: {self.family} videos (pixel_values_videos) are not supported")
        if a.get("image_grid_thw") is None:
            raise ValueError(f"vtprune: {self.family} needs image_grid_thw with pixel_values")
        positions = a.get("position_ids")
        if positions is not None:
            if positions.dim() == 3 and positions.shape[0] == 4:
                return positions[1:]
            if positions.dim() == 3 and positions.shape[0] == 3:
                return positions
            raise ValueError(f"vtprune: {self.family} position_ids must be [3, B, L] or [4, B, L] with an image, got "
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
