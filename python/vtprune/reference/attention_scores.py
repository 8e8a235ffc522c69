"""Reference attention column scores (docs/ops.md#attention_scores): the executable spec and the CPU path.

score[b, j] = mean over query heads h, mean over i in the query span of softmax_j'(q_h,i . k_h,j' * scale)[j]
for j in the key span. The softmax runs over every valid key (causal: j' <= i; padding excluded); only the
column sum is restricted to the key span. GQA: query head h reads key head h // (H // Hkv), and every query
head counts once.
"""

from __future__ import annotations

import torch

from vtprune._host import host_max, to_device_i64
from vtprune.reference._common import allowed_keys, blocks, masked_softmax, span_index


def _scores_from_probs(probs, kpos, out):
    """Add the key-span columns of probs [B, h, Q, L] (already zero on invalid query rows) into out [B, K]."""
    b, h, q, _ = probs.shape
    cols = probs.gather(-1, kpos[:, None, None, :].expand(b, h, q, kpos.shape[1]))  # [B, h, Q, K]
    out += cols.sum(dim=(1, 2))


def _finish(out, query_spans, kvalid, heads):
    qcount = to_device_i64(query_spans, out.device)[:, 1].float()
    return torch.where(kvalid, out / (heads * qcount[:, None]), torch.zeros((), device=out.device))


def attention_scores(q, k, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    B, H, L, d = q.shape
    group = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    Qm, Km = host_max(query_spans, L), host_max(key_spans, L)
    qpos, qvalid = span_index(query_spans, Qm, L, q.device)  # [B, Q]
    kpos, kvalid = span_index(key_spans, Km, L, q.device)  # [B, K]
    out = torch.zeros(B, Km, dtype=torch.float32, device=q.device)
    hstep, rstep = blocks(B, H, Qm, L)
    for h0 in range(0, H, hstep):  # (head, query-row) blocks bound the memory: never [B, H, Q, L] at once
        heads = torch.arange(h0, min(H, h0 + hstep), device=q.device)
        kh = k[:, heads // group].float()  # [B, h, L, d]
        for r0 in range(0, Qm, rstep):
            rpos, rvalid = qpos[:, r0:r0 + rstep], qvalid[:, r0:r0 + rstep]
            allowed = allowed_keys(rpos, L, causal, key_padding_mask)[:, None] & rvalid[:, None, :, None]
            qh = q[:, heads].float().gather(2, rpos[:, None, :, None].expand(B, len(heads), rpos.shape[1], d))
            probs = masked_softmax(qh @ kh.transpose(-1, -2) * scale, allowed)  # [B, h, r, L]
            _scores_from_probs(probs, kpos, out)
    return _finish(out, query_spans, kvalid, H)
