"""Reference ALVTS low-rank selector scores (DESIGN §3.4).

a = h U, b = h V, A = softmax(a b^T / sqrt(R)) with the causal mask (and key padding). For visual j:
S_V2V[j] = mean over visual query rows of A[i, j]; S_T2V[j] = mean over text query rows (valid, non-visual)
of A[i, j]; S[j] = S_V2V[j] * S_T2V[j]. With no text row in a batch row, S_T2V is taken as 1 (the neutral
factor), so the score falls back to S_V2V instead of collapsing to all zeros.
"""

from __future__ import annotations

import torch

from vtprune.reference._common import allowed_keys, host_max, masked_softmax, span_index


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    B, L, _ = h.shape
    R = u.shape[1]
    dev = h.device
    Vm = host_max(visual_spans, L)
    vpos, vvalid = span_index(visual_spans, Vm, L, dev)  # [B, V]
    hf = h.float()
    a, b = hf @ u.float(), hf @ v.float()  # [B, L, R]
    rows = torch.arange(L, device=dev).expand(B, L)
    probs = masked_softmax(a @ b.transpose(1, 2) * R**-0.5, allowed_keys(rows, L, True, key_padding_mask))
    cols = probs.gather(2, vpos[:, None, :].expand(B, L, Vm))  # [B, L(query), V(key)]
    spans = visual_spans.to(dev)
    is_visual = (rows >= spans[:, :1]) & (rows < spans[:, :1] + spans[:, 1:])  # [B, L]
    real = torch.ones_like(is_visual) if key_padding_mask is None else key_padding_mask
    is_text = real & ~is_visual
    n_vis = spans[:, 1:].float()
    n_txt = is_text.sum(1, keepdim=True).float()
    s_v2v = (cols * is_visual[:, :, None]).sum(1) / n_vis
    s_t2v = (cols * is_text[:, :, None]).sum(1) / n_txt.clamp(min=1)
    s_t2v = torch.where(n_txt > 0, s_t2v, torch.ones((), device=dev))
    return torch.where(vvalid, s_v2v * s_t2v, torch.zeros((), device=dev))
