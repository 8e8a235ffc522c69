"""CUDA backend of ``attention_scores`` (kernels: csrc/include/vtprune/attention_scores.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune.cuda import current_stream, device_i64, dtype_code, pointer
from vtprune.reference._common import host_max


def attention_scores(q, k, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Column attention scores of the key span; see ``vtprune.ops.attention_scores``.

    ``q`` [B, H, L, d], ``k`` [B, Hkv, L, d] on one CUDA device (checked by the public op). Returns float32
    [B, max key count], zero past each row's count.
    """
    ext = load_extension()
    B, H, L, d = q.shape
    device = q.device
    scale = d**-0.5 if scale is None else float(scale)
    Qm, Km = host_max(query_spans, L), host_max(key_spans, L)  # the public op read the spans already
    q = q.contiguous()  # [B, H, L, d]
    k = k.contiguous()  # [B, Hkv, L, d]
    qspans, kspans = device_i64(query_spans, device), device_i64(key_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, Km, dtype=torch.float32, device=device)  # [B, Km]
    if B == 0:
        return out
    lse = torch.empty(B, H, Qm, dtype=torch.float32, device=device)  # [B, H, Qm] pass-1 workspace
    partial = torch.empty(B, H, Km, dtype=torch.float32, device=device)  # [B, H, Km] per-head sums
    with torch.cuda.device(device):
        ext.attention_scores(
            pointer(q), pointer(k), pointer(qspans), pointer(kspans), pointer(kpm), pointer(lse),
            pointer(partial), pointer(out), B, H, k.shape[1], L, d, Qm, Km, scale, bool(causal),
            dtype_code(q.dtype), current_stream(device),
        )
    return out
