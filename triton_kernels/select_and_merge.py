"""Triton fused path of the methods (docs/ops.md#contextual_merge): scores -> top-k in order -> contextual merge.

Two launches for rows of up to 4096 tokens: the merge's assignment launch selects the top k itself (every
program from the score row in registers) and writes ``keep_idx``; one pass over ``x`` then writes the packed
tokens (see :mod:`contextual_merge`). Longer rows run the top-k kernel first. No host sync, no sort.
"""

from __future__ import annotations

import torch

import vtprune._library  # noqa: F401  (registers torch.ops.vtprune.<op>)
from vtprune.triton_kernels._common import to_device_i64
from vtprune.triton_kernels._routed_ops import call
from vtprune.triton_kernels.contextual_merge import merge_launch, select_fits
from vtprune.triton_kernels.topk_keep_order import topk_keep_order_launch


def select_and_merge_launch(scores, x, metric, num_dominant, num_contextual, lengths):
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C]) (custom-op body)."""
    lengths = to_device_i64(lengths, x.device)  # copied once, read by both kernels
    if select_fits(scores.shape[1]):
        return merge_launch(x, metric, num_contextual, lengths, scores=scores, k=num_dominant)
    keep_idx = topk_keep_order_launch(scores, num_dominant, lengths)  # [B, k]
    return merge_launch(x, metric, num_contextual, lengths, keep_idx=keep_idx)


def select_and_merge(scores, x, metric, num_dominant, num_contextual, *, lengths=None):
    """Triton backend of :func:`vtprune.ops.select_and_merge` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.select_and_merge``; in eager mode it launches
    directly (one dispatch layer).
    """
    return call(torch.ops.vtprune.select_and_merge, select_and_merge_launch, scores, x, metric, int(num_dominant),
                int(num_contextual), lengths)
