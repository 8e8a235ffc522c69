"""Reference top-k in original order (docs/ops.md#topk_keep_order).

Ranking, per row: valid positions (j < lengths[b]) first; then score descending; NaN ranks below every
number, -inf included; -0.0 equals +0.0; equal scores go to the lower position. The first k of that ranking
are returned sorted ascending by position. Every backend implements exactly this order.
"""

from __future__ import annotations

import torch


def topk_keep_order(scores, k, *, lengths=None):
    B, N = scores.shape
    s = scores.float()
    # Lexicographic ranking by successive stable sorts, least significant key first; the initial order is
    # position ascending, so ties at every level resolve to the lower position.
    order = torch.arange(N, device=s.device).expand(B, N)
    key = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)
    not_nan = (~torch.isnan(s)).gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(not_nan, dim=1, descending=True, stable=True).indices)
    if lengths is not None:
        valid = (order < lengths.to(s.device)[:, None]).to(torch.int8)
        order = order.gather(1, torch.sort(valid, dim=1, descending=True, stable=True).indices)
    return torch.sort(order[:, :k], dim=1).values
