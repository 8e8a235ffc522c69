"""The merge's one-hot pass keeps non-finite x where the reference's scatter_add puts it.

A product ``0 * inf`` is NaN, so a one-hot product alone would spread an infinite member into every target
of its column; the kernel re-sums such column tiles exactly. Here single entries of x (a member, a kept row,
a target, two members of one target with opposite infinities) are made non-finite and the output must match
the reference NaN for NaN and infinity for infinity, with every other entry unchanged.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from vtprune.ops import contextual_merge, select_and_merge  # noqa: E402

INF, NAN = float("inf"), float("nan")


def same(out, ref):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    ok = ~torch.isnan(ref)
    assert torch.equal(torch.isinf(out[ok]), torch.isinf(ref[ok]))
    torch.testing.assert_close(out[ok], ref[ok], rtol=1e-5, atol=1e-6)


def inputs(seed, N=40, D=24, dk=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, N, D, generator=gen), torch.randn(1, N, dk, generator=gen)


@pytest.mark.parametrize("poisoned", [
    [(7, 3, INF)],  # one member
    [(7, 3, -INF)],
    [(7, 3, NAN)],
    [(0, 5, INF)],  # a kept row: must not reach any contextual token
    [(1, 2, NAN)],  # the first target (R[0] = 1 with keep [0, 4, 9, 20])
    [(7, 3, INF), (8, 3, -INF), (30, 3, INF)],  # opposite infinities, maybe in one target
])
def test_nonfinite_rows_match_the_reference(poisoned, device, poison):
    x, metric = inputs(3)
    for pos, dim, value in poisoned:
        x[0, pos, dim] = value
    keep = torch.tensor([[0, 4, 9, 20]])
    ref = contextual_merge(x, metric, keep, 5, backend="reference")
    out = contextual_merge(x.to(device), metric.to(device), keep.to(device), 5, backend="triton").cpu()
    same(out, ref)


def test_member_sums_of_many_targets_and_column_tiles(device, poison):
    """Several one-hot steps (N > 128), 20 targets and 3 column tiles; a NaN member in one tile only."""
    x, metric = inputs(5, N=300, D=80, dk=16)
    x[0, 150, 70] = NAN
    scores = torch.rand(1, 300, generator=torch.Generator().manual_seed(9))
    ref = select_and_merge(scores, x, metric, 30, 20, backend="reference")
    out = [t.cpu() for t in select_and_merge(scores.to(device), x.to(device), metric.to(device), 30, 20,
                                             backend="triton")]
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    same(out[0], ref[0])
    assert torch.isnan(out[0]).sum() == 1  # only the NaN member's target, in that column
