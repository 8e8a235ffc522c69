"""CUDA backend of ``attention_with_scores`` (kernels: csrc/include/vtprune/attention_with_scores.cuh, then
the column pass of attention_scores.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune.cuda import current_stream, device_i64, dtype_code, pointer
from vtprune.reference._common import host_max


def attention_with_scores(q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Attention output and column scores; see ``vtprune.ops.attention_with_scores``.

    Returns (out [B, H, L, dv] in q's dtype, scores float32 [B, max key count]).
    """
    ext = load_extension()
    B, H, L, d = q.shape
    dv = v.shape[-1]
    device = q.device
    scale = d**-0.5 if scale is None else float(scale)
    Km = host_max(key_spans, L)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # [B, H, L, d], [B, Hkv, L, d], [B, Hkv, L, dv]
    qspans, kspans = device_i64(query_spans, device), device_i64(key_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, H, L, dv, dtype=q.dtype, device=device)  # [B, H, L, dv]
    scores = torch.empty(B, Km, dtype=torch.float32, device=device)  # [B, Km]
    if B == 0:
        return out, scores
    lse = torch.empty(B, H, L, dtype=torch.float32, device=device)  # [B, H, L] every row's lse
    partial = torch.empty(B, H, Km, dtype=torch.float32, device=device)  # [B, H, Km]
    with torch.cuda.device(device):
        ext.attention_with_scores(
            pointer(q), pointer(k), pointer(v), pointer(qspans), pointer(kspans), pointer(kpm), pointer(out),
            pointer(lse), pointer(partial), pointer(scores), B, H, k.shape[1], L, d, dv, Km, scale,
            bool(causal), dtype_code(q.dtype), current_stream(device),
        )
    return out, scores
