"""The language model's token sequence while it is being pruned: compaction, positions, masks, decode shifts.

Every prune (the encoder stage replacing image placeholders, or an LLM stage) is expressed the same way: a
boolean ``keep [B, L]`` over the current sequence, where the first ``m`` slots of an image span are kept and
later overwritten with the ``m`` new tokens, and every dropped token is an image token or left padding. Rows
may drop different numbers of tokens (a row without an image, per-row ratio budgets); the batch becomes as long
as its longest real row (left padding a row no longer needs is dropped, :func:`padding_to_drop`) and the
shorter rows are left-padded, which is what the attention masks already express.

Positions follow the official token-pruning code: after a prune they are re-compacted, i.e. every kept token
moves down by the number of tokens dropped before it in its row, so a batch row without padding runs on
``0..L'-1``. With no token dropped nothing moves, which is what makes a keep-all budget reproduce the unpatched
model. During decoding the layers after a stage see the incoming positions minus that stage's cumulative
drop (``shift``), so each layer group stays consistent with its own, shorter KV cache.

With ``recompact=False`` (Qwen2.5-VL's 3-D M-RoPE, see :mod:`vtprune.models.qwen2_5_vl`) every kept token keeps
its original position and a merged (contextual) token takes its target's; ``shift`` then stays zero, so decoding
uses the unpruned model's positions (and ``rope_deltas``) unchanged. Positions are ``[B, L]`` or ``[3, B, L]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequence:
    """Rectangular batch state. ``mask`` [B, L] long (1 = real token), ``positions`` [B, L] or [3, B, L] int64,
    ``spans`` [B, S, 2] int64 on the CPU (start, count) of each image unit of a row (an image; a video's frame
    group), in sequence order, ``S`` the most units of a row (count 0: no unit there),
    ``shift`` [B] int64 cumulative position shift per row (tokens dropped, or 0 when not re-compacting)."""

    mask: torch.Tensor
    positions: torch.Tensor
    spans: torch.Tensor
    shift: torch.Tensor
    recompact: bool = True
    pad_host: torch.Tensor | None = None  # [B] host: padding tokens per row, when the host knows them
    tail_real: bool | None = None  # whether every row's last token is real, when the host knows it
    added_host: torch.Tensor | None = None  # [B] host: left padding the last compaction added (None: not known)
    left_padded: bool = False  # known on the host: every row's padding is all on its left
    origin: torch.Tensor | None = None  # [B, L] input index of each position (-1: padding a compaction added)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def compact(self, hidden: torch.Tensor, keep: torch.Tensor, slots: torch.Tensor, values: torch.Tensor | None,
                value_positions: torch.Tensor | None = None, kept: torch.Tensor | None = None,
                dropped_padding: torch.Tensor | None = None):
        """Drop ``~keep`` tokens and write ``values`` into the kept ``slots`` (both bool [B, L]).

        ``values``: [S, D] the tokens for the slots in row-major order (``None`` leaves the slots as they are).
        ``value_positions``: [S] or [3, S] their positions, required when not re-compacting (``recompact=False``).
        ``kept``: [B] host count of ``keep`` per row, when ``keep`` is on the device (else it is read once).
        ``dropped_padding``: [B] host count of the padding tokens ``keep`` drops (to keep ``pad_host``).
        Returns the new hidden states [B, L', D]; updates ``mask``, ``positions``, ``shift`` in place and
        returns the new slot mask [B, L'] for span bookkeeping.
        """
        B, L = keep.shape
        dev = hidden.device
        if kept is not None or keep.device.type == "cpu":  # planned on the host: the new length needs no device read
            kept_host = keep.sum(1) if kept is None else kept
            new_len = int(kept_host.max())
            self.added_host = new_len - kept_host
            if self.pad_host is not None:
                self.pad_host = self.pad_host + self.added_host - (0 if dropped_padding is None else dropped_padding)
        else:
            new_len = int(keep.sum(1).max())
            self.pad_host = self.added_host = None
        keep = staged_to(keep, dev)
        kept = keep.sum(1)  # [B]
        pad = new_len - kept  # extra left padding per row
        # kept positions first, in ascending order (stable sort of the "dropped" flag)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # [B, L]
        t = torch.arange(new_len, device=dev)
        rank = t[None, :] - pad[:, None]  # [B, L'] index among the kept tokens, < 0 on new padding
        real_slot = rank >= 0
        src = order.gather(1, rank.clamp(min=0))  # [B, L'] source index in the old sequence
        gone = (~keep).long()
        dropped_before = torch.cumsum(gone, 1) - gone  # exclusive prefix count

        out = hidden.gather(1, src[:, :, None].expand(-1, -1, hidden.shape[-1]))
        new_slots = staged_to(slots, dev).gather(1, src) & real_slot
        if values is not None:
            out = out.masked_scatter(new_slots[:, :, None], values.to(out.dtype))
        mask = self.mask.to(dev).gather(1, src) * real_slot
        pos = self.positions.to(dev)
        lead = pos.shape[:-2]  # () or (3,)
        if self.recompact:
            pos = pos - dropped_before
        positions = pos.gather(-1, src.expand(*lead, -1, -1))
        if not self.recompact and values is not None:
            if value_positions is None:
                raise ValueError("Sequence.compact: value_positions are required when positions are not re-compacted")
            positions = positions.masked_scatter(new_slots.expand(*lead, -1, -1), value_positions.to(positions))
        self.mask = mask.to(self.mask.dtype)
        origin = torch.arange(L, device=dev).expand(B, L) if self.origin is None else self.origin.to(dev)
        self.origin = torch.where(real_slot, origin.gather(1, src), -1)  # outputs in input coordinates (outputs.py)
        self.positions = torch.where(real_slot, positions, torch.zeros((), dtype=positions.dtype, device=dev))
        if self.recompact:
            self.shift = staged_to(self.shift, dev) + gone.sum(1)
        return out, new_slots


def staged_to(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for an accelerator goes through pinned memory and a non-blocking
    copy (a pageable copy would wait for the device queue to drain)."""
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type in ("cpu", "meta"):
        return t.to(device)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


def padding_to_drop(real_kept: list, padding: list) -> list:
    """Left padding tokens each row drops so that the batch is only as long as its longest real row.

    real_kept : real tokens per row after the prune; padding : each row's padding tokens (all on its left).
    A row keeps the padding the rectangle still needs (all of it when nothing shortens the batch, so a
    keep-all prune changes nothing), and a short row, text-only say, no longer holds the batch at its
    unpruned length."""
    new_len = max(real_kept, default=0)
    return [p - min(p, new_len - r) for r, p in zip(real_kept, padding)]
