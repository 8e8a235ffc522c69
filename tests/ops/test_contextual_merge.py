"""``contextual_merge`` and ``select_and_merge`` on every backend against the merge rule of
docs/ops.md#contextual_merge (tests/ops/truths.py), and on inputs whose answer is exact."""

import pytest
import torch
from backends import BACKENDS, device_of, require
from hypothesis import given, settings
from hypothesis import strategies as st
from truths import contextual_merge as merge_truth
from truths import merge_targets, topk_by_rule

from utils import DTYPES
from vtprune.ops import contextual_merge, select_and_merge, topk_keep_order

# float64 truth vs a backend: the backends sum in float32 and round the output to its dtype once
TRUTH_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# exact-answer inputs (one-hot metrics, small sums) in float32
EXACT = dict(atol=1e-6, rtol=1e-6)


def random_keep(B, k, lengths, gen):
    """int64 [B, k] strictly ascending kept positions inside each row's length."""
    return torch.stack([torch.randperm(int(n), generator=gen)[:k].sort().values for n in lengths])


def merge(x, metric, keep, C, lengths, backend):
    dev = device_of(backend)
    return contextual_merge(x.to(dev), metric.to(dev), keep.to(dev), C, lengths=lengths, backend=backend).cpu()


def check_against_truth(tokens, x, metric, keep, C, lengths, targets=None):
    """Every row of ``tokens`` (and ``targets``) equals the rule's, within one rounding of the dtype."""
    B, N, _ = x.shape
    tol = TRUTH_TOL[x.dtype]
    for b in range(B):
        want, T = merge_truth(x[b], metric[b], keep[b], C, N if lengths is None else int(lengths[b]))
        if targets is not None:
            assert targets[b].tolist() == T
        torch.testing.assert_close(tokens[b].double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N,D,dk,k,C,lengths",
    [
        (1, 7, 5, 3, 2, 2, None),
        (2, 33, 8, 4, 5, 4, [33, 20]),
        (3, 16, 4, 6, 3, 0, [16, 9, 4]),
        (2, 11, 6, 2, 1, 10, None),  # C = n: every non-kept token is a target
    ],
)
def test_select_and_merge_follows_the_rule(B, N, D, dk, k, C, lengths, dtype, backend, device, poison):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    m = torch.randn(B, N, dk, generator=gen).to(dtype)
    lens = None if lengths is None else torch.tensor(lengths)
    scores = torch.rand(B, N, generator=gen)
    out = select_and_merge(scores.to(device), x.to(device), m.to(device), k, C, lengths=lens, backend=backend)
    tokens, keep, targets = (t.cpu() for t in out)
    n = [N] * B if lens is None else lens.tolist()
    assert keep.tolist() == [topk_by_rule(r, k, length) for r, length in zip(scores.tolist(), n)]
    assert tokens.shape == (B, k + C, D) and tokens.dtype == dtype and targets.shape == (B, C)
    check_against_truth(tokens, x, m, keep, C, lens, targets)
    assert torch.equal(merge(x, m, keep, C, lens, backend), tokens)


def test_cosine_ties_go_to_the_lower_target(backend, poison):
    # Non-kept positions 1..5; C=2, step=2 -> targets 1 and 3 with identical metrics: all members join 1.
    x = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    out = merge(x, torch.ones(1, 6, 3), torch.tensor([[0]]), 2, None, backend)
    torch.testing.assert_close(out[0, 1], x[0, 1] + x[0, [2, 4, 5]].mean(0))
    torch.testing.assert_close(out[0, 2], x[0, 3])


def test_zero_metric_does_not_produce_nan(backend, poison):
    x = torch.randn(1, 8, 4)
    assert not torch.isnan(merge(x, torch.zeros(1, 8, 3), torch.tensor([[2, 5]]), 3, None, backend)).any()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(2, 30), data=st.data())
@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_count_is_k_plus_c(backend, B, N, data):
    require(backend)
    dev = device_of(backend)
    k = data.draw(st.integers(1, N - 1))
    C = data.draw(st.integers(0, N - k))
    x = torch.randn(B, N, 4)
    out = select_and_merge(torch.randn(B, N, device=dev), x.to(dev), x.to(dev), k, C, backend=backend)
    tokens, keep, targets = (t.cpu() for t in out)
    assert tokens.shape == (B, k + C, 4)
    assert (keep.diff(dim=1) > 0).all() and (targets.diff(dim=1) > 0).all() if C > 1 else True
    for b in range(B):  # targets are never kept tokens; dominant rows are exact copies
        assert not set(targets[b].tolist()) & set(keep[b].tolist())
        assert torch.equal(tokens[b, :k], x[b, keep[b]])


# B, N, D, dk, k, C, lengths: one tile; several position / target / metric-chunk tiles (N 100, C 40,
# dk 80); C = 0; C = n for the shorter row (every non-kept token a target); k = 0
CASES = [
    (2, 30, 24, 8, 5, 4, [30, 22]),
    (2, 100, 40, 80, 10, 40, [100, 77]),
    (2, 12, 8, 4, 3, 0, None),
    (2, 12, 16, 4, 3, 6, [12, 9]),
    (3, 9, 8, 4, 0, 4, [9, 5, 7]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,dk,k,C,lengths", CASES)
def test_random_keep_follows_the_rule(B, N, D, dk, k, C, lengths, dtype, backend, poison):
    gen = torch.Generator().manual_seed(N + C)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = torch.randn(B, N, dk, generator=gen).to(dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    keep = random_keep(B, k, [N] * B if lengths is None else lengths, gen)
    got = merge(x, metric, keep, C, lengths, backend)
    assert got.dtype == dtype and got.shape == (B, k + C, D)
    assert torch.equal(got[:, :k], x.gather(1, keep[:, :, None].expand(-1, -1, D)))  # dominant: exact copies
    check_against_truth(got, x, metric, keep, C, lengths)


def one_hot(dk, i):
    return torch.nn.functional.one_hot(torch.tensor(i), dk).float()


@pytest.mark.parametrize("tied_slots", [(2, 9), (5, 37), (0, 1, 39)])
def test_exact_cosine_ties_go_to_the_lower_target(tied_slots, backend, poison):
    """Members see cosine exactly 1 with the tied targets (one-hot metrics) and 0 with the others.

    Slots 5 and 37 sit in different 32-target tiles of the Triton kernel, 2 and 9 in the same one.
    """
    N, D, dk, C = 60, 8, 4, 40
    keep = [3, 17, 18]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, N, D, generator=gen)
    targets, members = merge_targets(N, keep, C)
    metric = torch.zeros(1, N, dk)
    metric[0, :] = one_hot(dk, 0)
    for slot in tied_slots:
        metric[0, targets[slot]] = one_hot(dk, 2) * (slot + 1)  # a scaled copy: the same direction
    for p in members:
        metric[0, p] = one_hot(dk, 2) * 0.5
    got = merge(x, metric, torch.tensor([keep]), C, None, backend)
    expect = x[0, targets].clone()
    expect[tied_slots[0]] += x[0, members].mean(0)
    torch.testing.assert_close(got[0, len(keep) :], expect, **EXACT)
    torch.testing.assert_close(got[0, : len(keep)], x[0, keep], rtol=0, atol=0)


def test_zero_metric_rows_join_the_first_target(backend, poison):
    """F.normalize maps a zero vector to zero (eps 1e-12): every similarity is 0, a tie among all targets."""
    N, D, C = 20, 6, 3
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, N, D, generator=gen)
    metric = torch.randn(2, N, 4, generator=gen)
    metric[1] = 0.0
    keep = torch.tensor([[0, 4], [2, 3]])
    got = merge(x, metric, keep, C, None, backend)
    check_against_truth(got, x, metric, keep, C, None)
    targets, members = merge_targets(N, [2, 3], C)
    torch.testing.assert_close(got[1, 2], x[1, targets[0]] + x[1, members].mean(0), **EXACT)


def test_members_only_come_from_inside_the_length(backend, poison):
    """Padding past lengths[b] carries huge values: any leak into a contextual token shows."""
    N, D, C = 16, 4, 2
    x = torch.randn(1, N, D)
    x[0, 10:] = 1e6
    metric = torch.randn(1, N, 4)
    keep, lengths = torch.tensor([[1, 2, 3]]), torch.tensor([10])
    got = merge(x, metric, keep, C, lengths, backend)
    assert got.abs().max() < 1e3
    check_against_truth(got, x, metric, keep, C, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,N,D,k,C,lengths,integer_scores",
    [
        (2, 40, 16, 6, 5, [40, 31], False),
        (3, 70, 24, 1, 9, [70, 12, 33], True),  # tied scores; several position tiles of the merge
        (1, 9, 8, 9, 0, None, False),  # k = N, nothing to merge
        (2, 11, 8, 4, 7, None, True),  # C = n: every non-kept token is a target
    ],
)
def test_select_and_merge_is_its_two_steps(B, N, D, k, C, lengths, integer_scores, dtype, backend, device, poison):
    gen = torch.Generator().manual_seed(N * 3 + k)
    scores = torch.randint(0, 4, (B, N), generator=gen).float() if integer_scores else torch.rand(B, N, generator=gen)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = torch.randn(B, N, 8, generator=gen).to(dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    dev = [t.to(device) for t in (scores, x, metric)]
    tokens, keep, targets = (t.cpu() for t in select_and_merge(*dev, k, C, lengths=lengths, backend=backend))
    n = [N] * B if lengths is None else lengths.tolist()
    assert keep.tolist() == [topk_by_rule(r, k, length) for r, length in zip(scores.tolist(), n)]
    assert tokens.dtype == dtype and tokens.shape == (B, k + C, x.shape[-1])
    check_against_truth(tokens, x, metric, keep, C, lengths, targets)
    # the fused path is exactly its two steps
    keep2 = topk_keep_order(dev[0], k, lengths=lengths, backend=backend)
    assert torch.equal(keep2.cpu(), keep)
    assert torch.equal(contextual_merge(dev[1], dev[2], keep2, C, lengths=lengths, backend=backend).cpu(), tokens)
