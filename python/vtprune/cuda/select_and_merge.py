"""CUDA backend of ``select_and_merge``: the topk_keep_order kernel, then the contextual-merge kernels, all
on the current stream with no host sync."""

from __future__ import annotations

from vtprune._host import call
from vtprune.cuda import custom_op
from vtprune.cuda.contextual_merge import merge_with_targets
from vtprune.cuda.topk_keep_order import topk_keep_order_launch


def select_and_merge_launch(scores, x, metric, num_dominant, num_contextual, lengths):
    """Both kernels (the body of the custom op ``vtprune::cuda_select_and_merge``)."""
    keep_idx = topk_keep_order_launch(scores, num_dominant, lengths)  # [B, k] ascending
    tokens, target_idx = merge_with_targets(x, metric, keep_idx, num_contextual, lengths)
    return tokens, keep_idx, target_idx


def select_and_merge(scores, x, metric, num_dominant, num_contextual, *, lengths=None):
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C]); see
    ``vtprune.ops.select_and_merge``. Under torch.compile it runs as ``torch.ops.vtprune.cuda_select_and_merge``."""
    return call(custom_op("select_and_merge"), select_and_merge_launch, scores, x, metric, int(num_dominant),
                int(num_contextual), lengths)
