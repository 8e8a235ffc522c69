"""The tiled top-k (every program selects from the whole row, writes its own tile) vs the reference.

Rows up to 4096 scores are split into position tiles (16 positions at batch 1 here, so a 200-score row runs
13 programs); ties at the threshold straddle tile borders, NaN, -inf and signed zeros sit among the kept.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from vtprune.ops import topk_keep_order  # noqa: E402
from vtprune.triton_kernels.topk_keep_order import tiles_config  # noqa: E402


def test_tile_sizes_fill_an_h100():
    assert tiles_config(2880, 1) == 16 and -(-2880 // 16) >= 132  # 180 programs at LLaVA-NeXT, batch 1
    assert tiles_config(2880, 8) == 128  # 23 per row x 8 rows
    assert tiles_config(20, 1) == 16


@pytest.mark.parametrize("k", [1, 37, 199, 200])
def test_ties_across_tiles(k, device, poison):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (2, 200), generator=gen).float()  # long runs of equal scores
    lengths = torch.tensor([200, 200])
    got = topk_keep_order(scores.to(device), k, lengths=lengths, backend="triton").cpu()
    want = topk_keep_order(scores, k, lengths=lengths, backend="reference")
    assert torch.equal(got, want)


def test_nonfinite_and_lengths(device, poison):
    scores = torch.rand(2, 150, generator=torch.Generator().manual_seed(1))
    scores[0, 3], scores[0, 90], scores[0, 120] = float("nan"), float("-inf"), float("inf")
    scores[1, 10], scores[1, 11] = -0.0, 0.0
    scores[1, 100:] = 5.0  # past the length: never picked
    lengths = torch.tensor([150, 100])
    for k in (1, 50, 99):
        got = topk_keep_order(scores.to(device), k, lengths=lengths, backend="triton").cpu()
        want = topk_keep_order(scores, k, lengths=lengths, backend="reference")
        assert torch.equal(got, want), k
