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
* ``model.forward``: only to refuse ``labels`` (a pruned sequence has no per-position labels).

[CLS]: LLaVA-1.5 drops [CLS] before the projector (``vision_feature_select_strategy="default"``). The official
VisionDrop/VisionZip code keeps [CLS] as one of the ``dominant`` tokens and feeds [CLS] + dominant-1 patches +
contextual tokens to the projector; we do the same whenever the encoder stage prunes. A keep-all encoder stage
(``dominant=None``) selects every patch and keeps [CLS] only under the "full" strategy, i.e. exactly the
unpatched model's tokens.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from vtprune import ops
from vtprune.methods.schedule import resolve_count
from vtprune.models._decoder import DecoderPatch, llama_qk
from vtprune.models._sequence import Sequence

CLASS_NAME = "LlavaForConditionalGeneration"


def _bound_arguments(original, args, kwargs) -> dict:
    bound = inspect.signature(original).bind(*args, **kwargs)
    named = dict(bound.arguments)
    for name, param in inspect.signature(original).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


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


class LlavaPatch:
    def __init__(self, model, plan, restore):
        self.model, self.plan = model, plan
        mm = model.model
        self.mm = mm
        self.lm = mm.language_model
        self.config = model.config
        vcfg = self.config.vision_config
        self.grid = vcfg.image_size // vcfg.patch_size
        self.num_patches = self.grid**2
        self.clip = None
        enc = plan.encoder
        if enc is not None and enc.kind == "select":
            tower = mm.vision_tower
            layers = getattr(tower, "vision_model", tower).encoder.layers  # older releases nest vision_model
            f = self.config.vision_feature_layer
            if not isinstance(f, int) or f == 0:
                raise ValueError(f"{type(plan.method).__name__}'s encoder stage needs a single int "
                                 f"vision_feature_layer != 0, got {f!r}")
            self.clip = ClipScores(layers[f if f < 0 else f - 1].self_attn, plan.backend, restore)
        self.decoder = DecoderPatch(self.lm, plan, llama_qk, restore)
        self.last_call = None
        fwd = mm.forward
        restore.set_attr(mm, "forward", functools.wraps(fwd)(lambda *a, **k: self.forward(fwd, a, k)))
        top = model.forward
        wrapper = functools.wraps(top)(lambda *a, **k: self.top_forward(top, a, k))
        # generate() pre-encodes images through get_image_features when forward accepts mm_encoder_outputs
        # (transformers >= 5.2x); the encoder stage must run inside our prefill, so hide that parameter and
        # generate passes pixel_values as it always did.
        sig = inspect.signature(top)
        wrapper.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items()
                                                        if n != "mm_encoder_outputs"])
        restore.set_attr(model, "forward", wrapper)

    # ------------------------------------------------------------------ top-level: refuse labels
    def top_forward(self, original, args, kwargs):
        named = _bound_arguments(original, args, kwargs)
        if named.get("labels") is not None:
            raise ValueError("vtprune: labels are not supported on a pruned model (the sequence is shortened); "
                             "remove the patch (handle.remove()) to compute a loss")
        return original(*args, **kwargs)

    # ------------------------------------------------------------------ LlavaModel.forward
    def forward(self, original, args, kwargs):
        a = _bound_arguments(original, args, kwargs)
        if a.get("pixel_values") is not None:
            return self._prefill(original, a)
        cache = a.get("past_key_values")
        record = self.decoder.records.get(cache) if cache is not None else None
        if record is None:
            return original(*args, **kwargs)
        return self._continue(original, a, record)

    def _image_features(self, pixel_values, layer, strategy):
        """Vision tower -> encoder stage -> projector. Returns (features [I, m, D], origin of image 0's tokens,
        encoder selection record or None)."""
        enc = self.plan.encoder
        if self.clip is not None:
            self.clip.enabled = True
        try:
            out = self.mm.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            if self.clip is not None:
                self.clip.enabled = False
        if not isinstance(layer, int):
            if enc is not None:
                raise ValueError(f"encoder stages need a single int vision_feature_layer, got {layer!r}")
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            feats = feats[:, 1:] if strategy == "default" else feats
            return self.mm.multi_modal_projector(feats), None, None
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
            keep_all = enc.dominant is None
            d = P if keep_all else resolve_count(enc.dominant, P, P) - 1  # [CLS] counts as a dominant token
            c = 0 if keep_all else resolve_count(enc.contextual, P, P)
            if d < 0 or d + c > P:
                raise ValueError(f"{type(self.plan.method).__name__}: the encoder stage keeps {d + 1} dominant "
                                 f"(with [CLS]) + {c} contextual tokens but the image has {P} patches + [CLS]")
            scores, metric = self.clip.scores, self.clip.metric[:, 1:]
            if d == 0:  # only [CLS] is dominant: rank nothing, merge everything
                scores = None
            if scores is None:
                sel = torch.empty(patches.shape[0], 0, dtype=torch.int64, device=patches.device)
                merged = ops.contextual_merge(patches, metric, sel, c, backend=self.plan.backend)
                tokens, keep_idx = merged, sel
                target_idx = None
            else:
                tokens, keep_idx, target_idx = ops.select_and_merge(scores, patches, metric, d, c,
                                                                    backend=self.plan.backend)
            with_cls = not keep_all or strategy != "default"
            if with_cls:
                tokens = torch.cat([cls, tokens], 1)
            kept = keep_idx[0].tolist()
            targets = [] if target_idx is None else target_idx[0].tolist()
            origin = ([-1] if with_cls else []) + kept + targets
            record = {"stage": "encoder", "kept": ([-1] if with_cls else []) + kept, "contextual": targets}
        return self.mm.multi_modal_projector(tokens), origin, record

    def _prefill(self, original, a):
        input_ids = a.get("input_ids")
        if input_ids is None:
            raise ValueError("vtprune: a prefill with pixel_values needs input_ids (to find the image placeholders)")
        if a.get("inputs_embeds") is not None:
            raise ValueError("vtprune: pass input_ids, not inputs_embeds, with pixel_values")
        if a.get("image_sizes") is not None or a.get("mm_encoder_outputs") is not None:
            raise ValueError("vtprune: image_sizes / mm_encoder_outputs are not supported for LLaVA-1.5")
        cache = a.get("past_key_values")
        _check_cache(cache, prefill=True)
        cfg = self.config
        layer = a.get("vision_feature_layer") if a.get("vision_feature_layer") is not None \
            else cfg.vision_feature_layer
        strategy = a.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if self.plan.encoder is not None and layer != cfg.vision_feature_layer:
            raise ValueError(f"vision_feature_layer={layer} differs from the config's ({cfg.vision_feature_layer}) "
                             "that the encoder stage was patched into")
        features, origin, enc_record = self._image_features(a["pixel_values"], layer, strategy)
        images, m, _ = features.shape
        placeholders = input_ids == cfg.image_token_id  # [B, L]
        total = int(placeholders.sum())
        if images == 0 or total % images:
            raise ValueError(f"image placeholders ({total}) do not split evenly into the {images} images given")
        per_image = total // images
        unpruned = self.num_patches + (0 if strategy == "default" else 1)
        if per_image != unpruned:
            raise ValueError(f"each image needs {unpruned} placeholder tokens (image_token_id={cfg.image_token_id}),"
                             f" got {total} for {images} images")
        B, L = input_ids.shape
        per_row = placeholders.sum(1) // per_image  # images per row
        if self.plan.stages and bool((per_row > 1).any()):
            raise ValueError(f"{type(self.plan.method).__name__}'s LLM stages rank one image per prompt; batch "
                             f"rows hold {per_row.tolist()} images (use one image per prompt, or an encoder-only "
                             "method such as VisionZip)")
        rank = (placeholders.flatten().long().cumsum(0) - 1).view(B, L) % per_image
        slots = placeholders & (rank < m)
        keep = ~placeholders | slots

        embeds = self.mm.get_input_embeddings()(input_ids)
        mask_in = a.get("attention_mask")
        if mask_in is not None and mask_in.dim() != 2:
            raise ValueError(f"vtprune needs a 2-D attention_mask, got shape {tuple(mask_in.shape)}")
        mask = mask_in if mask_in is not None else torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        positions = a.get("position_ids")
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:  # what LlamaModel.forward would use
            positions = torch.arange(L, device=input_ids.device) + past
        positions = positions.expand(B, L)
        seq = Sequence(mask, positions, torch.zeros(B, 2, dtype=torch.int64), torch.zeros(B, dtype=torch.int64))
        original_visual = (placeholders.sum(1)).cpu()
        embeds, new_slots = seq.compact(embeds, keep, slots, features.reshape(-1, features.shape[-1]))
        seq.set_spans_from_slots(new_slots)
        row0_single = int(per_row[0]) == 1
        call = self.decoder.prefill_call(seq, original_visual, origin if row0_single else None)
        call.orig_len = L
        if enc_record is not None and row0_single:
            call.selections.append(enc_record)
        padded = mask_in is not None or bool((seq.mask == 0).any())
        a.update(input_ids=None, pixel_values=None, inputs_embeds=embeds, position_ids=seq.positions,
                 attention_mask=seq.mask if padded else None)
        self.decoder.active = call
        try:
            out = original(**a)
        finally:
            self.decoder.active = None
        self.decoder.finish_prefill(call, out.past_key_values if cache is None else cache)
        out.image_hidden_states = features
        self.last_call = call
        return out

    def _continue(self, original, a, record):
        _check_cache(a["past_key_values"], prefill=False)
        ids = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        B, q = ids.shape[:2]
        dev = ids.device
        cache = a["past_key_values"]
        grown = cache.get_seq_length(0) - record.masks[0].shape[1]  # tokens decoded since the prefill
        mask = a.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, record.orig_len + grown + q, dtype=torch.long, device=dev)
        if mask.dim() != 2 or mask.shape[1] != record.orig_len + grown + q:
            raise ValueError(f"vtprune: a 2-D attention_mask over the unpruned sequence is expected while decoding "
                             f"(length {record.orig_len + grown + q}), got shape {tuple(mask.shape)}")
        positions = a.get("position_ids")
        if positions is None:
            positions = torch.arange(q, device=dev) + record.orig_len + grown
        call = self.decoder.decode_call(record, mask, positions.expand(B, q))
        a.update(attention_mask=call.group_masks[0], position_ids=call.group_positions[0])
        self.decoder.active = call
        try:
            return original(**a)
        finally:
            self.decoder.active = None


def _check_cache(cache, prefill: bool) -> None:
    if cache is None:
        return
    if getattr(cache, "is_compileable", False):
        raise ValueError("vtprune: static (compileable) caches are not supported; layer groups keep KV caches "
                         "of different lengths, use the default DynamicCache")
    if prefill and cache.get_seq_length() > 0:
        raise ValueError("vtprune: an image prefill must start from an empty cache (continuing a cached "
                         "conversation with a new image is not supported)")
