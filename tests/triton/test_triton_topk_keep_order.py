"""Triton topk_keep_order vs the reference (the executable spec) and vs the ranking rule written out."""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from utils import DTYPES, interpret  # noqa: E402
from vtprune.ops import topk_keep_order  # noqa: E402

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-30, -1e30]


def both(scores, k, lengths, device):
    got = topk_keep_order(scores.to(device), k, lengths=lengths, backend="triton").cpu()
    want = topk_keep_order(scores, k, lengths=lengths, backend="reference")
    return got, want


def by_rule(row: list[float], k: int, length: int) -> list[int]:
    """The ranking of docs/ops.md#topk_keep_order by a Python sort: valid first, NaN last, higher first, lower
    position first."""
    def rank(j):
        v = row[j]
        return (v != v, -(v if v == v else 0.0), j)  # -0.0 == +0.0 compares equal here

    return sorted(sorted(range(length), key=rank)[:k])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 33, 300])
def test_random_scores_with_lengths(N, dtype, device, poison):
    gen = torch.Generator().manual_seed(N)
    B = 4
    scores = torch.randn(B, N, generator=gen).to(dtype)
    lengths = torch.randint(1, N + 1, (B,), generator=gen)
    lengths[0] = N
    for k in sorted({1, max(1, int(lengths.min()) // 2), int(lengths.min())}):
        got, want = both(scores, k, lengths, device)
        assert got.dtype == torch.int64 and torch.equal(got, want), (k, got, want)
        assert (got < lengths[:, None]).all() and (got.diff(dim=1) > 0).all()
    got, want = both(scores, N, None, device)  # k = N: every position, in order
    assert torch.equal(got, torch.arange(N).expand(B, N)) and torch.equal(got, want)


@pytest.mark.parametrize("N", [10, 257])
def test_integer_scores_tie_to_the_lower_position(N, device, poison):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (3, N), generator=gen).float()  # many equal values straddle the k-th
    for k in (1, 3, N // 2, N - 1):
        got, want = both(scores, k, None, device)
        assert torch.equal(got, want)
        assert [by_rule(r, k, N) for r in scores.tolist()] == got.tolist()


def test_nan_inf_and_signed_zero(device, poison):
    """NaN ranks below -inf, -0.0 ties with +0.0 (lower position wins), never a position past the length."""
    scores = torch.tensor([
        [float("nan"), -0.0, 0.0, float("-inf"), float("nan"), float("inf"), -0.0, 5.0],
        [float("nan")] * 6 + [1.0, 2.0],
        [-0.0, 0.0, -0.0, 0.0, float("-inf"), float("-inf"), float("nan"), 0.0],
    ])
    lengths = torch.tensor([8, 6, 8])
    for k in range(1, 7):
        got, want = both(scores, k, lengths, device)
        assert torch.equal(got, want), (k, got, want)
        assert got.tolist() == [by_rule(r, k, n) for r, n in zip(scores.tolist(), lengths.tolist())]
    got, _ = both(scores, 3, lengths, device)
    assert got[1].tolist() == [0, 1, 2]  # all NaN inside the length: the lowest positions, not 6 and 7


def test_long_rows_take_the_tiled_path(device, poison):
    """N > 4096 streams the row in tiles through every radix round and the compaction."""
    gen = torch.Generator().manual_seed(2)
    N = 9000
    scores = torch.randint(0, 50, (2, N), generator=gen).float()  # ties across tile boundaries
    scores[1, 8190:8200] = float("nan")
    lengths = torch.tensor([N, 8500])
    for k in (1, 4000, 8500):
        got, want = both(scores, k, lengths, device)
        assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from(SPECIAL) | st.floats(-3, 3, width=32), min_size=12, max_size=12),
                  min_size=1, max_size=3),
    k=st.integers(1, 12),
    data=st.data(),
)
def test_property_equals_reference(rows, k, data):
    scores = torch.tensor(rows, dtype=torch.float32)
    lengths = torch.tensor([data.draw(st.integers(k, 12)) for _ in rows])
    device = "cuda" if torch.cuda.is_available() and not interpret() else "cpu"  # no fixtures under @given
    got, want = both(scores, k, lengths, device)
    assert torch.equal(got, want)
