"""The patched decoder loop shared by every family: per-layer wrappers, decoder hooks, and decode bookkeeping.

The language model's own ``forward`` is left alone (so output capture, masks and caches keep working across
``transformers`` versions). Instead each decoder layer of the instance gets a wrapper. During a call that the
family patch opened (:meth:`DecoderPatch.activate`), the wrapper

1. swaps in the attention mask, position ids and position embeddings of the layer's *group* (the layers
   between two decoder hooks run on the same, shorter sequence and share a KV-cache length);
2. lets the method replace the layer call (:meth:`vtprune.methods.base.Method.run_layer`), in prefill and decode
   calls. Inside ``run_layer`` the layer is not wrapped again: a call to it runs the original forward
   (re-entrance guard). ``run_layer`` may overwrite the hidden states in place (a routed layer does); when the
   forward records hidden states (``output_hidden_states``) it gets a copy;
3. after a layer listed in the method's ``Hooks.prune_after``, asks the method which tokens of each image unit
   (an image; a video's frame group) stay (:meth:`vtprune.methods.base.Method.select_visual`) and compacts the
   sequence to them, every unit in its own span (prefill only).

The span and key-padding tensors handed to ``run_layer`` are the same objects for every layer of a group in one
forward call (a method may cache per-forward work on their identity).

Group 0 is what the language model's own forward prepares from the inputs the family patch hands it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch

from vtprune._compat import cache_from, cache_kwargs
from vtprune.methods.base import Hooks, LayerCall, Method, PruneContext
from vtprune.models._sequence import Sequence, padding_to_drop, staged_to


@dataclass
class CacheRecord:
    """What decoding needs to know about a pruned prefill: per group, the prefill's 2-D mask and the
    cumulative number of tokens dropped per row; ``orig_len`` is the unpruned prefill length. ``padded``: per
    group, whether its prefill mask holds padding (read once on the host after the prefill, so that decode steps
    need not read the masks again)."""

    orig_len: int
    masks: list
    shifts: list
    padded: list
    state: dict = field(default_factory=dict)  # the method's per-prefill state (LayerCall.state)


@dataclass
class Call:
    """State of one forward call through the patched model."""

    prefill: bool
    seq: Sequence
    group_masks: list  # per group: 2-D mask [B, Lg]
    group_positions: list  # per group: positions [B, Lg]
    group_shifts: list
    original_visual: torch.Tensor  # [B] visual tokens per row before any pruning
    # per image unit (an image; a video's frame group), int64 [B, S] on the host: tokens before any pruning, and
    # the multiplier of int counts (LLaVA-NeXT: crops of the unit's image)
    unit_original: torch.Tensor | None = None
    unit_per: torch.Tensor | None = None
    unit_counts: list = field(default_factory=list)  # (stage, tokens per unit [B, S] on the host), for Stats
    capped: list = field(default_factory=list)  # units kept whole because the budget asked for more (Stats)
    built: dict = field(default_factory=dict)  # group -> (causal mask, position embeddings)
    # statistics per layer, read only when the user asks (Handle.stats): visual tokens [B] (CPU), image span [B]
    # (CPU), real tokens [B] (on the device: no host read while the model runs)
    visual_per_layer: list = field(default_factory=list)
    span_per_layer: list = field(default_factory=list)
    real_per_layer: list = field(default_factory=list)
    selections: list = field(default_factory=list)  # retention-map records, row 0
    origin: list | None = None  # row 0: original patch index of each current visual token
    orig_len: int = 0  # unpruned length of the prefill sequence
    copy_hidden: bool = False  # hidden states are recorded: a run_layer hook must not overwrite its input
    key_padding: dict = field(default_factory=dict)  # group -> (bool key padding mask [B, Lg], real tokens [B])
    scratch: dict = field(default_factory=dict)  # a method hook's per-call cache (LayerCall.scratch)
    state: dict = field(default_factory=dict)  # a method hook's per-prefill state, kept with the cache
    unpadded: list | None = None  # decode: per group, True when its mask is known on the host to hold no padding
    padded: list | None = None  # per group, True when its mask is known on the host to hold padding (prefill: None
    # when unknown)
    _span_total: tuple | None = None  # (seq.spans it was summed from, image tokens per row [B])

    def span_total(self) -> torch.Tensor:
        """Image tokens per row over its units [B] (host), summed once per span tensor: the spans change only at a
        compaction, not at every layer."""
        spans = self.seq.spans
        if self._span_total is None or self._span_total[0] is not spans:
            self._span_total = (spans, spans[..., 1].sum(-1))
        return self._span_total[1]


class DecoderPatch:
    """Wraps the decoder layers of one language-model instance. ``qk(layer, hidden, position_embeddings)``
    returns post-RoPE ``(q [B,H,L,d], k [B,Hkv,L,d], scale)`` of a layer, family-specific."""

    def __init__(self, language_model, method: Method, hooks: Hooks, qk, restore):
        self.lm = language_model
        self.method, self.hooks = method, hooks
        self.qk = qk
        self.active: Call | None = None
        self.cap = False  # set by the family: an int budget larger than a unit keeps all of it (PruneContext.cap)
        self._in_hook = False  # a method's run_layer is running: a layer called inside it runs unwrapped
        self.hooked = type(method).run_layer is not Method.run_layer
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.layers = list(language_model.layers)
        self.stage_after = {n - 1: n for n in hooks.prune_after}  # index of the layer a decoder hook follows
        bounds = [0, *hooks.prune_after]
        self.first_layer = bounds
        self.group_of = [sum(i >= b for b in bounds) - 1 for i in range(len(self.layers))]
        module = sys.modules[type(language_model).__module__]
        self._create_causal_mask = module.create_causal_mask
        for i, layer in enumerate(self.layers):
            restore.set_attr(layer, "forward", self._wrap(i, layer, layer.forward))

    @property
    def num_groups(self) -> int:
        return len(self.first_layer)

    # ------------------------------------------------------------------ per-layer wrapper
    def _wrap(self, i, layer, original):
        def forward(hidden_states, *args, **kwargs):
            call = self.active
            if call is None or self._in_hook:
                return original(hidden_states, *args, **kwargs)
            g = self.group_of[i]
            if g > 0:
                causal, pos_emb = self._group_inputs(call, g, hidden_states, kwargs)
                kwargs.update(attention_mask=causal, position_embeddings=pos_emb,
                              position_ids=_layer_positions(call.group_positions[g]))
            if g not in call.key_padding:  # once per group and call: same tensor for every layer, one host read
                kpm = call.group_masks[g].bool()
                call.key_padding[g] = (kpm, kpm.sum(1) if call.prefill else None)  # real tokens per row: stats
                if call.prefill and call.seq.pad_host is not None:  # the same counts on the host, for hooks
                    call.scratch["real_tokens"] = kpm.shape[1] - call.seq.pad_host
            kpm, real = call.key_padding[g]
            out = lc = None
            if self.hooked:
                lc = LayerCall(i, layer, original, hidden_states.clone() if call.copy_hidden else hidden_states,
                               kwargs, call.seq.spans, kpm, call.prefill, num_layers=len(self.layers),
                               scratch=call.scratch, state=call.state)
                self._in_hook = True
                try:
                    out = self.method.run_layer(lc)
                finally:
                    self._in_hook = False
            if out is None:
                out = original(hidden_states, *args, **kwargs)
            if call.prefill:
                span = call.span_total()  # image tokens per row, over its units
                call.span_per_layer.append(span)  # a hook's skipped image tokens (span - visual) do not run
                call.visual_per_layer.append(span if lc is None or lc.visual_tokens is None else lc.visual_tokens)
                call.real_per_layer.append(real)
                after = self.stage_after.get(i)
                if after is not None:
                    hidden = out[0] if isinstance(out, tuple) else out
                    pruned = self._prune(call, after, g, hidden, hidden_states, kwargs)
                    out = (pruned, *out[1:]) if isinstance(out, tuple) else pruned
            return out

        return forward

    def _group_inputs(self, call: Call, g: int, hidden, kwargs):
        if g not in call.built:
            positions = call.group_positions[g]
            # Decode steps: what the host knows about a group's padding spares the mask builder reading the mask
            # (SDPA's causal-skip test). No padding: the mask goes in as None. Padding: that test would fail anyway,
            # so it is not allowed (the same mask results).
            if call.prefill:  # what the compaction told the host (None: unknown)
                padded = bool(call.padded[g])
                unpadded = call.padded[g] is False
            else:
                known = call.unpadded is not None
                unpadded, padded = known and call.unpadded[g], known and call.padded[g]
            causal = self._create_causal_mask(
                config=self.lm.config, inputs_embeds=hidden,
                attention_mask=None if unpadded else call.group_masks[g],
                **cache_kwargs(cache_from(kwargs)), position_ids=_layer_positions(positions),
                layer_idx=self.first_layer[g], allow_is_causal_skip=not padded,
            )
            call.built[g] = (causal, self.lm.rotary_emb(hidden, positions))
        return call.built[g]

    # ------------------------------------------------------------------ decoder hook
    def _prune(self, call: Call, after: int, g: int, hidden, layer_in, kwargs, tokens=None):
        """Run the method's decoder hook after ``after`` layers and compact the sequence to its selection.

        ``hidden`` [B, L, D]: the layer's output (what the next layer's q/k are recomputed from); ``tokens``
        [B, L, D'] (default ``hidden``): what is selected, merged and compacted, the hidden states with any
        per-token channels a family carries along (e.g. Qwen3-VL's deepstack levels). Returns the compacted
        ``tokens``.

        The hook sees image units (an image; a video's frame group), each with its row's hidden states and its own
        span; a row with several units appears once per unit. Every span is compacted to its unit's selection and
        moves by what its row dropped before it (host arithmetic: no device read)."""
        seq = call.seq
        values_in = hidden if tokens is None else tokens
        B, L, _ = hidden.shape
        spans = seq.spans  # [B, S, 2] on the host
        stage = f"after layer {after}"
        units = [(b, s) for b in range(B) for s in range(spans.shape[1]) if int(spans[b, s, 1]) > 0]
        if not units:
            call.unit_counts.append((stage, spans[..., 1].clone()))
            self._next_group(call, g)
            return values_in
        kpm = call.group_masks[g].bool().to(hidden.device)
        # a compaction only adds left padding: the host knows whether the last column is real
        tail_real = seq.tail_real if seq.tail_real is not None else bool(kpm[:, -1].all())
        computed = {}

        def qk(which):  # the whole batch's q/k, recomputed once per kind and hook call
            if which not in computed:
                score_in, score_layer = (hidden, self.layers[after]) if which == "next" \
                    else (layer_in, self.layers[after - 1])
                computed[which] = self.qk(score_layer, score_in, kwargs["position_embeddings"])
            return computed[which]

        # one hook call per group of units with the same (count, original count, multiplier), at most B units a
        # call (a row's hidden states are gathered once per unit: no call holds more than the batch's worth)
        key_of = {(b, s): (int(spans[b, s, 1]), int(call.unit_original[b, s]), int(call.unit_per[b, s]))
                  for b, s in units}
        pieces, kept_at, sizes = {}, {}, {}
        for key in sorted(set(key_of.values())):
            group = [u for u in units if key_of[u] == key]
            for lo in range(0, len(group), B):
                self._select(call, after, key, group[lo:lo + B], hidden, tokens, kpm, tail_real, qk, pieces,
                             kept_at, sizes)
        keep = torch.ones(B, L, dtype=torch.bool)
        slots = torch.zeros(B, L, dtype=torch.bool)
        removed = [0] * B  # tokens each row drops from its units
        for b, s in units:
            start, n = int(spans[b, s, 0]), int(spans[b, s, 1])
            m = sizes[(b, s)]
            keep[b, start + m:start + n] = False
            slots[b, start:start + m] = True
            removed[b] += n - m
        values = torch.cat([pieces[u] for u in units])  # row-major, span order: the slots' order
        drop = [0] * B
        if seq.left_padded and seq.pad_host is not None:  # re-pack to the longest real row
            pad = seq.pad_host.tolist()
            drop = padding_to_drop([L - p - r for p, r in zip(pad, removed)], pad)
            for b, k in enumerate(drop):
                keep[b, :k] = False
        value_positions = None
        if not seq.recompact:  # kept tokens keep their positions, merged ones their target's
            value_positions = torch.cat([seq.positions[..., b, kept_at[(b, s)]] for b, s in units], -1)
        out, _ = seq.compact(values_in, keep, slots, values, value_positions, dropped_padding=torch.tensor(drop))
        # only left padding is dropped before a row's first span: each span moves by that, the added padding and
        # what the row's earlier spans dropped (host)
        added = seq.added_host.tolist()
        new = torch.zeros_like(spans)
        shift = [added[b] - drop[b] for b in range(B)]
        for b, s in units:
            new[b, s, 0] = int(spans[b, s, 0]) + shift[b]
            new[b, s, 1] = sizes[(b, s)]
            shift[b] -= int(spans[b, s, 1]) - sizes[(b, s)]
        seq.spans = new
        call.unit_counts.append((stage, new[..., 1].clone()))
        self._next_group(call, g)
        return out

    def _select(self, call: Call, after, key, entries, hidden, tokens, kpm, tail_real, qk, pieces, kept_at, sizes):
        """One ``select_visual`` call on ``entries`` (``(row, unit)`` pairs of one key); its answer per entry."""
        n, original, per = key
        seq = call.seq
        rows = [b for b, _ in entries]
        spans = seq.spans[torch.tensor(rows), torch.tensor([s for _, s in entries])]  # [R, 2]
        dev_rows = staged_to(torch.tensor(rows), hidden.device)

        def rows_qk(which):
            q, k, scale = qk(which)
            return q[dev_rows], k[dev_rows], scale

        rows_hidden = hidden[dev_rows]
        ctx = PruneContext(rows_hidden, rows_hidden if tokens is None else tokens[dev_rows], spans, kpm[dev_rows],
                           after, n, original, per, rows, tail_real, len(self.layers), rows_qk,
                           units=[s for _, s in entries], cap=self.cap)
        sel = self.method.select_visual(ctx)
        m = sel.tokens.shape[1]
        if m > n:
            raise ValueError(f"{type(self.method).__name__}: the hook after layer {after} returned {m} visual "
                             f"tokens per unit but batch row {ctx.rows[0]} has only {n} in unit {ctx.units[0]}")
        if not seq.recompact:  # where the new tokens come from, on the device (the host never reads it)
            kept_dev = staged_to(spans[:, :1], sel.origin.device) + sel.origin
        for j, u in enumerate(entries):
            pieces[u] = sel.tokens[j]
            sizes[u] = m
            if not seq.recompact:
                kept_at[u] = kept_dev[j]
            if sel.capped:
                call.capped.append({"row": u[0], "unit": u[1], "stage": f"after layer {after}", "tokens": m})
            if u == (0, 0):
                self._record(call, f"after layer {after}", sel.keep_idx[j],
                             sel.keep_idx[j, :0] if sel.target_idx is None else sel.target_idx[j])

    def _next_group(self, call: Call, g: int) -> None:
        call.padded.append(_padded(call.seq))
        call.group_masks.append(call.seq.mask)
        call.group_positions.append(call.seq.positions)
        call.group_shifts.append(call.seq.shift.clone())

    @staticmethod
    def _record(call: Call, name: str, keep_idx, target_idx) -> None:
        """Row 0's selection of a stage, kept on the device; :func:`resolve_selections` maps it to original patch
        indices when the statistics are read."""
        if call.origin is None:
            return
        call.selections.append({"stage": name, "keep_idx": keep_idx, "target_idx": target_idx})

    # ------------------------------------------------------------------ calls
    def prefill_call(self, seq: Sequence, original_visual, origin) -> Call:
        return Call(True, seq, [seq.mask], [seq.positions], [seq.shift.clone()], original_visual, origin=origin,
                    padded=[_padded(seq)])

    def finish_prefill(self, call: Call, cache) -> None:
        """Remember the groups' prefill masks and shifts for decoding with ``cache``."""
        if len(call.group_masks) != self.num_groups:
            raise RuntimeError(f"vtprune: {len(call.group_masks)} layer groups ran, expected {self.num_groups}")
        if cache is not None:
            padded = call.padded
            if any(p is None for p in padded):  # a group not compacted on the host: one read for all groups
                dev = call.group_masks[0].device
                padded = torch.stack([(m == 0).any().to(dev) for m in call.group_masks]).tolist()
            # the shifts go to the device once here, not once per group on every decode step
            dev = call.group_masks[-1].device
            shifts = [staged_to(t, dev) for t in call.group_shifts]
            self.records[cache] = CacheRecord(call.orig_len, list(call.group_masks), shifts, padded, call.state)

    def decode_call(self, record: CacheRecord, attention_mask, positions, new_real: bool | None = None) -> Call:
        """Group masks and positions for a call that continues a pruned prefill (no new image).

        ``new_real``: whether every new column of ``attention_mask`` is a real token, when the caller knows (it built
        the mask itself). A group whose prefill had no padding then has none, and its mask need not be read again.
        Unknown (``None``): read once here if a group's prefill had no padding (instead of once per such group in
        the mask builder)."""
        new_cols = attention_mask[:, record.orig_len:]
        if new_real is None:
            new_real = not all(record.padded) and bool((new_cols != 0).all())
        masks = [torch.cat([m.to(new_cols.device, new_cols.dtype), new_cols], 1) for m in record.masks]
        pos = [positions - s.to(positions.device)[:, None] for s in record.shifts]
        seq = Sequence(masks[0], pos[0], torch.zeros(masks[0].shape[0], 1, 2, dtype=torch.int64), record.shifts[0])
        # positions [B, q] or [3, B, q]: each group's shift [B] broadcasts over the trailing query dimension
        return Call(False, seq, masks, pos, list(record.shifts), torch.zeros(masks[0].shape[0], dtype=torch.int64),
                    unpadded=[new_real and not p for p in record.padded], padded=list(record.padded),
                    state=record.state, scratch={"new_columns_real": new_real})


def _layer_positions(positions):
    """What a decoder layer and the mask builder get as ``position_ids``: 1-D text positions [B, L] as they are;
    3-D M-RoPE positions [3, B, L] are only used through the rotary embedding (Qwen2.5-VL's text model passes
    ``position_ids=None`` to its layers and ``create_causal_mask`` then)."""
    return positions if positions.dim() == 2 else None


def _padded(seq: Sequence) -> bool | None:
    """Whether ``seq``'s mask holds padding, when the host knows it from the last compaction (else None)."""
    return None if seq.pad_host is None else bool(seq.pad_host.max() > 0)


def _host_indices(parts) -> list:
    """A flat host list of indices from ints, lists and device index tensors (read here, at statistics time)."""
    out = []
    for p in parts:
        if torch.is_tensor(p):
            out += p.tolist()
        elif isinstance(p, list):
            out += p
        else:
            out.append(p)
    return out


def resolve_selections(call: Call) -> list:
    """Row 0's stage selections as original patch indices ("kept", "contextual"): the host reads happen here, when
    the statistics are read, not while the model runs."""
    origin = _host_indices(call.origin or [])
    out = []
    for sel in call.selections:
        if "keep_idx" not in sel:
            out.append({"stage": sel["stage"], "kept": _host_indices(sel["kept"]),
                        "contextual": _host_indices(sel["contextual"])})
            continue
        kept = [origin[j] for j in sel["keep_idx"].tolist()]
        targets = [origin[j] for j in sel["target_idx"].tolist()]
        out.append({"stage": sel["stage"], "kept": kept, "contextual": targets})
        origin = kept + targets
    return out
