"""Public ops ``contextual_merge`` and ``select_and_merge`` (docs/ops.md#contextual_merge)."""

from __future__ import annotations

import torch

from vtprune import _backend
from vtprune._host import rows_summary, to_device_i64, values_summary
from vtprune.ops import _checks
from vtprune.ops.topk_keep_order import check_topk


def check_tokens(x, metric, lengths):
    """Types, shapes, dtypes and devices of ``x``, ``metric`` and ``lengths`` (values: see the callers)."""
    _checks.batched("x", x, ndim=3)
    B, N, D = x.shape
    if N < 1 or D < 1:
        raise ValueError(f"x must have N >= 1 tokens of D >= 1 channels, got shape {tuple(x.shape)}")
    _checks.tensor("metric", metric, ndim=3, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    if tuple(metric.shape[:2]) != (B, N) or metric.shape[2] < 1:
        raise ValueError(f"metric must have shape [B, N, dk] = [{B}, {N}, dk] with dk >= 1 channels, "
                         f"got {tuple(metric.shape)}")
    if lengths is not None:
        _checks.length_meta("lengths", lengths, B, x.device)
    return B, N


def _message(num_dominant, num_contextual, name_k) -> str:
    return f"{name_k} + num_contextual = {num_dominant} + {num_contextual} exceeds the tokens available"


def check_budget(num_dominant, num_contextual, n, name_k):
    """``num_contextual >= 0`` and ``k + C <= N`` (the shape half of the budget check)."""
    _checks.positive_int("num_contextual", num_contextual, allow_zero=True)
    if num_dominant + num_contextual > n:
        raise ValueError(f"{_message(num_dominant, num_contextual, name_k)} ({n})")


def check_budget_values(num_dominant, num_contextual, lengths, name_k):
    """``k + C <= lengths[b]`` for every row: read once per CPU tensor, a device-side assert on the device."""
    if lengths is None:
        return
    need = num_dominant + num_contextual
    if not lengths.is_cpu:
        _checks.require((lengths >= need).all(),
                        f"{_message(num_dominant, num_contextual, name_k)} in the shortest row (lengths)")
        return
    shortest = values_summary(lengths)[0]
    if shortest < need:
        raise ValueError(f"{_message(num_dominant, num_contextual, name_k)} ({shortest} in the shortest row)")


KEEP_MESSAGE = "keep_idx must be strictly ascending per row and inside [0, lengths[b])"


def check_keep(keep_idx, lengths, B: int, N: int) -> None:
    """``keep_idx [B, k >= 1]`` strictly ascending per row, first >= 0, last < lengths[b] (or N).

    A CPU ``keep_idx`` (data on the CPU, so lengths too) is read on the host, once per tensor. On the device one
    expression is queued as a device-side assert: each row framed by -1 and its limit must have positive steps.
    """
    if _checks.on_host(keep_idx):
        ascending, first, lasts = rows_summary(keep_idx)
        limits = (N,) * B if lengths is None else values_summary(lengths)[2]
        if not (ascending and first >= 0 and all(a < b for a, b in zip(lasts, limits))):
            raise ValueError(f"{KEEP_MESSAGE}, got {keep_idx.tolist()} with limits {limits}")
        return
    dev = keep_idx.device
    limit = torch.full((B, 1), N, dtype=torch.int64, device=dev) if lengths is None else \
        to_device_i64(lengths, dev)[:, None]
    framed = torch.diff(keep_idx, dim=1, prepend=torch.full((B, 1), -1, dtype=torch.int64, device=dev),
                        append=limit)
    _checks.require((framed > 0).all(), KEEP_MESSAGE)


def contextual_merge(x, metric, keep_idx, num_contextual, *, lengths=None, backend="auto"):
    """Merge the non-kept tokens of each row into ``num_contextual`` contextual tokens.

    Rule (official VisionDrop/VisionZip code): ``R`` = non-kept valid positions ascending, ``n = |R|``,
    ``step = max(1, n // C)``, targets ``T = R[0::step][:C]``; every other token of ``R`` joins the target of
    largest cosine similarity of ``metric`` (ties: lower target) and
    ``contextual_t = x[t] + mean(x[a] for a joined to t)`` (just ``x[t]`` when none joined).

    Parameters
    ----------
    x : Tensor [B, N, D]  tokens (fp32/fp16/bf16)
    metric : Tensor [B, N, dk]  similarity metric (keys averaged over heads)
    keep_idx : int64 Tensor [B, k]  kept ("dominant") positions, strictly ascending, < lengths[b]; on x's
        device (checked there by a device-side assert when x is not on the CPU)
    num_contextual : int  ``C >= 0``, at most ``lengths[b] - k``
    lengths : int64 Tensor [B], optional  valid prefix length per row

    Returns
    -------
    Tensor [B, k + C, D] in x's dtype: the dominant tokens in position order, then the contextual tokens in
    target order.

    Example
    -------
    >>> x = torch.randn(1, 6, 4)
    >>> contextual_merge(x, x, torch.tensor([[0, 3]]), 2).shape
    torch.Size([1, 4, 4])
    """
    sig = _checks.signature("merge", type(num_contextual), num_contextual, tensors=(x, metric, keep_idx, lengths))
    if not _checks.passed(sig):
        B, N = check_tokens(x, metric, lengths)
        _checks.tensor("keep_idx", keep_idx, ndim=2, dtypes=(torch.int64,), device=x.device)
        if keep_idx.shape[0] != B:
            raise ValueError(f"keep_idx must have shape [B, k] with B = {B}, got {tuple(keep_idx.shape)}")
        check_budget(keep_idx.shape[1], num_contextual, N, "keep_idx.shape[1]")
        if keep_idx.shape[1] + num_contextual < 1:
            raise ValueError("keep_idx.shape[1] + num_contextual must be >= 1 (nothing would be returned)")
        _checks.remember(sig)
    B, N, _ = x.shape
    k = keep_idx.shape[1]
    _checks.length_values("lengths", lengths, N)
    check_budget_values(k, num_contextual, lengths, "keep_idx.shape[1]")
    if k:
        check_keep(keep_idx, lengths, B, N)
    impl = _backend.implementation("contextual_merge", backend, x)
    return impl(x, metric, keep_idx, num_contextual, lengths=lengths)


def select_and_merge(scores, x, metric, num_dominant, num_contextual, *, lengths=None, backend="auto"):
    """Scores -> top-k in position order -> contextual merge -> packed tokens, the methods' fused path.

    Equivalent to ``keep = topk_keep_order(scores, num_dominant, lengths=lengths)`` followed by
    ``contextual_merge(x, metric, keep, num_contextual, lengths=lengths)``.

    Parameters
    ----------
    scores : Tensor [B, N]  importance (float32; fp16/bf16 accepted)
    x : Tensor [B, N, D];  metric : Tensor [B, N, dk]
    num_dominant : int  ``k >= 1``;  num_contextual : int  ``C >= 0``;  ``k + C <= lengths[b]``
    lengths : int64 Tensor [B], optional

    Returns
    -------
    (tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C])

    Example
    -------
    >>> x = torch.randn(2, 10, 8)
    >>> tokens, keep, targets = select_and_merge(torch.rand(2, 10), x, x, 3, 2)
    >>> tokens.shape, keep.shape, targets.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 3]), torch.Size([2, 2]))
    """
    sig = _checks.signature("select", type(num_dominant), num_dominant, type(num_contextual), num_contextual,
                            tensors=(scores, x, metric, lengths))
    if not _checks.passed(sig):
        B, N = check_tokens(x, metric, lengths)
        check_topk(scores, num_dominant, None, name_k="num_dominant")
        if tuple(scores.shape) != (B, N) or scores.device != x.device:
            raise ValueError(f"scores must have shape [B, N] = [{B}, {N}] on {x.device}, "
                             f"got {tuple(scores.shape)} on {scores.device}")
        check_budget(num_dominant, num_contextual, N, "num_dominant")
        _checks.remember(sig)
    _checks.length_values("lengths", lengths, x.shape[1])
    check_budget_values(num_dominant, num_contextual, lengths, "num_dominant")
    impl = _backend.implementation("select_and_merge", backend, x)
    return impl(scores, x, metric, num_dominant, num_contextual, lengths=lengths)
