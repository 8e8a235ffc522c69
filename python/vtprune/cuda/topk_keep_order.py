"""CUDA backend of ``topk_keep_order`` (kernel: csrc/include/vtprune/topk_keep_order.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune._host import call
from vtprune.cuda import current_stream, custom_op, pointer


def topk_keep_order_launch(scores, k, lengths):
    """The kernel on checked arguments (the body of the custom op ``vtprune::cuda_topk_keep_order``)."""
    ext = load_extension()
    B, N = scores.shape
    device = scores.device
    # fp16/bf16 -> fp32 is exact, so the ranking (ties, NaN, -0.0) is the one of the input dtype.
    scores32 = scores.to(torch.float32).contiguous()  # [B, N]
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int64).contiguous()  # [B]
    out = torch.empty((B, k), dtype=torch.int64, device=device)  # [B, k]
    if B == 0 or k == 0:
        return out
    with torch.cuda.device(device):
        ext.topk_keep_order(pointer(scores32), pointer(lengths), pointer(out), B, N, k, current_stream(device))
    return out


def topk_keep_order(scores, k, *, lengths=None):
    """Positions of the ``k`` highest scores per row, ascending; see ``vtprune.ops.topk_keep_order``.

    ``scores`` [B, N] floating CUDA tensor, ``lengths`` None or int64 [B] (any device); checked by the
    public op. Returns int64 [B, k] on ``scores.device``.
    """
    return call(custom_op("topk_keep_order"), topk_keep_order_launch, scores, int(k), lengths)
