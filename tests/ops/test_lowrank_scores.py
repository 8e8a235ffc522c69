"""``lowrank_scores`` (the ALVTS selector) on every backend against the float64 truth of
docs/ops.md#lowrank_scores (tests/ops/truths.py): dtypes, padding, spans, odd L, several tiles."""

import pytest
import torch
from truths import lowrank_scores as truth

from utils import DTYPES, left_padding_mask
from vtprune.ops import lowrank_scores


def run(h, u, v, spans, kpm, backend, device):
    kpm = None if kpm is None else kpm.to(device)
    return lowrank_scores(
        h.to(device), u.to(device), v.to(device), visual_spans=spans, key_padding_mask=kpm, backend=backend
    ).cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,L,D,R,spans,pads",
    [
        (1, 9, 16, 4, [[2, 5]], None),
        (2, 17, 12, 3, [[4, 10], [3, 6]], [3, 0]),
        (2, 6, 8, 8, [[0, 6], [1, 4]], None),  # row 0 has no text: S_T2V = 1
    ],
)
def test_matches_float64(B, L, D, R, spans, pads, dtype, backend, device, poison):
    gen = torch.Generator().manual_seed(L)
    h = torch.randn(B, L, D, generator=gen).to(dtype)
    u, v = (torch.randn(D, R, generator=gen) * 0.5).to(dtype), (torch.randn(D, R, generator=gen) * 0.5).to(dtype)
    spans = torch.tensor(spans)
    kpm = None if pads is None else left_padding_mask(B, L, pads)
    got = run(h, u, v, spans, kpm, backend, device)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), truth(h, u, v, spans, kpm), atol=1e-6, rtol=1e-4)


TILE_CASES = {
    # name: (B, L, D, R, spans, left pads)
    "padded_batch_odd_L": (2, 37, 48, 8, [[3, 20], [10, 27]], [0, 4]),
    "tiny_rank_padded_to_16": (2, 21, 32, 4, [[2, 9], [5, 11]], [2, 0]),
    "two_tiles_two_r_chunks": (2, 131, 32, 72, [[5, 100], [40, 91]], [0, 35]),
    "no_text_row": (2, 19, 16, 16, [[0, 19], [1, 17]], [0, 0]),
    "image_at_the_end": (1, 23, 16, 16, [[7, 16]], [0]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_tiles_and_spans_match_float64(case, dtype, backend, device, poison):
    """Shapes that cross the Triton kernels' tiles (64 rows / columns, 16-32 wide rank chunks)."""
    B, L, D, R, spans, pads = TILE_CASES[case]
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(B, L, D, generator=gen).to(dtype)
    u = (torch.randn(D, R, generator=gen) / D**0.25).to(dtype)
    v = (torch.randn(D, R, generator=gen) / D**0.25).to(dtype)
    spans = torch.tensor(spans)
    kpm = left_padding_mask(B, L, pads) if any(pads) else None
    got = run(h, u, v, spans, kpm, backend, device)
    want = truth(h, u, v, spans, kpm)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=2e-5)
    assert torch.equal(got == 0, want == 0)  # zeros past each row's count, nowhere else


def test_strided_input_and_no_text_rule(backend, device):
    """A non-contiguous h (a slice) works, and a row that is all image tokens gets S_T2V = 1: S = S_V2V."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(1, 12, 40, generator=gen).to(device)
    h = big[:, :, 4:36]  # [1, 12, 32], row stride 40
    u, v = torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 16, generator=gen).to(device)
    out = lowrank_scores(h, u, v, visual_spans=torch.tensor([[0, 12]]), backend=backend).cpu()
    a, b = h.cpu() @ u.cpu(), h.cpu() @ v.cpu()
    logits = (a @ b.transpose(1, 2) / 4).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(logits, -1).mean(1)  # mean over the 12 visual query rows
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
