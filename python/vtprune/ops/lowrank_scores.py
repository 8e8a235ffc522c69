"""Public op ``lowrank_scores`` (docs/ops.md#lowrank_scores, ALVTS selector)."""

from __future__ import annotations

from vtprune import _backend
from vtprune.ops import _checks


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None, backend="auto"):
    """ALVTS selector scores of the visual tokens from a causal single-head low-rank attention.

    ``a = h @ u``, ``b = h @ v``, ``A = softmax(a b^T / sqrt(R))`` (causal, key padding excluded);
    ``S_V2V[j]`` = mean over visual query rows of ``A[i, j]``, ``S_T2V[j]`` = mean over text query rows (real,
    non-visual tokens) of ``A[i, j]``, and ``S[j] = S_V2V[j] * S_T2V[j]`` for visual ``j``. A batch row with no
    text token uses ``S_T2V = 1``. Cost ``O(L^2 R)``.

    Parameters
    ----------
    h : Tensor [B, L, D]  normalised hidden states (the layer's input norm applied)
    u, v : Tensor [D, R]  low-rank query and key factors, h's dtype
    visual_spans : int64 Tensor [B, 2]  ``(start, count)`` of the image tokens per row (CPU or h's device, as
        the spans of :func:`vtprune.ops.attention_scores`)
    key_padding_mask : bool Tensor [B, L], optional  True for a real token
    backend : "auto" | "reference" | "triton" | "cuda"

    Returns
    -------
    float32 Tensor [B, W], zero past each row's count: W = the largest visual count for CPU spans, ``L`` for
    spans on the device.

    Example
    -------
    >>> h = torch.randn(1, 12, 16); u, v = torch.randn(16, 4), torch.randn(16, 4)
    >>> lowrank_scores(h, u, v, visual_spans=torch.tensor([[2, 6]])).shape
    torch.Size([1, 6])
    """
    sig = _checks.signature("lowrank", tensors=(h, u, v, visual_spans, key_padding_mask))
    if not _checks.passed(sig):
        _check_shapes(h, u, v, visual_spans, key_padding_mask)
        _checks.remember(sig)
    _checks.span_values("visual_spans", visual_spans, h.shape[1])
    impl = _backend.implementation("lowrank_scores", backend, h)
    return impl(h, u, v, visual_spans=visual_spans, key_padding_mask=key_padding_mask)


def _check_shapes(h, u, v, visual_spans, key_padding_mask) -> None:
    _checks.batched("h", h, ndim=3)
    B, L, D = h.shape
    for name, f in (("u", u), ("v", v)):
        _checks.tensor(name, f, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=h.device)
        _checks.same_dtype(name, f, "h", h)
        _checks.dim_size(name, f, 0, D, "h's hidden size D")
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape [D, R], got {tuple(u.shape)} and {tuple(v.shape)}")
    if L < 1 or D < 1 or u.shape[1] < 1:
        raise ValueError(f"h must have L >= 1 and D >= 1 and the factors rank R >= 1, got h {tuple(h.shape)}, "
                         f"u {tuple(u.shape)}")
    _checks.span_meta("visual_spans", visual_spans, B, h.device)
    _checks.key_padding_mask(key_padding_mask, B, L, h.device)
