"""CUDA backend of ``attention_scores`` (kernels: csrc/include/vtprune/attention_scores.cuh; 16-bit inputs
with aligned rows run the tensor-core passes of attention_mma.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune._host import call, host_max
from vtprune.cuda import check_width, current_stream, custom_op, device_i64, dtype_code, pointer


def attention_scores_launch(q, k, query_spans, key_spans, causal, key_padding_mask, scale, max_query, max_key):
    """Both passes on prepared arguments (the body of the custom op ``vtprune::cuda_attention_scores``).

    ``max_query`` / ``max_key`` = the largest span counts; returns float32 [B, max_key].
    """
    check_width("max_query", query_spans, max_query)
    check_width("max_key", key_spans, max_key)
    ext = load_extension()
    B, H, L, d = q.shape
    device = q.device
    scale = d**-0.5 if scale is None else float(scale)
    q = q.contiguous()  # [B, H, L, d]
    k = k.contiguous()  # [B, Hkv, L, d]
    qspans, kspans = device_i64(query_spans, device), device_i64(key_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, max_key, dtype=torch.float32, device=device)  # [B, Km]
    if B == 0:
        return out
    # Pass-1 workspace: each row's lse [B, H, Qm], or for one query a row (max, sum) per 64-key chunk.
    lse = torch.empty(B, H, max(max_query, 2 * -(-L // 64)), dtype=torch.float32, device=device)
    partial = torch.empty(B, H, max_key, dtype=torch.float32, device=device)  # [B, H, Km] per-head sums
    with torch.cuda.device(device):
        ext.attention_scores(
            pointer(q), pointer(k), pointer(qspans), pointer(kspans), pointer(kpm), pointer(lse),
            pointer(partial), pointer(out), B, H, k.shape[1], L, d, max_query, max_key, scale, bool(causal),
            dtype_code(q.dtype), current_stream(device),
        )
    return out


def attention_scores(q, k, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Column attention scores of the key span; see ``vtprune.ops.attention_scores``.

    ``q`` [B, H, L, d], ``k`` [B, Hkv, L, d] on one CUDA device (checked by the public op). Returns float32
    [B, max key count], zero past each row's count. Under torch.compile it runs as the custom op
    ``torch.ops.vtprune.cuda_attention_scores``.
    """
    scale = None if scale is None else float(scale)
    L = q.shape[2]
    return call(custom_op("attention_scores"), attention_scores_launch, q, k, query_spans, key_spans,
                bool(causal), key_padding_mask, scale, host_max(query_spans, L), host_max(key_spans, L))
