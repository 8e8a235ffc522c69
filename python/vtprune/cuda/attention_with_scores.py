"""CUDA backend of ``attention_with_scores`` (kernels: csrc/include/vtprune/attention_with_scores.cuh, then
the column pass of attention_scores.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune._host import call, host_max
from vtprune.cuda import check_width, current_stream, custom_op, device_i64, dtype_code, pointer


def attention_with_scores_launch(q, k, v, query_spans, key_spans, causal, key_padding_mask, scale, max_query,
                                 max_key):
    """Forward then pass 2 (the body of the custom op ``vtprune::cuda_attention_with_scores``).

    Returns (out [B, H, L, dv] in q's dtype, scores float32 [B, max_key]). ``max_query`` is part of the
    shared schema; the forward covers every row, so only ``max_key`` sizes a buffer.
    """
    check_width("max_query", query_spans, max_query)
    check_width("max_key", key_spans, max_key)
    ext = load_extension()
    B, H, L, d = q.shape
    dv = v.shape[-1]
    device = q.device
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # [B, H, L, d], [B, Hkv, L, d], [B, Hkv, L, dv]
    qspans, kspans = device_i64(query_spans, device), device_i64(key_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, H, L, dv, dtype=q.dtype, device=device)  # [B, H, L, dv]
    scores = torch.empty(B, max_key, dtype=torch.float32, device=device)  # [B, Km]
    if B == 0:
        return out, scores
    lse = torch.empty(B, H, L, dtype=torch.float32, device=device)  # [B, H, L] every row's lse
    partial = torch.empty(B, H, max_key, dtype=torch.float32, device=device)  # [B, H, Km]
    with torch.cuda.device(device):
        ext.attention_with_scores(
            pointer(q), pointer(k), pointer(v), pointer(qspans), pointer(kspans), pointer(kpm), pointer(out),
            pointer(lse), pointer(partial), pointer(scores), B, H, k.shape[1], L, d, dv, max_key, scale,
            bool(causal), dtype_code(q.dtype), current_stream(device),
        )
    return out, scores


def attention_with_scores(q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Attention output and column scores; see ``vtprune.ops.attention_with_scores``.

    Returns (out [B, H, L, dv] in q's dtype, scores float32 [B, max key count]); under torch.compile it runs
    as the custom op ``torch.ops.vtprune.cuda_attention_with_scores``.
    """
    scale = None if scale is None else float(scale)
    return call(custom_op("attention_with_scores"), attention_with_scores_launch, q, k, v, query_spans,
                key_spans, bool(causal), key_padding_mask, scale, host_max(query_spans, q.shape[2]),
                host_max(key_spans, q.shape[2]))
