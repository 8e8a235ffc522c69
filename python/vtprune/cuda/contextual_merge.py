"""CUDA backend of ``contextual_merge`` (kernels: csrc/include/vtprune/contextual_merge.cuh)."""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune._host import call
from vtprune.cuda import current_stream, custom_op, device_i64, dtype_code, pointer


def merge_with_targets(x, metric, keep_idx, num_contextual, lengths=None):
    """The merge and its target positions: (tokens [B, k + C, D] in x's dtype, target_idx int64 [B, C])."""
    ext = load_extension()
    B, N, D = x.shape
    k, C = keep_idx.shape[1], num_contextual
    device = x.device
    x = x.contiguous()  # [B, N, D]
    metric = metric.contiguous()  # [B, N, dk]
    keep_idx = device_i64(keep_idx, device)  # [B, k]
    lengths = device_i64(lengths, device)  # [B] or None
    out = torch.empty(B, k + C, D, dtype=x.dtype, device=device)  # [B, k + C, D]
    target_idx = torch.empty(B, C, dtype=torch.int64, device=device)  # [B, C]
    if B == 0 or k + C == 0:
        return out, target_idx
    inv_norm = torch.empty(B, C, dtype=torch.float32, device=device)  # [B, C] 1 / |metric[target]|
    choice = torch.empty(B, N if C else 0, dtype=torch.int32, device=device)  # [B, N] target slot or -1
    with torch.cuda.device(device):
        ext.contextual_merge(
            pointer(x), pointer(metric), pointer(keep_idx), pointer(lengths), pointer(target_idx),
            pointer(inv_norm), pointer(choice), pointer(out), B, N, D, metric.shape[-1], k, C,
            dtype_code(x.dtype), dtype_code(metric.dtype), current_stream(device),
        )
    return out, target_idx


def contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths):
    """The merged tokens (the body of the custom op ``vtprune::cuda_contextual_merge``)."""
    return merge_with_targets(x, metric, keep_idx, num_contextual, lengths)[0]


def contextual_merge(x, metric, keep_idx, num_contextual, *, lengths=None):
    """Dominant tokens then contextual tokens; see ``vtprune.ops.contextual_merge``. Under torch.compile it
    runs as the custom op ``torch.ops.vtprune.cuda_contextual_merge``."""
    return call(custom_op("contextual_merge"), contextual_merge_launch, x, metric, keep_idx, int(num_contextual),
                lengths)
