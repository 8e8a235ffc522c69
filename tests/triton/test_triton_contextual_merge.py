"""Triton contextual_merge vs the reference, and vs the merge rule on inputs whose answer is exact."""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from utils import DTYPES  # noqa: E402
from vtprune.ops import contextual_merge  # noqa: E402

# one rounding of the output dtype: both sides sum in float32 but in different orders
TOKEN_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
             torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}


def random_keep(B, k, lengths, gen):
    """int64 [B, k] strictly ascending kept positions inside each row's length."""
    return torch.stack([torch.randperm(int(n), generator=gen)[:k].sort().values for n in lengths])


def run(x, metric, keep, C, lengths, device):
    got = contextual_merge(x.to(device), metric.to(device), keep.to(device), C, lengths=lengths,
                           backend="triton").cpu()
    want = contextual_merge(x, metric, keep, C, lengths=lengths, backend="reference")
    return got, want


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
def test_matches_reference(B, N, D, dk, k, C, lengths, dtype, device, poison):
    gen = torch.Generator().manual_seed(N + C)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = torch.randn(B, N, dk, generator=gen).to(dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    keep = random_keep(B, k, [N] * B if lengths is None else lengths, gen)
    got, want = run(x, metric, keep, C, lengths, device)
    assert got.dtype == dtype and got.shape == (B, k + C, D)
    assert torch.equal(got[:, :k], x.gather(1, keep[:, :, None].expand(-1, -1, D)))  # dominant: exact copies
    torch.testing.assert_close(got, want, **TOKEN_TOL[dtype])


def rule_targets(n_valid: int, keep: list[int], C: int) -> tuple[list[int], list[int]]:
    """(targets, members) of one row by docs/ops.md#contextual_merge, in plain Python."""
    rest = [p for p in range(n_valid) if p not in keep]
    step = max(1, len(rest) // C)
    targets = rest[0::step][:C]
    return targets, [p for p in rest if p not in targets]


def one_hot(dk, i):
    return torch.nn.functional.one_hot(torch.tensor(i), dk).float()


@pytest.mark.parametrize("tied_slots", [(2, 9), (5, 37), (0, 1, 39)])
def test_exact_cosine_ties_go_to_the_lower_target(tied_slots, device, poison):
    """Members see cosine exactly 1 with the tied targets (one-hot metrics) and 0 with the others.

    Slots 5 and 37 sit in different 32-target tiles of the kernel, 2 and 9 in the same one.
    """
    N, D, dk, C = 60, 8, 4, 40
    keep = [3, 17, 18]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, N, D, generator=gen)
    targets, members = rule_targets(N, keep, C)
    metric = torch.zeros(1, N, dk)
    metric[0, :] = one_hot(dk, 0)
    for slot in tied_slots:
        metric[0, targets[slot]] = one_hot(dk, 2) * (slot + 1)  # a scaled copy: the same direction
    for p in members:
        metric[0, p] = one_hot(dk, 2) * 0.5
    got, want = run(x, metric, torch.tensor([keep]), C, None, device)
    expect = x[0, targets].clone()
    expect[tied_slots[0]] += x[0, members].mean(0)
    torch.testing.assert_close(got[0, len(keep):], expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_zero_metric_rows_join_the_first_target(device, poison):
    """F.normalize maps a zero vector to zero (eps 1e-12): every similarity is 0, a tie among all targets."""
    N, D, C = 20, 6, 3
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, N, D, generator=gen)
    metric = torch.randn(2, N, 4, generator=gen)
    metric[1] = 0.0
    keep = torch.tensor([[0, 4], [2, 3]])
    got, want = run(x, metric, keep, C, None, device)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    targets, members = rule_targets(N, [2, 3], C)
    torch.testing.assert_close(got[1, 2], x[1, targets[0]] + x[1, members].mean(0), atol=1e-6, rtol=1e-6)


def test_members_only_come_from_inside_the_length(device, poison):
    """Padding past lengths[b] carries huge values: any leak into a contextual token shows."""
    N, D, C = 16, 4, 2
    x = torch.randn(1, N, D)
    x[0, 10:] = 1e6
    metric = torch.randn(1, N, 4)
    got, want = run(x, metric, torch.tensor([[1, 2, 3]]), C, torch.tensor([10]), device)
    assert got.abs().max() < 1e3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
