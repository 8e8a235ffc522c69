"""Public ops ``attention_scores`` and ``attention_with_scores`` (docs/ops.md#attention_scores)."""

from __future__ import annotations

from vtprune import _backend
from vtprune.ops import _checks


def check_qk(q, k, v, query_spans, key_spans, key_padding_mask, causal, scale):
    """Validate the shared arguments of the attention-score ops; returns (causal, scale) as bool and float/None.

    Shapes, dtypes and devices are checked once per signature of the call (:func:`vtprune.ops._checks.signature`);
    span values are read on the host only when the spans are CPU tensors (see :mod:`vtprune.ops._checks`).
    """
    sig = _checks.signature("qk", tensors=(q, k, v, query_spans, key_spans, key_padding_mask))
    if not _checks.passed(sig):
        _check_qk_shapes(q, k, v, query_spans, key_spans, key_padding_mask)
        _checks.remember(sig)
    L = q.shape[2]
    _checks.span_values("query_spans", query_spans, L)
    _checks.span_values("key_spans", key_spans, L)
    return _checks.flag("causal", causal), _checks.scale(scale)


def _check_qk_shapes(q, k, v, query_spans, key_spans, key_padding_mask):
    _checks.batched("q", q, ndim=4)
    B, H, L, d = q.shape
    _checks.tensor("k", k, ndim=4, dtypes=_checks.FLOAT_DTYPES, device=q.device)
    _checks.same_dtype("k", k, "q", q)
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != d:
        raise ValueError(f"k must have shape [B, Hkv, L, d] = [{B}, Hkv, {L}, {d}], got {tuple(k.shape)}")
    if k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k heads (Hkv = {k.shape[1]})")
    if v is not None:
        _checks.tensor("v", v, ndim=4, dtypes=_checks.FLOAT_DTYPES, device=q.device)
        _checks.same_dtype("v", v, "q", q)
        if tuple(v.shape[:3]) != tuple(k.shape[:3]):
            raise ValueError(f"v must have shape [B, Hkv, L, dv] = {list(k.shape[:3])} + [dv], got {tuple(v.shape)}")
    if L < 1 or d < 1:
        raise ValueError(f"q must have L >= 1 and d >= 1, got shape {tuple(q.shape)}")
    _checks.span_meta("query_spans", query_spans, B, q.device)
    _checks.span_meta("key_spans", key_spans, B, q.device)
    _checks.key_padding_mask(key_padding_mask, B, L, q.device)


def attention_scores(q, k, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None, backend="auto"):
    """Column attention scores of a key span, averaged over a query span and all query heads.

    ``score[b, j] = mean_h mean_{i in Qs} softmax_{j'}(q[b,h,i] . k[b,h//g,j'] * scale)[Ks_start + j]`` where
    the softmax runs over every valid key of row ``i`` (``j' <= i`` when ``causal``; ``key_padding_mask``
    excludes padding) and ``g = H // Hkv`` (each query head counts once). A query row with no valid key
    contributes zero; the mean still divides by the query count. The full ``L x L`` matrix is never needed by
    the GPU backends.

    Parameters
    ----------
    q : Tensor [B, H, L, d]  post-RoPE queries (fp32, fp16 or bf16)
    k : Tensor [B, Hkv, L, d]  post-RoPE keys, same dtype; ``H % Hkv == 0``
    query_spans, key_spans : int64 Tensor [B, 2]  ``(start, count)`` per batch row, ``count >= 1``; CPU (the
        recommended form: checked on the host, staged to the device without a sync) or the device of ``q``
        (checked by a device-side assert; the host never reads them)
    causal : bool  (a Python bool)
    key_padding_mask : bool Tensor [B, L], optional  True for a real token
    scale : float, optional  finite and positive; default ``d ** -0.5``
    backend : "auto" | "reference" | "triton" | "cuda"

    Returns
    -------
    Tensor float32 [B, W]: W = the largest key count when ``key_spans`` is a CPU tensor, ``L`` when it is on
    the device (the host cannot see the counts without a sync); entries past a row's own key count are zero.

    Example
    -------
    >>> q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    >>> s = attention_scores(q, k, query_spans=torch.tensor([[2, 5]]), key_spans=torch.tensor([[2, 5]]),
    ...                      causal=True)
    >>> s.shape
    torch.Size([1, 5])
    """
    causal, scale = check_qk(q, k, None, query_spans, key_spans, key_padding_mask, causal, scale)
    impl = _backend.implementation("attention_scores", backend, q)
    return impl(q, k, query_spans=query_spans, key_spans=key_spans, causal=causal,
                key_padding_mask=key_padding_mask, scale=scale)


def attention_with_scores(
    q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None, backend="auto"
):
    """The layer's attention output and the column scores of :func:`attention_scores` in one pass.

    ``out[b, h, i] = sum_j softmax_j(q . k * scale) v[b, h // g, j]`` with the same masking as the scores
    (a query row with no valid key outputs zeros, not NaN). Use it where the layer's attention runs anyway
    (CLIP layer -2, FastV's layer K), so the scores cost almost nothing extra.

    Parameters
    ----------
    q : Tensor [B, H, L, d];  k : Tensor [B, Hkv, L, d];  v : Tensor [B, Hkv, L, dv]  (same dtype)
    query_spans, key_spans, causal, key_padding_mask, scale, backend : as in :func:`attention_scores`

    Returns
    -------
    (out, scores): out [B, H, L, dv] in q's dtype; scores float32 [B, W] as in :func:`attention_scores`

    Example
    -------
    >>> q = torch.randn(2, 4, 9, 8); k = v = torch.randn(2, 4, 9, 8)
    >>> out, s = attention_with_scores(q, k, v, query_spans=torch.tensor([[0, 1]] * 2),
    ...                                key_spans=torch.tensor([[1, 8]] * 2), causal=False)
    """
    if v is None:
        raise ValueError("v must be a Tensor [B, Hkv, L, dv] (attention_with_scores returns the attention output; "
                         "use attention_scores for the scores alone), got None")
    causal, scale = check_qk(q, k, v, query_spans, key_spans, key_padding_mask, causal, scale)
    impl = _backend.implementation("attention_with_scores", backend, q)
    return impl(q, k, v, query_spans=query_spans, key_spans=key_spans, causal=causal,
                key_padding_mask=key_padding_mask, scale=scale)
