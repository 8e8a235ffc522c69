"""Reference attention output plus column scores in one call (docs/ops.md#attention_scores, second form).

The output is ordinary scaled-dot-product attention with the same mask as the scores (causal by index, key
padding excluded); a query row with no valid key outputs zeros instead of NaN.
"""

from __future__ import annotations

import torch

from vtprune._host import host_max, to_device_i64
from vtprune.reference._common import allowed_keys, blocks, masked_softmax, span_index
from vtprune.reference.attention_scores import _finish, _scores_from_probs


def attention_with_scores(q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    B, H, L, d = q.shape
    group = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    Km = host_max(key_spans, L)
    kpos, kvalid = span_index(key_spans, Km, L, q.device)
    spans = to_device_i64(query_spans, q.device)
    out = torch.empty(B, H, L, v.shape[-1], dtype=q.dtype, device=q.device)
    scores = torch.zeros(B, Km, dtype=torch.float32, device=q.device)
    hstep, rstep = blocks(B, H, L, L)
    for h0 in range(0, H, hstep):  # (head, query-row) blocks bound the memory: never [B, H, L, L] at once
        heads = torch.arange(h0, min(H, h0 + hstep), device=q.device)
        kv_heads = heads // group
        kh, vh = k[:, kv_heads].float().transpose(-1, -2), v[:, kv_heads].float()
        for r0 in range(0, L, rstep):
            rows = torch.arange(r0, min(L, r0 + rstep), device=q.device).expand(B, -1)  # [B, r]
            allowed = allowed_keys(rows, L, causal, key_padding_mask)[:, None]  # [B, 1, r, L]
            probs = masked_softmax(q[:, heads, r0:r0 + rstep].float() @ kh * scale, allowed)  # [B, h, r, L]
            out[:, heads, r0:r0 + rstep] = (probs @ vh).to(q.dtype)
            # the rows of this block that lie in the query span add their key-span columns to the scores
            in_span = (rows >= spans[:, :1]) & (rows < spans[:, :1] + spans[:, 1:])  # [B, r]
            # a select, not a product: a NaN row outside the span must not reach the scores (NaN * 0 is NaN)
            _scores_from_probs(torch.where(in_span[:, None, :, None], probs, 0.0), kpos, scores)
    return out, _finish(scores, query_spans, kvalid, H)
