"""select_and_merge with the larger position tiles its assignment launch takes at the benchmark shapes.

assign_config gives 32 or 64 positions per program only from N * B >= ~3000 (Qwen2.5-VL, batch 8), which the
interpreter tests never reach; here the tile is forced and the result must equal the 16-position run bit for
bit (every position is classified on its own) and the reference.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

import vtprune.triton_kernels.contextual_merge as CM  # noqa: E402
from vtprune.ops import select_and_merge  # noqa: E402


def run(backend, device, lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    B, N, D, dk, k, C = 2, 150, 16, 8, 12, 9
    scores, x, metric = torch.rand(B, N, generator=gen), torch.randn(B, N, D, generator=gen), torch.randn(
        B, N, dk, generator=gen)
    dev = [t.to(device) for t in (scores, x, metric)]
    return [t.cpu() for t in select_and_merge(*dev, k, C, lengths=lengths, backend=backend)]


@pytest.mark.parametrize("rows", [32, 64])
def test_larger_position_tiles_give_the_same_tokens(rows, monkeypatch, device, poison):
    lengths = torch.tensor([150, 97])
    small = run("triton", device, lengths)
    real = CM.assign_config

    def forced(N, B, dk, C, select):
        cfg = real(N, B, dk, C, select)
        assert cfg["BLOCK_M"] == 16  # the default at this size: the forced tile below is a real change
        return dict(cfg, BLOCK_M=rows)

    monkeypatch.setattr(CM, "assign_config", forced)
    big = run("triton", device, lengths)
    for a, b in zip(small, big):
        assert torch.equal(a, b)
    want = run("reference", "cpu", lengths)
    assert torch.equal(big[1], want[1]) and torch.equal(big[2], want[2])  # keep_idx, target_idx
    torch.testing.assert_close(big[0], want[0], rtol=1e-5, atol=1e-6)


def test_select_rows_round_to_the_nearest_power_of_two():
    # N * B / 132 positions per program, rounded: 21.8 -> 16 (LLaVA-NeXT), 29.1 -> 32 (Qwen2.5-VL)
    assert CM.assign_config(2880, 1, 128, 32, True)["BLOCK_M"] == 16
    assert CM.assign_config(3840, 1, 128, 32, True)["BLOCK_M"] == 32
    assert CM.assign_config(3840, 1, 128, 32, False)["BLOCK_M"] == 16  # keep_idx given: rounded down


@pytest.mark.parametrize("C, width, tiles", [(6, 16, 1), (16, 16, 1), (17, 32, 1), (33, 32, 2)])
def test_target_tiles_cover_every_target(C, width, tiles, device, poison):
    """16 targets or fewer take one 16-wide target tile, more take 32-wide ones: at each boundary every target
    must still receive its members (a target left out of the tiles would lose them, and the tokens differ)."""
    cfg = CM.assign_config(150, 2, 8, C, True)
    assert (cfg["BLOCK_C"], cfg["C_TILES"]) == (width, tiles)
    gen = torch.Generator().manual_seed(C)
    B, N, D, dk, k = 2, 150, 16, 8, 12
    scores, x, metric = torch.rand(B, N, generator=gen), torch.randn(B, N, D, generator=gen), torch.randn(
        B, N, dk, generator=gen)
    lengths = torch.tensor([150, 120])
    want = select_and_merge(scores, x, metric, k, C, lengths=lengths, backend="reference")
    got = [t.cpu() for t in select_and_merge(scores.to(device), x.to(device), metric.to(device), k, C,
                                             lengths=lengths, backend="triton")]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
