"""Reference attention output plus column scores in one call (DESIGN §3.1, second form).

The output is ordinary scaled-dot-product attention with the same mask as the scores (causal by index, key
padding excluded); a query row with no valid key outputs zeros instead of NaN.
"""

from __future__ import annotations

import torch

from vtprune.reference._common import allowed_keys, head_chunk, host_max, masked_softmax, span_index
from vtprune.reference.attention_scores import _finish, _scores_from_probs


def attention_with_scores(q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    B, H, L, d = q.shape
    group = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    Qm, Km = host_max(query_spans, L), host_max(key_spans, L)
    qpos, qvalid = span_index(query_spans, Qm, L, q.device)
    kpos, kvalid = span_index(key_spans, Km, L, q.device)
    rows = torch.arange(L, device=q.device).expand(B, L)
    allowed = allowed_keys(rows, L, causal, key_padding_mask)[:, None]  # [B, 1, L, L]
    out = torch.empty(B, H, L, v.shape[-1], dtype=q.dtype, device=q.device)
    scores = torch.zeros(B, Km, dtype=torch.float32, device=q.device)
    step = head_chunk(B, H, L, L)
    for h0 in range(0, H, step):  # loop over head chunks only, to bound memory
        heads = torch.arange(h0, min(H, h0 + step), device=q.device)
        kv_heads = heads // group
        probs = masked_softmax(q[:, heads].float() @ k[:, kv_heads].float().transpose(-1, -2) * scale, allowed)
        out[:, heads] = (probs @ v[:, kv_heads].float()).to(q.dtype)
        rows_p = probs.gather(2, qpos[:, None, :, None].expand(B, len(heads), Qm, L))
        _scores_from_probs(rows_p * qvalid[:, None, :, None], kpos, scores)
    return out, _finish(scores, query_spans, kvalid, H)
