"""Public op ``topk_keep_order`` (docs/ops.md#topk_keep_order)."""

from __future__ import annotations

from vtprune import _backend
from vtprune.ops import _checks


def check_topk(scores, k, lengths, name_k="k"):
    _checks.batched("scores", scores, ndim=2)
    B, N = scores.shape
    _checks.positive_int(name_k, k)
    if k > N:
        raise ValueError(f"{name_k} must be <= the number of scores per row ({N}), got {k}")
    _checks.lengths("lengths", lengths, B, N, scores.device, minimum=k)
    return B, N


def topk_keep_order(scores, k, *, lengths=None, backend="auto"):
    """Indices of the ``k`` highest scores of each row, in ascending position order.

    Ranking: positions at or past ``lengths[b]`` are never picked; higher score first; equal scores go to
    the lower position; NaN ranks below every number (``-inf`` included) and ``-0.0`` equals ``+0.0``, so a
    row with NaN scores still returns k distinct valid indices, NaN positions last.

    Parameters
    ----------
    scores : Tensor [B, N]  float32 (fp16/bf16 are accepted and compared exactly in float32)
    k : int  ``1 <= k <= N`` and ``k <= lengths[b]`` for every row
    lengths : int64 Tensor [B], optional  valid prefix length per row: CPU (checked on the host) or the scores'
        device (checked by a device-side assert)
    backend : "auto" | "reference" | "triton" | "cuda"

    Returns
    -------
    int64 Tensor [B, k], strictly ascending per row.

    Example
    -------
    >>> topk_keep_order(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 2)
    tensor([[1, 3]])
    """
    check_topk(scores, k, lengths)
    impl = _backend.implementation("topk_keep_order", backend, scores)
    return impl(scores, k, lengths=lengths)
