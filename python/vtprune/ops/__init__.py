"""Public ops: argument checks, then dispatch to the reference, Triton or CUDA backend.

See docs/ops.md for the semantics and :mod:`vtprune._backend` for how a backend is chosen.
"""

from vtprune.ops.attention_scores import attention_scores, attention_with_scores
from vtprune.ops.contextual_merge import contextual_merge, select_and_merge
from vtprune.ops.lowrank_scores import lowrank_scores
from vtprune.ops.routed_layer import routed_attention_mask, routed_layer
from vtprune.ops.topk_keep_order import topk_keep_order

__all__ = [
    "attention_scores",
    "attention_with_scores",
    "topk_keep_order",
    "contextual_merge",
    "select_and_merge",
    "lowrank_scores",
    "routed_layer",
    "routed_attention_mask",
]
