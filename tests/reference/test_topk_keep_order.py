"""Reference top-k in order vs a plain transcription of docs/ops.md#topk_keep_order, plus property tests."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.ops import topk_keep_order


def plain_topk(row: list[float], k: int, length: int) -> list[int]:
    """Rank valid positions by (not NaN, score desc, position asc); return the first k ascending."""
    def rank(j):
        v = row[j]
        return (1, 0.0, j) if math.isnan(v) else (0, -v, j)

    return sorted(sorted(range(length), key=rank)[:k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_plain_transcription_with_ties_nan_and_inf(dtype):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (5, 23), generator=gen).to(dtype)  # many ties
    scores[0, 3] = float("nan")
    scores[1, :5] = float("nan")
    scores[2, 7] = float("inf")
    scores[2, 8] = float("-inf")
    scores[3, 0] = -0.0
    scores[3, 1] = 0.0
    lengths = torch.tensor([23, 20, 9, 5, 12])
    for k in (1, 3, 5):
        got = topk_keep_order(scores, k, lengths=lengths, backend="reference")
        for b in range(5):
            want = plain_topk(scores[b].float().tolist(), k, int(lengths[b]))
            assert got[b].tolist() == want, (b, k)


def test_all_nan_row_returns_first_positions_and_nan_ranks_below_minus_inf():
    s = torch.tensor([[float("nan")] * 6, [float("nan"), float("-inf"), float("nan"), 1.0, float("nan"), 2.0]])
    got = topk_keep_order(s, 3)
    assert got[0].tolist() == [0, 1, 2]
    assert got[1].tolist() == [1, 3, 5]


def test_negative_zero_ties_with_zero():
    s = torch.tensor([[-1.0, 0.0, -0.0, -2.0]])
    assert topk_keep_order(s, 1).tolist() == [[1]]
    s = torch.tensor([[-1.0, -0.0, 0.0, -2.0]])
    assert topk_keep_order(s, 1).tolist() == [[1]]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    B=st.integers(1, 4),
    N=st.integers(1, 40),
)
def test_invariants(data, B, N):
    scores = torch.tensor(
        data.draw(st.lists(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=N, max_size=N),
                           min_size=B, max_size=B)), dtype=torch.float32)
    k = data.draw(st.integers(1, N))
    lengths = torch.tensor(data.draw(st.lists(st.integers(k, N), min_size=B, max_size=B)), dtype=torch.int64)
    idx = topk_keep_order(scores, k, lengths=lengths)
    assert idx.shape == (B, k) and idx.dtype == torch.int64
    assert (idx.diff(dim=1) > 0).all(), "strictly ascending, hence unique"
    assert (idx < lengths[:, None]).all() and (idx >= 0).all()
    for b in range(B):
        valid = scores[b, : lengths[b]]
        picked = scores[b, idx[b]]
        rest = torch.ones(int(lengths[b]), dtype=torch.bool)
        rest[idx[b]] = False
        if rest.any():  # tie-tolerant check against torch.topk: every pick >= every non-pick
            assert picked.min() >= valid[rest].max()
        assert torch.equal(picked.sort().values, valid.topk(k).values.sort().values)
