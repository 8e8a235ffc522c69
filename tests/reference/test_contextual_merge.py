"""Reference contextual merge vs a plain per-row transcription of docs/ops.md#contextual_merge."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.ops import contextual_merge, select_and_merge, topk_keep_order


def plain_merge(x, m, keep, C, length):
    """docs/ops.md#contextual_merge for one row, in Python: returns (tokens [k+C, D] float64, targets list)."""
    x, m = x.double(), m.double()
    keep = keep.tolist()
    R = [p for p in range(length) if p not in keep]
    dominant = [x[p] for p in keep]
    if C == 0:
        return torch.stack(dominant), []
    step = max(1, len(R) // C)
    T = R[0::step][:C]
    unit = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    members = {t: [] for t in T}
    for a in R:
        if a in T:
            continue
        sims = [float(unit[a] @ unit[t]) for t in T]
        best = max(range(len(T)), key=lambda i: (sims[i], -i))  # ties -> lower target
        members[T[best]].append(a)
    ctx = [x[t] + (torch.stack([x[a] for a in members[t]]).mean(0) if members[t] else 0) for t in T]
    return torch.stack(dominant + ctx), T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,dk,k,C,lengths", [
    (1, 7, 5, 3, 2, 2, None),
    (2, 33, 8, 4, 5, 4, [33, 20]),
    (3, 16, 4, 6, 3, 0, [16, 9, 4]),
    (2, 11, 6, 2, 1, 10, None),  # C = n: every non-kept token is a target
])
def test_matches_plain_transcription(B, N, D, dk, k, C, lengths, dtype):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    m = torch.randn(B, N, dk, generator=gen).to(dtype)
    lens = None if lengths is None else torch.tensor(lengths)
    scores = torch.rand(B, N, generator=gen)
    tokens, keep, targets = select_and_merge(scores, x, m, k, C, lengths=lens, backend="reference")
    assert torch.equal(keep, topk_keep_order(scores, k, lengths=lens))
    assert tokens.shape == (B, k + C, D) and tokens.dtype == dtype and targets.shape == (B, C)
    for b in range(B):
        want, T = plain_merge(x[b], m[b], keep[b], C, N if lens is None else int(lens[b]))
        assert targets[b].tolist() == T
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(tokens[b].double(), want, atol=tol, rtol=tol)
    again = contextual_merge(x, m, keep, C, lengths=lens)
    assert torch.equal(again, tokens)


def test_cosine_ties_go_to_the_lower_target():
    # Non-kept positions 1..5; C=2, step=2 -> targets 1 and 3 with identical metrics: all members join 1.
    x = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    m = torch.ones(1, 6, 3)
    out = contextual_merge(x, m, torch.tensor([[0]]), 2)
    members = x[0, [2, 4, 5]].mean(0)
    torch.testing.assert_close(out[0, 1], x[0, 1] + members)
    torch.testing.assert_close(out[0, 2], x[0, 3])


def test_zero_metric_does_not_produce_nan():
    x = torch.randn(1, 8, 4)
    out = contextual_merge(x, torch.zeros(1, 8, 3), torch.tensor([[2, 5]]), 3)
    assert not torch.isnan(out).any()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(2, 30), data=st.data())
def test_merged_count_is_k_plus_c(B, N, data):
    k = data.draw(st.integers(1, N - 1))
    C = data.draw(st.integers(0, N - k))
    x = torch.randn(B, N, 4)
    tokens, keep, targets = select_and_merge(torch.randn(B, N), x, x, k, C)
    assert tokens.shape == (B, k + C, 4)
    assert (keep.diff(dim=1) > 0).all() and (targets.diff(dim=1) > 0).all() if C > 1 else True
    for b in range(B):  # targets are never kept tokens; dominant rows are exact copies
        assert not set(targets[b].tolist()) & set(keep[b].tolist())
        assert torch.equal(tokens[b, :k], x[b, keep[b]])
