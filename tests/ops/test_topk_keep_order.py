"""``topk_keep_order`` on every backend against the ranking rule of docs/ops.md#topk_keep_order (exact indices)."""

import pytest
import torch
from backends import BACKENDS, device_of, require
from hypothesis import given, settings
from hypothesis import strategies as st
from truths import topk_by_rule

from utils import DTYPES
from vtprune.ops import topk_keep_order

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-30, -1e30]


def run(scores, k, lengths, backend):
    """The backend's indices (inputs on its device, lengths on the CPU), back on the CPU."""
    return topk_keep_order(scores.to(device_of(backend)), k, lengths=lengths, backend=backend).cpu()


def by_rule(scores, k, lengths=None) -> list[list[int]]:
    n = [scores.shape[1]] * scores.shape[0] if lengths is None else lengths.tolist()
    return [topk_by_rule(row, k, length) for row, length in zip(scores.float().tolist(), n)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_nan_and_inf_follow_the_rule(dtype, backend, poison):
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
        assert run(scores, k, lengths, backend).tolist() == by_rule(scores, k, lengths), k


def test_all_nan_row_returns_first_positions_and_nan_ranks_below_minus_inf(backend, poison):
    s = torch.tensor([[float("nan")] * 6, [float("nan"), float("-inf"), float("nan"), 1.0, float("nan"), 2.0]])
    got = run(s, 3, None, backend)
    assert got[0].tolist() == [0, 1, 2]
    assert got[1].tolist() == [1, 3, 5]


def test_negative_zero_ties_with_zero(backend, poison):
    assert run(torch.tensor([[-1.0, 0.0, -0.0, -2.0]]), 1, None, backend).tolist() == [[1]]
    assert run(torch.tensor([[-1.0, -0.0, 0.0, -2.0]]), 1, None, backend).tolist() == [[1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 33, 300])
def test_random_scores_with_lengths(N, dtype, backend, poison):
    gen = torch.Generator().manual_seed(N)
    B = 4
    scores = torch.randn(B, N, generator=gen).to(dtype)
    lengths = torch.randint(1, N + 1, (B,), generator=gen)
    lengths[0] = N
    for k in sorted({1, max(1, int(lengths.min()) // 2), int(lengths.min())}):
        got = run(scores, k, lengths, backend)
        assert got.dtype == torch.int64 and got.tolist() == by_rule(scores, k, lengths), k
        assert (got < lengths[:, None]).all() and (got.diff(dim=1) > 0).all()
    got = run(scores, N, None, backend)  # k = N: every position, in order
    assert torch.equal(got, torch.arange(N).expand(B, N))


@pytest.mark.parametrize("N", [10, 257])
def test_integer_scores_tie_to_the_lower_position(N, backend, poison):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (3, N), generator=gen).float()  # many equal values straddle the k-th
    for k in (1, 3, N // 2, N - 1):
        assert run(scores, k, None, backend).tolist() == by_rule(scores, k)


def test_nan_inf_and_signed_zero(backend, poison):
    """NaN ranks below -inf, -0.0 ties with +0.0 (lower position wins), never a position past the length."""
    scores = torch.tensor(
        [
            [float("nan"), -0.0, 0.0, float("-inf"), float("nan"), float("inf"), -0.0, 5.0],
            [float("nan")] * 6 + [1.0, 2.0],
            [-0.0, 0.0, -0.0, 0.0, float("-inf"), float("-inf"), float("nan"), 0.0],
        ]
    )
    lengths = torch.tensor([8, 6, 8])
    for k in range(1, 7):
        assert run(scores, k, lengths, backend).tolist() == by_rule(scores, k, lengths), k
    assert run(scores, 3, lengths, backend)[1].tolist() == [0, 1, 2]  # all NaN inside the length: lowest positions


def test_long_rows_take_the_tiled_path(backend, poison):
    """N > 4096 streams the row in tiles (Triton) through every radix round and the compaction."""
    gen = torch.Generator().manual_seed(2)
    N = 9000
    scores = torch.randint(0, 50, (2, N), generator=gen).float()  # ties across tile boundaries
    scores[1, 8190:8200] = float("nan")
    lengths = torch.tensor([N, 8500])
    for k in (1, 4000, 8500):
        assert run(scores, k, lengths, backend).tolist() == by_rule(scores, k, lengths), k


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 4), N=st.integers(1, 40))
@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants(backend, data, B, N):
    require(backend)
    scores = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=N, max_size=N), min_size=B, max_size=B
            )
        ),
        dtype=torch.float32,
    )
    k = data.draw(st.integers(1, N))
    lengths = torch.tensor(data.draw(st.lists(st.integers(k, N), min_size=B, max_size=B)), dtype=torch.int64)
    idx = run(scores, k, lengths, backend)
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


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from(SPECIAL) | st.floats(-3, 3, width=32), min_size=12, max_size=12),
        min_size=1,
        max_size=3,
    ),
    k=st.integers(1, 12),
    data=st.data(),
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_follow_the_rule(backend, rows, k, data):
    require(backend)
    scores = torch.tensor(rows, dtype=torch.float32)
    lengths = torch.tensor([data.draw(st.integers(k, 12)) for _ in rows])
    assert run(scores, k, lengths, backend).tolist() == by_rule(scores, k, lengths)
