"""Reference fused path of the methods: scores -> top-k in order -> contextual merge -> packed tokens."""

from __future__ import annotations

from vtprune.reference.contextual_merge import merge_with_targets
from vtprune.reference.topk_keep_order import topk_keep_order


def select_and_merge(scores, x, metric, num_dominant, num_contextual, *, lengths=None):
    keep_idx = topk_keep_order(scores, num_dominant, lengths=lengths)
    tokens, target_idx = merge_with_targets(x, metric, keep_idx, num_contextual, lengths)
    return tokens, keep_idx, target_idx
