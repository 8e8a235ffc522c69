"""Shared pieces of the reference ops: span indexing and masked softmax, batched with no token loops."""

from __future__ import annotations

import torch

from vtprune._host import to_device_i64

# Bound on the float32 logits block one (head chunk, query-row chunk) may materialise. The reference is also
# the CPU path: a video-length call (L = 12k..20k) must not allocate [B, H, L, L], nor even one head's [L, L]
# (576 MB at 12k, and softmax makes several such copies), so the blocks are chunked over heads and query rows.
# Measured on the CPU, one head at L = 12288: peak +1.9..2.4 GB unchunked, +0.16..0.2 GB with 16 MB blocks.
_CHUNK_BYTES = 1 << 24


def span_index(spans: torch.Tensor, width: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``start + t`` for ``t < width`` (clamped into range) and their validity ``t < count``.

    spans: int64 [B, 2] (start, count). Returns (pos [B, width] int64, valid [B, width] bool).
    """
    spans = to_device_i64(spans, torch.device(device))  # host spans: pinned, non-blocking
    t = torch.arange(width, device=device)
    pos = (spans[:, :1] + t).clamp(max=length - 1)  # [B, W]
    valid = t < spans[:, 1:2]  # [B, W]
    return pos, valid


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


def blocks(batch: int, heads: int, rows: int, length: int) -> tuple[int, int]:
    """``(head_step, row_step)`` such that a float32 ``[batch, head_step, row_step, length]`` block fits in the
    chunk budget: whole heads when a head's rows fit, else one head and as many query rows as fit (at least 1).

    Softmax is per query row, so chunking rows changes no probability; only the order of the final column sums.
    """
    row_bytes = max(1, batch * length * 4)
    row_step = max(1, min(rows, _CHUNK_BYTES // row_bytes))
    head_step = max(1, min(heads, _CHUNK_BYTES // (row_bytes * row_step))) if row_step == rows else 1
    return head_step, row_step
