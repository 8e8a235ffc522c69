"""CUDA backend of ``lowrank_scores`` (ALVTS selector; score passes: csrc/include/vtprune/attention_scores.cuh).

The projections ``a = h U``, ``b = h V`` run as one fp32 torch matmul (``O(L D R)``, the library's GEMM; the
extension has no cuBLAS dependency); the kernels do the ``O(L^2 R)`` part: row lse over the causal keys, the
visual and text column sums, and the ``S_V2V * S_T2V`` epilogue.
"""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune.cuda import current_stream, device_i64, pointer
from vtprune.reference._common import host_max


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    """float32 [B, max visual count]; see ``vtprune.ops.lowrank_scores``."""
    ext = load_extension()
    B, L, _ = h.shape
    R = u.shape[1]
    device = h.device
    Vm = host_max(visual_spans, L)
    # fp32 like the reference: bf16-rounded projections would shift logits by ~|logit| * 2^-9.
    ab = h.float() @ torch.cat([u, v], dim=1).float()  # [B, L, 2R]
    a, b = ab[..., :R].contiguous(), ab[..., R:].contiguous()  # [B, L, R] each
    vspans = device_i64(visual_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, Vm, dtype=torch.float32, device=device)  # [B, Vm]
    if B == 0:
        return out
    lse = torch.empty(B, L, dtype=torch.float32, device=device)  # [B, L] every row's lse
    partial = torch.empty(2, B, Vm, dtype=torch.float32, device=device)  # [visual | text, B, Vm]
    with torch.cuda.device(device):
        ext.lowrank_scores(
            pointer(a), pointer(b), pointer(vspans), pointer(kpm), pointer(lse), pointer(partial),
            pointer(out), B, L, R, Vm, current_stream(device),
        )
    return out
