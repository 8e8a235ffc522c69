"""Shared pieces of the reference ops: span indexing and masked softmax, batched with no token loops."""

from __future__ import annotations

import torch

# Bound on the float32 logits block one head-chunk may materialise (the reference is also the CPU path, so
# a LLaVA-NeXT-sized call must not allocate [B, H, L, L] at once).
_CHUNK_BYTES = 1 << 28


def span_index(spans: torch.Tensor, width: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``start + t`` for ``t < width`` (clamped into range) and their validity ``t < count``.

    spans: int64 [B, 2] (start, count). Returns (pos [B, width] int64, valid [B, width] bool).
    """
    spans = spans.to(device)
    t = torch.arange(width, device=device)
    pos = (spans[:, :1] + t).clamp(max=length - 1)  # [B, W]
    valid = t < spans[:, 1:2]  # [B, W]
    return pos, valid


def host_max(spans_or_counts: torch.Tensor) -> int:
    """Largest count, read on the host (spans are validated on the host already, so this is cheap)."""
    if spans_or_counts.dim() == 2:
        spans_or_counts = spans_or_counts[:, 1]
    return int(spans_or_counts.detach().cpu().max())


def allowed_keys(
    qpos: torch.Tensor, length: int, causal: bool, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Which keys each query row may attend to: bool [B, Q, L] (causal by index, padding excluded)."""
    j = torch.arange(length, device=qpos.device)
    allowed = torch.ones(qpos.shape[0], qpos.shape[1], length, dtype=torch.bool, device=qpos.device)
    if causal:
        allowed = allowed & (j <= qpos[..., None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax over the allowed keys; a row with no allowed key is all zeros (not NaN).

    Non-finite inputs propagate, on every backend: a NaN or +-inf logit among a row's allowed keys (an inf or
    NaN in q/k/h, or a float32 overflow) makes the whole row NaN, and so every score the row adds to. A -inf
    logit from the data is not a masked key: it is turned into NaN first. Masked keys never contribute.
    """
    logits = torch.where(logits == float("-inf"), float("nan"), logits).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.where(allowed, probs, torch.zeros((), dtype=probs.dtype))  # a NaN row stays off masked keys


def head_chunk(batch: int, heads: int, rows: int, length: int) -> int:
    per_head = max(1, batch * rows * length * 4)
    return max(1, min(heads, _CHUNK_BYTES // per_head))
