"""Triton fused path of the methods (docs/ops.md#contextual_merge): scores -> top-k in order -> contextual merge.

The top-k kernel's output feeds the merge kernels directly on the device (no host sync in between); the
merge never materialises ``[N, C]`` and writes the packed tokens once (see :mod:`contextual_merge`).
"""

from __future__ import annotations

import torch

from vtprune.triton_kernels._common import to_device_i64
from vtprune.triton_kernels._routed_ops import call
from vtprune.triton_kernels.contextual_merge import contextual_merge_launch
from vtprune.triton_kernels.topk_keep_order import topk_keep_order_launch


def select_and_merge_launch(scores, x, metric, num_dominant, num_contextual, lengths):
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C]) (custom-op body)."""
    lengths = to_device_i64(lengths, x.device)  # copied once, read by both kernels
    keep_idx = topk_keep_order_launch(scores, num_dominant, lengths)  # [B, k]
    tokens, target_idx = contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths)
    return tokens, keep_idx, target_idx


def select_and_merge(scores, x, metric, num_dominant, num_contextual, *, lengths=None):
    """Triton backend of :func:`vtprune.ops.select_and_merge` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.select_and_merge``; in eager mode it launches
    directly (one dispatch layer).
    """
    import vtprune.ops._library  # noqa: F401  (registers the custom ops)

    return call(torch.ops.vtprune.select_and_merge, select_and_merge_launch, scores, x, metric, int(num_dominant),
                int(num_contextual), lengths)
