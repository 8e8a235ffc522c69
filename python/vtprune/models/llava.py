"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower + LLaMA-style language model).

Patched on the instance:

* ``model.model.forward`` (``LlavaModel``): builds the pruned input sequence itself (vision tower -> encoder
  stage -> projector -> image features written into the kept placeholder slots) and hands the language model
  ``inputs_embeds`` with matching ``attention_mask`` / ``position_ids``; on decoding calls it maps the incoming
  mask and positions onto the pruned KV cache.
* the CLIP attention of the feature layer (``vision_feature_layer``, -2 in LLaVA-1.5) when the method has an
  encoder stage: it runs :func:`vtprune.ops.attention_with_scores` (the layer's output and the [CLS] row's
  head-averaged attention over the patches in one call) and keeps the layer's keys averaged over heads as
  the merge metric, as the official VisionZip/VisionDrop code does.
* every decoder layer (:mod:`vtprune.models._decoder`).
* ``model.forward``: logits and ``labels=`` loss in input coordinates (:mod:`vtprune.outputs`).

The forward wrappers and decode continuation are shared with the other families (:mod:`vtprune.models._patch`);
LLaVA-NeXT subclasses this patch and replaces :meth:`LlavaPatch._encode` (anyres tiles).

[CLS]: LLaVA-1.5 drops [CLS] before the projector (``vision_feature_select_strategy="default"``). The official
VisionDrop/VisionZip code keeps [CLS] as one of the ``dominant`` tokens and feeds [CLS] + dominant-1 patches +
contextual tokens to the projector; we do the same whenever the encoder stage prunes. A keep-all encoder stage
(``dominant=None``) selects every patch and keeps [CLS] only under the "full" strategy, i.e. exactly the
unpatched model's tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtprune import ops
from vtprune._compat import vision_encoder_layers, with_image_features
from vtprune.methods.schedule import resolve_count
from vtprune.models._decoder import DecoderPatch, llama_qk
from vtprune.models._patch import ModelPatch, place_images
from vtprune.models._sequence import Sequence

CLASS_NAME = "LlavaForConditionalGeneration"


@dataclass
class Encoded:
    """The image tokens an encoder path produced, image after image (in order of appearance in the prompts).

    features : [S, D] every image's tokens, after the projector
    counts_in : placeholder tokens per image in ``input_ids`` (what the unpatched model feeds)
    counts_out : tokens per image after the encoder stage
    per : multiplier of int stage counts per image (crops for LLaVA-NeXT), or None
    origin, record : image 0's original patch indices and encoder selection (retention maps), or None
    """

    features: torch.Tensor
    counts_in: list
    counts_out: list
    per: list | None = None
    origin: list | None = None
    record: dict | None = None


class ClipScores:
    """Patch of one CLIPAttention instance: output and [CLS] scores from ``attention_with_scores``."""

    def __init__(self, attn, backend, restore):
        self.attn, self.backend = attn, backend
        self.enabled = False
        self.scores = self.metric = None
        self.original = attn.forward
        restore.set_attr(attn, "forward", functools.wraps(self.original)(lambda *a, **k: self.forward(*a, **k)))

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        # mirrors transformers CLIPAttention.forward (q/k/v projections, attention, out_proj)
        if not self.enabled:
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        # ---- vtprune ----
        if attention_mask is not None:
            raise ValueError("vtprune: the CLIP vision encoder is expected to run without an attention mask")
        attn = self.attn
        B, L, _ = hidden_states.shape
        shape = (B, L, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, L, d]
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        cls_row = torch.tensor([[0, 1]] * B)  # the [CLS] query row
        patches = torch.tensor([[1, L - 1]] * B)  # every patch key
        out, self.scores = ops.attention_with_scores(q, k, v, query_spans=cls_row, key_spans=patches, causal=False,
                                                     scale=float(attn.scale), backend=self.backend)
        self.metric = k.mean(1)  # [B, L, d] keys averaged over heads (no RoPE in CLIP)
        out = out.transpose(1, 2).reshape(B, L, -1)
        # ---- end vtprune ----
        return attn.out_proj(out), None


class LlavaPatch(ModelPatch):
    _extra_per_image = 0  # image tokens beyond the tiles' (LLaVA-NeXT: a single-tile image's newline)

    def __init__(self, model, plan, restore):
        super().__init__(model, plan, restore)
        vcfg = self.config.vision_config
        self.grid = vcfg.image_size // vcfg.patch_size
        self.num_patches = self.grid**2
        self.clip = None
        enc = plan.encoder
        if enc is not None and enc.kind == "select":
            tower = self.mm.vision_tower
            layers = vision_encoder_layers(tower)
            f = self.config.vision_feature_layer
            if not isinstance(f, int) or f == 0:
                raise ValueError(f"{type(plan.method).__name__}'s encoder stage needs a single int "
                                 f"vision_feature_layer != 0, got {f!r}")
            self.clip = ClipScores(layers[f if f < 0 else f - 1].self_attn, plan.backend, restore)
        self._check_budget(plan)
        self.decoder = DecoderPatch(self.lm, plan, llama_qk, restore)
        self.install(restore)

    def _check_budget(self, plan) -> None:
        """Refuse, at ``apply()``, a schedule whose int counts exceed what an image of this model holds (per
        336 px tile for LLaVA-NeXT): every image would fail at its first forward otherwise."""
        P = self.num_patches
        side = self.grid
        avail, what = P + 1, f"{P} patches ({side}x{side}) + [CLS]"
        enc = plan.encoder
        if enc is not None and enc.dominant is not None:
            if enc.kind == "pool":
                total = enc.dominant
                limit = P
            else:
                total = resolve_count(enc.dominant, P, P) + resolve_count(enc.contextual, P, P)
                limit = P + 1
            if total > limit:
                raise ValueError(f"{plan.method!r}: its encoder stage keeps {total} tokens per image but a "
                                 f"{type(self.model).__name__} image has {what}; lower the budget")
            avail, what = total, f"{total} tokens after the encoder stage"
        for st in plan.stages:
            if not isinstance(st.dominant, int):
                continue
            total = st.dominant + resolve_count(st.contextual, P, avail)
            if total > avail + self._extra_per_image:
                raise ValueError(f"{plan.method!r}: the stage after layer {st.layer} keeps {total} visual tokens per "
                                 f"image but a {type(self.model).__name__} image has {what}; lower the budget")
            avail, what = total, f"{total} tokens after layer {st.layer}"

    def _tower(self, pixel_values):
        """The vision tower's outputs (all hidden states), with the feature layer's scores recorded."""
        if self.clip is not None:
            self.clip.enabled = True
        try:
            return self.mm.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            if self.clip is not None:
                self.clip.enabled = False

    def _select(self, feats):
        """Encoder stage on CLIP features [I, 1 + P, Dv] of the feature layer (one row per CLIP image).

        Returns (tokens [I, m, Dv], keep_idx [I, k] and target_idx [I, c] patch indices or None, with_cls)."""
        enc = self.plan.encoder
        cls, patches = feats[:, :1], feats[:, 1:]
        P = patches.shape[1]
        keep_all = enc.dominant is None
        d = P if keep_all else resolve_count(enc.dominant, P, P) - 1  # [CLS] counts as a dominant token
        c = 0 if keep_all else resolve_count(enc.contextual, P, P)
        if d < 0 or d + c > P:
            raise ValueError(f"{type(self.plan.method).__name__}: the encoder stage keeps {d + 1} dominant "
                             f"(with [CLS]) + {c} contextual tokens but the image has {P} patches + [CLS]")
        metric = self.clip.metric[:, 1:]
        if d == 0:  # only [CLS] is dominant: rank nothing, merge everything
            sel = torch.empty(patches.shape[0], 0, dtype=torch.int64, device=patches.device)
            tokens = ops.contextual_merge(patches, metric, sel, c, backend=self.plan.backend)
            keep_idx, target_idx = sel, None
        else:
            tokens, keep_idx, target_idx = ops.select_and_merge(self.clip.scores, patches, metric, d, c,
                                                                backend=self.plan.backend)
        return tokens, keep_idx, target_idx, cls

    def _encode(self, a, layer, strategy) -> Encoded:
        """Vision tower -> encoder stage -> projector, one 336 px image per image."""
        if a.get("image_sizes") is not None:
            raise ValueError("vtprune: image_sizes is not supported for LLaVA-1.5")
        enc = self.plan.encoder
        out = self._tower(a["pixel_values"])
        images = a["pixel_values"].shape[0]
        if not isinstance(layer, int):
            if enc is not None:
                raise ValueError(f"encoder stages need a single int vision_feature_layer, got {layer!r}")
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            feats = feats[:, 1:] if strategy == "default" else feats
            tokens, origin, record = feats, None, None
        else:
            feats = out.hidden_states[layer]  # [I, 1 + P, Dv]
            cls, patches = feats[:, :1], feats[:, 1:]
            P = patches.shape[1]
            record = None
            if enc is None:
                tokens = patches if strategy == "default" else feats
                origin = list(range(P)) if strategy == "default" else [-1] + list(range(P))
            elif enc.kind == "pool":
                side = math.isqrt(enc.dominant)
                grid = patches.reshape(patches.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
                tokens = F.adaptive_avg_pool2d(grid.float(), side).to(patches.dtype).flatten(2).transpose(1, 2)
                origin = None
            else:
                tokens, keep_idx, target_idx, cls = self._select(feats)
                with_cls = enc.dominant is not None or strategy != "default"
                if with_cls:
                    tokens = torch.cat([cls, tokens], 1)
                # kept on the device: read only when the statistics are (resolve_selections)
                cls_part = [-1] if with_cls else []
                targets = [] if target_idx is None else [target_idx[0]]
                origin = [cls_part, keep_idx[0], *targets]
                record = {"stage": "encoder", "kept": [cls_part, keep_idx[0]], "contextual": targets}
        features = self.mm.multi_modal_projector(tokens)  # [I, m, D]
        m = features.shape[1]
        if images == 0:
            raise ValueError("vtprune: pixel_values hold no image")
        # the placeholder total is checked against the images with the prefill's one host read (place_images)
        unpruned = self.num_patches + (0 if strategy == "default" else 1)
        return Encoded(features.reshape(-1, features.shape[-1]), [unpruned] * images, [m] * images,
                       origin=origin, record=record)

    def _prefill(self, original, a):
        input_ids, cache, mask_in = self._check_prefill(a)
        cfg = self.config
        layer = a.get("vision_feature_layer") if a.get("vision_feature_layer") is not None \
            else cfg.vision_feature_layer
        strategy = a.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if self.plan.encoder is not None and layer != cfg.vision_feature_layer:
            raise ValueError(f"vision_feature_layer={layer} differs from the config's ({cfg.vision_feature_layer}) "
                             "that the encoder stage was patched into")
        enc = self._encode(a, layer, strategy)
        placeholders = input_ids == cfg.image_token_id  # [B, L]
        place = place_images(placeholders, mask_in, enc.counts_in, enc.counts_out)
        images_of_row = place.images_of_row
        per_row = [len(i) for i in images_of_row]
        self._check_images_per_row(per_row)
        B, L = input_ids.shape
        embeds = self.mm.get_input_embeddings()(input_ids)
        mask = mask_in if mask_in is not None else torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        positions = a.get("position_ids")
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:  # what LlamaModel.forward would use
            positions = torch.arange(L, device=input_ids.device) + past
        positions = positions.expand(B, L)
        seq = Sequence(mask, positions, torch.zeros(B, 2, dtype=torch.int64), torch.zeros(B, dtype=torch.int64),
                       pad_host=place.padding, tail_real=place.tail_real,
                       left_padded=place.left_padded)
        embeds, _ = seq.compact(embeds, place.keep, place.slots, enc.features, kept=place.kept,
                                  dropped_padding=place.dropped)
        place.set_spans(seq, strict=self._reads_spans)
        original_visual = place.visual
        row0_single = per_row[0] == 1 and images_of_row[0] == [0]
        call = self.decoder.prefill_call(seq, original_visual, enc.origin if row0_single else None)
        call.orig_len = L
        if enc.per is not None:
            call.count_per = [enc.per[i[0]] if i else 1 for i in images_of_row]
        if enc.record is not None and row0_single:
            call.selections.append(enc.record)
        out = self._run_prefill(original, a, call, embeds, cache)
        return with_image_features(out, enc.features)
