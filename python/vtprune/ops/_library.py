"""``torch.library`` custom ops for the Triton VisionDrop kernels, so patched models trace under torch.compile.

Each op ``torch.ops.vtprune.<op>`` is opaque to the compiler: its real implementation launches the Triton
kernels of ``vtprune.triton_kernels.<op>`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), and
its fake implementation only sizes the outputs. Output widths that depend on tensor *values* (the largest
query/key span count) are therefore explicit ``int`` arguments: the Triton backend functions
``vtprune.triton_kernels.<op>.<op>`` read them on the host (where the public ops' checks already read the
spans) and call these ops, so ``backend="triton"`` always goes through them.

Importing this module registers the ops; it imports neither Triton nor the kernels (those load on first call).
"""

import torch
from torch import Tensor

__all__ = [
    "attention_scores_op",
    "attention_with_scores_op",
    "topk_keep_order_op",
    "contextual_merge_op",
    "select_and_merge_op",
]


@torch.library.custom_op("vtprune::attention_scores", mutates_args=())
def attention_scores_op(
    q: Tensor, k: Tensor, query_spans: Tensor, key_spans: Tensor, causal: bool,
    key_padding_mask: Tensor | None, scale: float | None, max_query: int, max_key: int,
) -> Tensor:
    """float32 [B, max_key] column scores; ``max_query``/``max_key`` = the largest span counts."""
    from vtprune.triton_kernels.attention_scores import attention_scores_launch

    return attention_scores_launch(q, k, query_spans, key_spans, causal, key_padding_mask, scale,
                                   max_query, max_key)


@attention_scores_op.register_fake
def _(q, k, query_spans, key_spans, causal, key_padding_mask, scale, max_query, max_key):
    return q.new_empty((q.shape[0], max_key), dtype=torch.float32)


@torch.library.custom_op("vtprune::attention_with_scores", mutates_args=())
def attention_with_scores_op(
    q: Tensor, k: Tensor, v: Tensor, query_spans: Tensor, key_spans: Tensor, causal: bool,
    key_padding_mask: Tensor | None, scale: float | None, max_query: int, max_key: int,
) -> tuple[Tensor, Tensor]:
    """(out [B, H, L, dv] in q's dtype, float32 scores [B, max_key])."""
    from vtprune.triton_kernels.attention_with_scores import attention_with_scores_launch

    return attention_with_scores_launch(q, k, v, query_spans, key_spans, causal, key_padding_mask, scale,
                                        max_query, max_key)


@attention_with_scores_op.register_fake
def _(q, k, v, query_spans, key_spans, causal, key_padding_mask, scale, max_query, max_key):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, max_key), dtype=torch.float32)


@torch.library.custom_op("vtprune::topk_keep_order", mutates_args=())
def topk_keep_order_op(scores: Tensor, k: int, lengths: Tensor | None) -> Tensor:
    """int64 [B, k], ascending positions of the k highest scores per row."""
    from vtprune.triton_kernels.topk_keep_order import topk_keep_order_launch

    return topk_keep_order_launch(scores, k, lengths)


@topk_keep_order_op.register_fake
def _(scores, k, lengths):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


@torch.library.custom_op("vtprune::contextual_merge", mutates_args=())
def contextual_merge_op(x: Tensor, metric: Tensor, keep_idx: Tensor, num_contextual: int,
                        lengths: Tensor | None) -> Tensor:
    """[B, k + C, D] packed tokens in x's dtype."""
    from vtprune.triton_kernels.contextual_merge import contextual_merge_launch

    return contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths)[0]


@contextual_merge_op.register_fake
def _(x, metric, keep_idx, num_contextual, lengths):
    return x.new_empty((x.shape[0], keep_idx.shape[1] + num_contextual, x.shape[2]))


@torch.library.custom_op("vtprune::select_and_merge", mutates_args=())
def select_and_merge_op(scores: Tensor, x: Tensor, metric: Tensor, num_dominant: int, num_contextual: int,
                        lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C])."""
    from vtprune.triton_kernels.select_and_merge import select_and_merge_launch

    return select_and_merge_launch(scores, x, metric, num_dominant, num_contextual, lengths)


@select_and_merge_op.register_fake
def _(scores, x, metric, num_dominant, num_contextual, lengths):
    B, _, D = x.shape
    return (x.new_empty((B, num_dominant + num_contextual, D)),
            x.new_empty((B, num_dominant), dtype=torch.int64),
            x.new_empty((B, num_contextual), dtype=torch.int64))
