"""The one prefill / decode skeleton every family adapter shares (:class:`ModelPatch`): the wrapped ``forward``
methods, the image-slot bookkeeping of a prefill and the continuation of a pruned prefill while decoding. An
adapter gives only what differs (docs/integration.md, "Adding a family").

The skeleton replaces, on the instance only,

* ``model.forward``: to return a pruned prefill's logits and ``labels=`` loss in input coordinates
  (:mod:`vtprune.outputs`) and to hide
  ``mm_encoder_outputs`` from ``generate()`` (transformers >= 5.2x pre-encodes images through
  ``get_image_features`` when ``forward`` accepts it; the encoder stage must run inside our prefill, so
  ``generate`` passes ``pixel_values`` as it always did);
* ``model.model.forward``: a call with pixel values is a prefill built here (:meth:`ModelPatch._prefill`);
  a call that continues a pruned prefill's cache maps the incoming mask and positions onto the pruned cache;
  anything else runs unchanged.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch

from vtprune._compat import cache_from, output_cache
from vtprune.methods.base import ModelInfo
from vtprune.models._decoder import CacheRecord, Call, DecoderPatch
from vtprune.models._qk import decoder_qk
from vtprune.models._sequence import Sequence, padding_to_drop, staged_to

# function -> (signature, name of its **kwargs or None); weak keys, so an instance-level wrapper (accelerate's
# hooks, a closure over a model) never keeps its model alive
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(original):
    """``inspect.signature`` of a callable, cached per underlying function: building it walks the decorator chain
    (~100 us a call on the CPU, twice per decode step before). A bound method's signature never depends on the
    instance."""
    key = getattr(original, "__func__", original)
    try:
        found = _SIGNATURES.get(key)
    except TypeError:  # not weakly referenceable: no caching
        key, found = None, None
    if found is None:
        sig = inspect.signature(original)
        var_kw = next((n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        found = (sig, var_kw)
        if key is not None:
            _SIGNATURES[key] = found
    return found


def bound_arguments(original, args, kwargs) -> dict:
    """``original``'s arguments by name (``**kwargs`` flattened in)."""
    sig, var_kw = _signature(original)
    named = dict(sig.bind(*args, **kwargs).arguments)
    if var_kw is not None:
        named.update(named.pop(var_kw, {}))
    return named


def check_cache(cache, prefill: bool) -> None:
    if cache is None:
        return
    if getattr(cache, "is_compileable", False):
        raise ValueError("vtprune: static (compileable) caches are not supported; layer groups keep KV caches "
                         "of different lengths, use the default DynamicCache")
    if prefill and cache.get_seq_length() > 0:
        raise ValueError("vtprune: an image prefill must start from an empty cache (continuing a cached "
                         "conversation with a new image is not supported)")


@dataclass
class ImagePlacement:
    """Where each image unit's tokens go in a prefill, and what the host knows without reading the device again.

    An image unit is what the family's ``Encoded`` counts: an image, or a video's frame group. A row may hold
    several; each is its own span in the language model (also units next to each other in the prompt).

    slots : bool [B, L] on the device, the first ``counts_out[i]`` placeholders of each unit
    keep : bool [B, L] on the device, the tokens that stay: everything but the placeholders after the slots and
        the left padding a row no longer needs (``dropped`` [B] on the host: the batch is re-packed to its longest
        real row, see :func:`~vtprune.models._sequence.padding_to_drop`)
    kept : int64 [B] on the host, ``keep``'s count per row (the compacted length needs no device read)
    padding : int64 [B] on the host, padding tokens per row before compaction; ``tail_real``: whether every row's
        last token is real; ``left_padded``: whether every row's padding is all on its left
    visual : int64 [B] on the host, image placeholders per row (the unpruned visual tokens)
    images_of_row : [B] list of each row's unit indices, in prompt order
    first : [I] host list, the column of each unit's first placeholder
    """

    slots: torch.Tensor
    keep: torch.Tensor
    kept: torch.Tensor
    visual: torch.Tensor
    images_of_row: list
    padding: torch.Tensor
    tail_real: bool
    left_padded: bool
    dropped: torch.Tensor
    first: list
    counts_in: list
    counts_out: list

    @property
    def units(self) -> int:
        """The most units of a row (at least 1: the span tensors keep a unit axis)."""
        return max([1, *(len(i) for i in self.images_of_row)])

    def unit_table(self, values: list) -> torch.Tensor:
        """int64 [B, S] on the host: ``values[i]`` of each row's units in order, 0 where a row has fewer."""
        out = torch.zeros(len(self.images_of_row), self.units, dtype=torch.int64)
        for b, images in enumerate(self.images_of_row):
            for s, i in enumerate(images):
                out[b, s] = int(values[i])
        return out

    def set_spans(self, seq: Sequence) -> None:
        """``seq.spans`` [B, S, 2] after ``seq.compact(..., self.keep, self.slots, ...)``, from host values only:
        only left padding is dropped before a row's first placeholder, the row then moves by its added padding,
        and each unit by what the earlier units of its row dropped."""
        added, dropped = seq.added_host.tolist(), self.dropped.tolist()
        spans = torch.zeros(len(self.images_of_row), self.units, 2, dtype=torch.int64)
        for b, images in enumerate(self.images_of_row):
            removed = 0
            for s, i in enumerate(images):
                spans[b, s, 0] = self.first[i] - dropped[b] + added[b] - removed
                spans[b, s, 1] = self.counts_out[i]
                removed += self.counts_in[i] - self.counts_out[i]
        seq.spans = spans


def place_images(placeholders: torch.Tensor, mask: torch.Tensor | None, counts_in: list,
                 counts_out: list) -> ImagePlacement:
    """Plan the encoder stage's compaction with one host read of a few numbers per row and per unit.

    placeholders : bool [B, L], the placeholder tokens; units (images, frame groups) follow each other in
        row-major order and unit ``i`` owns ``counts_in[i]`` consecutive placeholders
    mask : [B, L] attention mask (0 = padding) or None (no padding)
    counts_out : tokens unit ``i`` has after the encoder stage (at most ``counts_in[i]``)
    """
    for i, (n, m) in enumerate(zip(counts_in, counts_out)):
        if m > n:
            raise ValueError(f"the encoder stage keeps {m} tokens of image {i}, more than the {n} the unpatched model "
                             f"feeds to the language model; lower the budget")
    B, L = placeholders.shape
    dev = placeholders.device
    j = torch.arange(L, device=dev)
    first = torch.where(placeholders, j, L).amin(1)
    real = torch.ones_like(placeholders) if mask is None else mask != 0
    starts = [0]
    for c in counts_in:
        starts.append(starts[-1] + c)
    I = len(counts_in)
    offsets = staged_to(torch.tensor(starts), dev)  # [I + 1]
    g = placeholders.flatten().long().cumsum(0).view(B, L) - 1  # global placeholder index
    image = torch.searchsorted(offsets[1:], g, right=True).clamp(max=max(I - 1, 0))  # [B, L]
    # each unit's first and last placeholder column (a text position counts for no unit: L / -1)
    unit_first = torch.full((I,), L, device=dev).scatter_reduce(0, image.flatten(),
                                                                 torch.where(placeholders, j, L).flatten(), "amin")
    unit_last = torch.full((I,), -1, device=dev).scatter_reduce(0, image.flatten(),
                                                                torch.where(placeholders, j, -1).flatten(), "amax")
    # the host needs, per row: placeholders, first and last placeholder, padding tokens, whether the last is real,
    # the first real token; per unit: its first and last placeholder
    stats = torch.stack([placeholders.sum(1), first, torch.where(placeholders, j, -1).amax(1), (~real).sum(1),
                         real[:, -1].long(), torch.where(real, j, L).amin(1)], 1)
    host = torch.cat([stats.flatten(), unit_first, unit_last]).tolist()  # the prefill bookkeeping's one host read
    n, _, _, padding, tail, first_real = zip(*(host[6 * b:6 * b + 6] for b in range(B)))
    first_h, last_h = host[6 * B:6 * B + I], host[6 * B + I:]
    if sum(n) != sum(counts_in):
        raise ValueError(f"the prompts hold {sum(n)} image placeholder tokens but the {len(counts_in)} images given "
                         f"need {sum(counts_in)} ({counts_in})")
    images_of_row, row_start = [], 0
    for b in range(B):
        lo, hi = row_start, row_start + n[b]
        images_of_row.append([i for i, c in enumerate(counts_in) if c and starts[i] < hi and starts[i + 1] > lo])
        row_start = hi
    for b, images in enumerate(images_of_row):
        lo = sum(n[:b])
        for i in images:
            if starts[i] < lo or starts[i + 1] > lo + n[b]:
                rows = [r for r, imgs in enumerate(images_of_row) if i in imgs]
                raise ValueError(f"image {i} needs {counts_in[i]} placeholder tokens but its placeholders run over "
                                 f"batch rows {rows}: the prompts' placeholder counts do not match the images (or "
                                 "their sizes)")
            if last_h[i] - first_h[i] + 1 != counts_in[i]:
                raise ValueError(f"the {counts_in[i]} placeholder tokens of image {i} (batch row {b}) are not one "
                                 "contiguous run: the prompts' placeholder counts do not match the images (or their "
                                 "sizes)")
    rank = g - offsets[image]
    out = staged_to(torch.tensor(list(counts_out) or [0]), dev)
    slots = placeholders & (rank < out[image])
    out_row = [sum(counts_out[i] for i in images) for images in images_of_row]
    kept = [L - c + o for c, o in zip(n, out_row)]
    left = first_real == padding  # all of each row's padding comes first
    keep = ~placeholders | slots
    drop = [0] * B
    if left:
        drop = padding_to_drop([k - p for k, p in zip(kept, padding)], list(padding))
        if any(drop):
            keep = keep & (j[None, :] >= staged_to(torch.tensor(drop), dev)[:, None])
    return ImagePlacement(slots, keep, torch.tensor([k - d for k, d in zip(kept, drop)]), torch.tensor(n),
                          images_of_row, torch.tensor(padding), all(tail), left, torch.tensor(drop), first_h,
                          list(counts_in), list(counts_out))


@dataclass
class Encoded:
    """What a family's :meth:`ModelPatch.encode` produced: the tokens of every image unit (an image; a video's frame
    group), unit after unit in order of appearance in the prompts. Each unit becomes its own span.

    features : [S, D] every unit's tokens, after the projector (and the method's encoder hook)
    counts_in : placeholder tokens per unit in ``input_ids`` (what the unpatched model feeds)
    counts_out : tokens per unit after the encoder hook
    per : multiplier of int budgets per unit (tiles for LLaVA-NeXT), or None
    origin, record : image 0's original patch indices and encoder selection (retention maps), or None
    sources : per unit, int64 [counts_out[i]] index of the placeholder whose position each new token takes, or
        None (the first ``counts_out[i]``); used where positions are not re-compacted
    capped : per unit, whether the encoder hook kept every token because the budget asked for more
        (``Selection.capped``), or None
    """

    features: torch.Tensor
    counts_in: list
    counts_out: list
    per: list | None = None
    origin: list | None = None
    record: dict | None = None
    sources: list | None = None
    capped: list | None = None


class ModelPatch:
    """The shared prefill / decode skeleton; a family adapter subclasses it and gives only what differs.

    A family sets :attr:`recompact`, :attr:`cap_budgets` and :attr:`qk` and implements :meth:`encode` (where the
    image features come from, with the method's encoder hook); it may override :meth:`model_info`,
    :meth:`install_scores` (patch the vision tower's scoring layer), :meth:`placeholders` (the placeholder layout),
    :meth:`positions` and :meth:`_decode_positions` (position ids), :meth:`is_prefill`, :meth:`prefill_embeds`,
    :meth:`prefill_arguments` and :meth:`prefill_output`. The adapter
    is registered in :data:`vtprune.models.FAMILIES` (docs/integration.md, "Adding a family").
    """

    recompact = True  # 1-D positions re-compacted after a prune; False: kept tokens keep theirs (M-RoPE)
    cap_budgets = False  # dynamic resolutions: an int budget larger than an image keeps all of it (Selection.capped)
    qk = staticmethod(decoder_qk)  # post-RoPE q/k of a decoder layer, recomputed (vtprune.models._qk)
    decoder_patch = DecoderPatch  # the decoder-layer wrapper (Qwen3-VL's adds its deepstack levels)

    def __init__(self, model, method, hooks, restore):
        self.model, self.method, self.hooks = model, method, hooks
        self.backend = method.backend
        self.mm = model.model
        self.lm = self.mm.language_model
        self.config = model.config
        self.last_call = None
        self.num_layers = self.config.get_text_config().num_hidden_layers
        self.install_scores(restore)
        method.check_model(self.model_info())
        self.decoder = self.decoder_patch(self.lm, method, hooks, self.qk, restore)
        self.decoder.cap = self.cap_budgets
        self.install(restore)

    # ------------------------------------------------------------------ what a family gives
    def model_info(self) -> ModelInfo:
        """What the method's budget check (:meth:`vtprune.methods.Method.check_model`) may know of the images."""
        return ModelInfo(type(self.model).__name__, self.num_layers)

    def install_scores(self, restore) -> None:
        """Patch the vision tower's scoring layer when the method's encoder hook needs scores."""

    def encode(self, a: dict) -> Encoded:
        """The image tokens of a prefill's arguments ``a`` (vision tower, encoder hook, projector)."""
        raise NotImplementedError

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B, L]: the image placeholder tokens."""
        return input_ids == self.config.image_token_id

    def positions(self, a: dict, input_ids, mask, placeholders) -> torch.Tensor:
        """Position ids of the unpruned prompt, [B, L] (or [3, B, L] for M-RoPE); 1-D: the given ones or
        ``0..L-1`` as the language model's forward would use."""
        B, L = input_ids.shape
        positions = a.get("position_ids")
        if positions is None:
            positions = torch.arange(L, device=input_ids.device)
        return positions.expand(B, L)

    def is_prefill(self, a: dict) -> bool:
        """Whether a call of the multimodal body with arguments ``a`` is a visual prefill (it carries pixels)."""
        return a.get("pixel_values") is not None

    def prefill_embeds(self, call: Call, embeds: torch.Tensor) -> torch.Tensor:
        """The language model's ``inputs_embeds`` from the compacted prompt ``embeds`` [B, L', D'] (the token
        embeddings with the image tokens written in). A family whose image tokens carry extra channels along
        (``Encoded.features`` wider than the embeddings; zero on text) takes them off here, into ``call.scratch``."""
        return embeds

    def prefill_arguments(self, a: dict) -> None:
        """Drop from ``a`` what the language model's forward must not see once the image is encoded."""

    def prefill_output(self, out, enc: Encoded):
        return out

    # ------------------------------------------------------------------ the skeleton
    def install(self, restore) -> None:
        fwd = self.mm.forward
        restore.set_attr(self.mm, "forward", functools.wraps(fwd)(lambda *a, **k: self.forward(fwd, a, k)))
        top = self.model.forward
        wrapper = functools.wraps(top)(lambda *a, **k: self.top_forward(top, a, k))
        sig = inspect.signature(top)
        wrapper.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items()
                                                        if n != "mm_encoder_outputs"])
        restore.set_attr(self.model, "forward", wrapper)

    def top_forward(self, original, args, kwargs):
        # logits, labels= loss and kept_positions of a pruned prefill in input coordinates
        from vtprune.outputs import patched_forward

        return patched_forward(self, original, args, kwargs)

    def forward(self, original, args, kwargs):
        a = bound_arguments(original, args, kwargs)
        if self.is_prefill(a):
            return self._prefill(original, a)
        cache = cache_from(a)
        record = self.decoder.records.get(cache) if cache is not None else None
        if record is None:
            return original(*args, **kwargs)
        return self._continue(original, a, record)

    def _prefill(self, original, a):
        """Placeholders -> image tokens -> compacted sequence -> the language model's forward on it."""
        input_ids, cache, mask_in = self._check_prefill(a)
        B, L = input_ids.shape
        placeholders = self.placeholders(input_ids)  # [B, L]
        mask = mask_in if mask_in is not None else torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        positions = self.positions(a, input_ids, mask, placeholders)
        enc = self.encode(a)
        place = place_images(placeholders, mask_in, enc.counts_in, enc.counts_out)
        images_of_row = place.images_of_row
        embeds = self.mm.get_input_embeddings()(input_ids)
        extra = enc.features.shape[-1] - embeds.shape[-1]
        if extra > 0:  # channels the image tokens carry along (zero on text), compacted with them
            embeds = torch.cat([embeds, embeds.new_zeros(*embeds.shape[:2], extra)], -1)
        value_pos = None if self.recompact else _source_positions(positions, placeholders, enc)
        seq = Sequence(mask, positions, torch.zeros(B, 1, 2, dtype=torch.int64), torch.zeros(B, dtype=torch.int64),
                       recompact=self.recompact, pad_host=place.padding, tail_real=place.tail_real,
                       left_padded=place.left_padded)
        embeds, _ = seq.compact(embeds, place.keep, place.slots, enc.features.to(embeds.dtype), value_pos,
                                kept=place.kept, dropped_padding=place.dropped)
        place.set_spans(seq)
        row0_single = len(images_of_row[0]) == 1 and images_of_row[0] == [0]
        call = self.decoder.prefill_call(seq, place.visual, enc.origin if row0_single else None)
        call.orig_len = L
        # per image unit (an image; a video's frame group): budgets and statistics
        call.unit_original = place.unit_table(enc.counts_in)
        call.unit_per = place.unit_table(enc.per if enc.per is not None else [1] * len(enc.counts_in))
        call.unit_counts.append(("unpruned", call.unit_original))
        if self.hooks.encoder:
            call.unit_counts.append(("encoder", seq.spans[..., 1].clone()))
            for b, images in enumerate(images_of_row):
                for u, i in enumerate(images):
                    if enc.capped is not None and enc.capped[i]:
                        call.capped.append({"row": b, "unit": u, "stage": "encoder", "tokens": enc.counts_out[i]})
        if enc.record is not None and row0_single:
            call.selections.append(enc.record)
        embeds = self.prefill_embeds(call, embeds)
        self.prefill_arguments(a)
        out = self._run_prefill(original, a, call, embeds, cache)
        return self.prefill_output(out, enc)

    @staticmethod
    def _check_prefill(a):
        """Arguments every image prefill needs; returns (input_ids, cache, 2-D attention mask or None)."""
        input_ids = a.get("input_ids")
        if input_ids is None:
            raise ValueError("vtprune: a prefill with pixel_values needs input_ids (to find the image placeholders)")
        if a.get("inputs_embeds") is not None:
            raise ValueError("vtprune: pass input_ids, not inputs_embeds, with pixel_values")
        if a.get("mm_encoder_outputs") is not None:
            raise ValueError("vtprune: mm_encoder_outputs is not supported (the encoder stage runs in the prefill)")
        cache = cache_from(a)
        check_cache(cache, prefill=True)
        mask = a.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
            raise ValueError(f"vtprune needs a 2-D attention_mask of input_ids' shape {tuple(input_ids.shape)}, got "
                             f"shape {tuple(mask.shape)}")
        return input_ids, cache, mask

    def _run_prefill(self, original, a, call: Call, embeds, cache):
        """Run the language model's own forward on the pruned ``embeds`` with the decoder patch active."""
        seq = call.seq
        # the host knows the padding after a compaction (None: not compacted, the caller's mask decides)
        padded = bool((seq.mask == 0).any()) if seq.pad_host is None else bool(seq.pad_host.max() > 0)
        a.update(input_ids=None, pixel_values=None, inputs_embeds=embeds, position_ids=seq.positions,
                 attention_mask=seq.mask if padded else None)
        call.copy_hidden = self._records_hidden(a)
        self.decoder.active = call
        try:
            out = original(**a)
        finally:
            self.decoder.active = None
        self.decoder.finish_prefill(call, output_cache(out) if cache is None else cache)
        self.last_call = call
        return out

    def _records_hidden(self, a) -> bool:
        """Whether this forward records the decoder layers' hidden states (``output_hidden_states``: a flag, an
        index or indices, else the language model's config); a per-layer hook must then not overwrite them."""
        flag = a.get("output_hidden_states")
        if flag is None:
            flag = getattr(self.lm.config, "output_hidden_states", False)
        return flag is not None and flag is not False

    def _decode_positions(self, a, record: CacheRecord, mask, q: int):
        """Positions of the ``q`` new tokens in the unpruned sequence ([B, q]; Qwen2.5-VL: [3, B, q])."""
        positions = a.get("position_ids")
        B = mask.shape[0]
        if positions is None:
            grown = mask.shape[1] - q - record.orig_len
            positions = torch.arange(q, device=mask.device) + record.orig_len + grown
        return positions.expand(B, q)

    def _continue(self, original, a, record: CacheRecord):
        cache = cache_from(a)
        check_cache(cache, prefill=False)
        ids = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        B, q = ids.shape[:2]
        grown = cache.get_seq_length(0) - record.masks[0].shape[1]  # tokens decoded since the prefill
        if q > 1:
            # generate() over a cache slices the new prompt by the cache's length, which is the pruned length: the
            # tokens fed would not be the new ones (and an all-ones mask, dropped by generate, cannot tell)
            raise ValueError(f"vtprune: {q} tokens fed at once onto a pruned KV cache; continuing a pruned cache "
                             "with a new prompt (multi-turn generate(past_key_values=...), assisted decoding) is not "
                             "supported: run each turn's whole conversation, with its images, from an empty cache")
        mask = a.get("attention_mask")
        built = mask is None  # generate() drops an all-ones mask: every new token is then known to be real
        if built:
            mask = torch.ones(B, record.orig_len + grown + q, dtype=torch.long, device=ids.device)
        if mask.dim() != 2 or mask.shape[1] != record.orig_len + grown + q:
            if mask.dim() == 2 and mask.shape[1] > record.orig_len + grown + q:
                raise ValueError("vtprune: the attention_mask is longer than the pruned prefill and the tokens decoded "
                                 "since; continuing a pruned cache with a new prompt (multi-turn "
                                 "generate(past_key_values=...)) is not supported")
            raise ValueError(f"vtprune: a 2-D attention_mask over the unpruned sequence is expected while decoding "
                             f"(length {record.orig_len + grown + q}), got shape {tuple(mask.shape)}")
        call = self.decoder.decode_call(record, mask, self._decode_positions(a, record, mask, q),
                                        new_real=True if built else None)
        # a group-0 mask known to hold no padding goes in as None, so the mask builder does not read it on the host
        a.update(attention_mask=None if call.unpadded[0] else call.group_masks[0],
                 position_ids=call.group_positions[0])
        call.copy_hidden = self._records_hidden(a)
        self.decoder.active = call
        try:
            return original(**a)
        finally:
            self.decoder.active = None


def _source_positions(positions, placeholders, enc: Encoded) -> torch.Tensor:
    """The positions ([S] or [3, S]) the new image tokens take where positions are not re-compacted: each kept
    token its own, a merged token its target's (``enc.sources``)."""
    lead = positions.shape[:-2]
    B, L = placeholders.shape
    flat = positions.reshape(-1, B, L).permute(1, 2, 0)[placeholders].T  # [C, placeholders]
    per_image = torch.split(flat, enc.counts_in, dim=1)
    sources = enc.sources or [None] * len(per_image)
    out = torch.cat([p if k is None else p[:, k.to(p.device)] for p, k in zip(per_image, sources)], 1)
    return out if lead else out[0]
