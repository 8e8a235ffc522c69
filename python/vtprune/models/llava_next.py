"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres CLIP crops + LLaMA/Mistral-style language model.

An image of any size is cut into a base image (the whole image at 336 px) and ``nh x nw`` 336 px crops of the
best-fitting resolution (``image_grid_pinpoints``); CLIP encodes each of these ``1 + nh*nw`` tiles like a
LLaVA-1.5 image. The unpatched model then *packs* the tile features (``pack_image_features``): base tokens,
then the crops' patch grid stitched into one high-resolution grid, cropped back to the image's aspect ratio
("unpadding") with an ``image_newline`` token after every grid row. Up to 5 x 576 = 2880 tokens (+ newlines).

What the patch does (the CLIP, projector and decoder machinery is LLaVA-1.5's, :mod:`vtprune.models.llava`):

* **Encoder hook per tile**, as the official token-merging code (``restore_image_features_sorted``): every tile
  is one row of the encoder hook (its [CLS] attention at CLIP layer -2, its patches, [CLS]). The image's tokens
  are then: the base tile's ``[CLS, dominant, contextual]``, the crops' kept patches (``Selection.keep_idx``) in
  raster order over the whole high-resolution grid, the crops' [CLS] tokens, the crops' merged tokens.
* **Newlines and unpadding.** A pruned grid has no rows left to terminate, so a pruning encoder hook inserts
  no ``image_newline`` tokens and does not unpad (the official code does the same in the multi-crop case;
  the padding area is plain background that the [CLS] ranking rarely keeps). Only a single-tile image keeps its
  one trailing newline, again as the official code. A keep-all selection (``Selection.keep_all``), or a method
  without an encoder hook, feeds the unpatched packing; the newline tokens are then image tokens like the others
  (they sit inside the image span) and decoder hooks may drop or merge them.
* **Budgets are per tile.** The encoder hook sees one tile per row; decoder hooks get the tiles of the row's
  image as ``PruneContext.per``, the multiplier of int budgets, so that one schedule gives LLaVA-1.5's budget
  per tile (docs/methods.md: 64 per tile averages 64 x 5 = 320 tokens on a 5-tile image, "320 of 2880").
* A pooling selection (``Selection.grid``) pools every tile to the same square grid (base tile, then the crops'
  pooled grids in raster order over the whole image). Batch rows may hold images of different sizes.

Retention maps (``handle.stats.selections``) are not recorded: they assume one square grid.
"""

from __future__ import annotations

import sys

import torch

from vtprune.models._patch import Encoded
from vtprune.models._sequence import staged_to
from vtprune.models.llava import LlavaPatch

CLASS_NAME = "LlavaNextForConditionalGeneration"


def _hf(model):
    return sys.modules[type(model).__module__]


def image_tokens(model, image_size) -> int:
    """Image tokens the unpatched model feeds for an image of ``image_size`` (height, width), with the
    "default" feature strategy: base tile + unpadded high-resolution grid + one newline per grid row."""
    hf = _hf(model)
    cfg = model.config
    v = cfg.vision_config
    g = v.image_size // v.patch_size
    nh, nw = hf.get_anyres_image_grid_shape(list(image_size), cfg.image_grid_pinpoints, v.image_size)
    grid = hf.unpad_image(torch.zeros(1, nh * g, nw * g), list(image_size))
    extra = 0 if cfg.vision_feature_select_strategy == "default" else 1
    return g * g + extra + grid.shape[1] * (grid.shape[2] + 1)


class LlavaNextPatch(LlavaPatch):
    _extra_per_image = 1

    def __init__(self, model, method, hooks, restore):
        self.hf = _hf(model)
        super().__init__(model, method, hooks, restore)

    def encode(self, a) -> Encoded:
        layer, strategy = self._feature_layer(a)
        sizes = a.get("image_sizes")
        if sizes is None:
            raise ValueError("vtprune: LLaVA-NeXT needs image_sizes (height, width per image) with pixel_values")
        cfg = self.config
        v = cfg.vision_config
        sizes = [tuple(int(x) for x in s) for s in (sizes.tolist() if torch.is_tensor(sizes) else sizes)]
        bad = [s for s in sizes if len(s) != 2 or min(s) < 1]
        if bad:
            raise ValueError(f"vtprune: image_sizes must hold a positive (height, width) per image, got {sizes}")
        tiles = [self.hf.image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, v.image_size) for s in sizes]
        pv = a["pixel_values"]
        if pv.dim() == 5:  # [I, max tiles, 3, H, W], padded
            pv = torch.cat([p[:n] for p, n in zip(pv, tiles)])
        elif pv.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pv.shape)}")
        if pv.shape[0] != sum(tiles):
            raise ValueError(f"pixel_values hold {pv.shape[0]} tiles but image_sizes {sizes} need {sum(tiles)}")
        counts_in = [image_tokens(self.model, s) for s in sizes]
        enc = self.hooks.encoder
        out = self._tower(pv)
        if enc and not isinstance(layer, int):
            raise ValueError(f"encoder stages need a single int vision_feature_layer, got {layer!r}")
        feats = out.hidden_states[layer] if isinstance(layer, int) else \
            torch.cat([out.hidden_states[i] for i in layer], dim=-1)  # [N tiles, 1 + P, Dv]
        sel = self._select(feats, "full") if enc else None
        if sel is None or sel.keep_all:
            # no encoder hook, or one that keeps every patch in order: the unpatched packing (newlines, unpadding)
            if sel is not None:
                feats = sel.tokens
            feats = feats[:, 1:] if strategy == "default" else feats
            proj = self.mm.multi_modal_projector(feats)
            packed, lens = self.mm.pack_image_features(torch.split(proj, tiles), torch.tensor(sizes), strategy,
                                                       image_newline=self.mm.image_newline)
            return Encoded(torch.cat(packed), counts_in, lens.tolist(), per=tiles)
        rows = self.mm.multi_modal_projector(sel.tokens)  # [N, lead + d + c, D]
        lead = 1 if sel.cls else 0
        dominant = sel.keep_idx.shape[1]
        side_of = self.grid if sel.grid is None else sel.grid
        positions = sel.keep_idx.cpu()
        images, start = [], 0
        for s, n in zip(sizes, tiles):
            images.append(self._layout(rows[start:start + n], positions[start + 1:start + n], s, lead, dominant,
                                       side_of))
            start += n
        return Encoded(torch.cat(images), counts_in, [x.shape[0] for x in images], per=tiles)

    def _layout(self, rows, positions, size, lead, dominant, side):
        """One image's tokens from its tiles' rows [n, lead + dominant + contextual, D] (tile 0: base).

        ``positions`` [n - 1, dominant]: each crop's kept patch indices on its ``side x side`` grid, used to put
        the crops' dominant tokens in raster order over the whole high-resolution grid."""
        if rows.shape[0] == 1:  # single tile: its tokens and the newline (official code)
            return torch.cat([rows[0], self.mm.image_newline[None].to(rows)])
        cfg = self.config
        _, nw = self.hf.get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        crops = rows[1:]
        tile = torch.arange(crops.shape[0])[:, None]  # raster index of the crop among nh x nw
        r, c = (tile // nw) * side + positions // side, (tile % nw) * side + positions % side
        order = (r * (nw * side) + c).flatten().argsort()
        D = rows.shape[-1]
        dominant_tokens = crops[:, lead:lead + dominant].reshape(-1, D)[staged_to(order, rows.device)]
        return torch.cat([rows[0], dominant_tokens, crops[:, :lead].reshape(-1, D),
                          crops[:, lead + dominant:].reshape(-1, D)])
