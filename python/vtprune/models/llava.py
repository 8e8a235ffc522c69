"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower + LLaMA-style language model).

Patched on the instance:

* ``model.model.forward`` (``LlavaModel``): builds the pruned input sequence itself (vision tower -> encoder
  stage -> projector -> image features written into the kept placeholder slots) and hands the language model
  ``inputs_embeds`` with matching ``attention_mask`` / ``position_ids``; on decoding calls it maps the incoming
  mask and positions onto the pruned KV cache.
* the CLIP attention of the feature layer (``vision_feature_layer``, -2 in LLaVA-1.5) when the method has an
  encoder hook that needs scores: it runs :func:`vtprune.ops.attention_with_scores` (the layer's output and the
  [CLS] row's head-averaged attention over the patches in one call) and keeps the layer's keys averaged over
  heads as the merge metric, as the official token-merging codes do. The method's encoder hook
  (:meth:`vtprune.methods.Method.select_encoder`) then picks each image's tokens.
* every decoder layer (:mod:`vtprune.models._decoder`).
* ``model.forward``: logits and ``labels=`` loss in input coordinates (:mod:`vtprune.outputs`).

The forward wrappers and decode continuation are shared with the other families (:mod:`vtprune.models._patch`);
LLaVA-NeXT subclasses this patch and replaces :meth:`LlavaPatch.encode` (anyres tiles).

[CLS]: LLaVA-1.5 drops [CLS] before the projector (``vision_feature_select_strategy="default"``). The encoder
hook gets it (``EncoderContext.cls``) and decides whether it goes to the projector (``Selection.cls``): the
official token-merging codes keep it as one of the ``dominant`` tokens whenever they prune, and a keep-all
selection feeds it only under the "full" strategy (``EncoderContext.cls_fed``), exactly the unpatched tokens.
"""

from __future__ import annotations

import functools

import torch

from vtprune import ops
from vtprune._compat import vision_encoder_layers, with_image_features
from vtprune.methods.base import EncoderContext, ModelInfo, Selection
from vtprune.models._patch import Encoded, ModelPatch

CLASS_NAME = "LlavaForConditionalGeneration"


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

    def __init__(self, model, method, hooks, restore):
        vcfg = model.config.vision_config
        self.grid = vcfg.image_size // vcfg.patch_size
        self.num_patches = self.grid**2
        self.clip = None
        super().__init__(model, method, hooks, restore)

    def model_info(self) -> ModelInfo:
        return ModelInfo(type(self.model).__name__, self.num_layers, patches=self.num_patches, grid=self.grid,
                         has_cls=True, extra_per_image=self._extra_per_image)

    def install_scores(self, restore) -> None:
        if not (self.hooks.encoder and self.hooks.encoder_scores):
            return
        layers = vision_encoder_layers(self.mm.vision_tower)
        f = self.config.vision_feature_layer
        if not isinstance(f, int) or f == 0:
            raise ValueError(f"{type(self.method).__name__}'s encoder stage needs a single int "
                             f"vision_feature_layer != 0, got {f!r}")
        self.clip = ClipScores(layers[f if f < 0 else f - 1].self_attn, self.backend, restore)

    def _tower(self, pixel_values):
        """The vision tower's outputs (all hidden states), with the feature layer's scores recorded."""
        if self.clip is not None:
            self.clip.enabled = True
        try:
            return self.mm.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            if self.clip is not None:
                self.clip.enabled = False

    def _select(self, feats, strategy) -> Selection:
        """The method's encoder hook on CLIP features [I, 1 + P, Dv] of the feature layer (one row per CLIP image).
        The selection's tokens get the [CLS] token prepended when it asks for it."""
        P = feats.shape[1] - 1
        clip = self.clip
        ctx = EncoderContext(feats[:, 1:], None if clip is None else clip.scores,
                             None if clip is None else clip.metric[:, 1:], cls=feats[:, :1],
                             cls_fed=strategy != "default", grid=self.grid, num_layers=self.num_layers,
                             describe=f"the image has {P} patches + [CLS]")
        sel = self.method.select_encoder(ctx)
        if sel.cls:
            sel.tokens = torch.cat([feats[:, :1], sel.tokens], 1)
        return sel

    def _feature_layer(self, a):
        """The vision feature layer and select strategy of this call (the arguments, else the config)."""
        cfg = self.config
        layer = a.get("vision_feature_layer") if a.get("vision_feature_layer") is not None \
            else cfg.vision_feature_layer
        strategy = a.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if self.hooks.encoder and layer != cfg.vision_feature_layer:
            raise ValueError(f"vision_feature_layer={layer} differs from the config's ({cfg.vision_feature_layer}) "
                             "that the encoder stage was patched into")
        return layer, strategy

    def encode(self, a) -> Encoded:
        """Vision tower -> encoder hook -> projector, one 336 px image per image."""
        layer, strategy = self._feature_layer(a)
        if a.get("image_sizes") is not None:
            raise ValueError("vtprune: image_sizes is not supported for LLaVA-1.5")
        enc = self.hooks.encoder
        out = self._tower(a["pixel_values"])
        images = a["pixel_values"].shape[0]
        if not isinstance(layer, int):
            if enc:
                raise ValueError(f"encoder stages need a single int vision_feature_layer, got {layer!r}")
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            feats = feats[:, 1:] if strategy == "default" else feats
            tokens, origin, record = feats, None, None
        else:
            feats = out.hidden_states[layer]  # [I, 1 + P, Dv]
            patches = feats[:, 1:]
            P = patches.shape[1]
            record = None
            if not enc:
                tokens = patches if strategy == "default" else feats
                origin = list(range(P)) if strategy == "default" else [-1] + list(range(P))
            else:
                sel = self._select(feats, strategy)
                tokens, origin = sel.tokens, None
                if sel.grid is None:  # patch indices: kept on the device, read only with the statistics
                    cls_part = [-1] if sel.cls else []
                    targets = [] if sel.target_idx is None else [sel.target_idx[0]]
                    origin = [cls_part, sel.keep_idx[0], *targets]
                    record = {"stage": "encoder", "kept": [cls_part, sel.keep_idx[0]], "contextual": targets}
        features = self.mm.multi_modal_projector(tokens)  # [I, m, D]
        m = features.shape[1]
        if images == 0:
            raise ValueError("vtprune: pixel_values hold no image")
        # the placeholder total is checked against the images with the prefill's one host read (place_images)
        unpruned = self.num_patches + (0 if strategy == "default" else 1)
        return Encoded(features.reshape(-1, features.shape[-1]), [unpruned] * images, [m] * images,
                       origin=origin, record=record)

    def prefill_output(self, out, enc: Encoded):
        return with_image_features(out, enc.features)
