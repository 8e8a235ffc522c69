"""Reference ALVTS low-rank selector scores (docs/ops.md#lowrank_scores).

a = h U, b = h V, A = softmax(a b^T / sqrt(R)) with the causal mask (and key padding). For visual j:
S_V2V[j] = mean over visual query rows of A[i, j]; S_T2V[j] = mean over text query rows (valid, non-visual)
of A[i, j]; S[j] = S_V2V[j] * S_T2V[j]. With no text row in a batch row, S_T2V is taken as 1 (the neutral
factor), so the score falls back to S_V2V instead of collapsing to all zeros.
"""

from __future__ import annotations

import torch

from vtprune._host import host_max, to_device_i64
from vtprune.reference._common import allowed_keys, blocks, masked_softmax, span_index


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    B, L, _ = h.shape
    R = u.shape[1]
    dev = h.device
    Vm = host_max(visual_spans, L)
    vpos, vvalid = span_index(visual_spans, Vm, L, dev)  # [B, V]
    hf = h.float()
    a, b = hf @ u.float(), hf @ v.float()  # [B, L, R]
    spans = to_device_i64(visual_spans, dev)
    real = None if key_padding_mask is None else key_padding_mask.to(dev)
    v2v = torch.zeros(B, Vm, dtype=torch.float32, device=dev)  # column sums over visual / text query rows
    t2v = torch.zeros(B, Vm, dtype=torch.float32, device=dev)
    n_txt = torch.zeros(B, 1, dtype=torch.float32, device=dev)
    bt = b.transpose(1, 2)
    _, rstep = blocks(B, 1, L, L)
    for r0 in range(0, L, rstep):  # query-row blocks bound the memory: never [B, L, L] at once
        rows = torch.arange(r0, min(L, r0 + rstep), device=dev).expand(B, -1)  # [B, r]
        probs = masked_softmax(a[:, r0:r0 + rstep] @ bt * R**-0.5, allowed_keys(rows, L, True, key_padding_mask))
        cols = probs.gather(2, vpos[:, None, :].expand(B, rows.shape[1], Vm))  # [B, r(query), V(key)]
        is_visual = (rows >= spans[:, :1]) & (rows < spans[:, :1] + spans[:, 1:])  # [B, r]
        is_text = ~is_visual if real is None else real[:, r0:r0 + rstep] & ~is_visual
        v2v += (cols * is_visual[:, :, None]).sum(1)
        t2v += (cols * is_text[:, :, None]).sum(1)
        n_txt += is_text.sum(1, keepdim=True)
    s_v2v = v2v / spans[:, 1:].float()
    s_t2v = torch.where(n_txt > 0, t2v / n_txt.clamp(min=1), torch.ones((), device=dev))
    return torch.where(vvalid, s_v2v * s_t2v, torch.zeros((), device=dev))
