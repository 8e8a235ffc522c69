"""CUDA kernel of ``topk_keep_order`` against the reference: exact equality of the indices.

Shapes from real models (576/577 CLIP-L/336 tokens, 2880 LLaVA-NeXT, 16384 long rows), every dtype, tied
scores, NaN/±inf/±0, per-row lengths. Needs a GPU and the built extension (VTPRUNE_BUILD_CUDA=1 pip install -e .).
"""

from __future__ import annotations

import pytest
import torch
from cuda_common import require_extension

import vtprune
from vtprune.reference.topk_keep_order import topk_keep_order as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

BATCHES = (1, 3, 8)
LENGTHS = (1, 7, 576, 577, 2880, 16384)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("randn", "ties", "special")
SPECIALS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0)


@pytest.fixture(scope="module")
def cuda_topk():
    require_extension()
    from vtprune.cuda.topk_keep_order import topk_keep_order

    return topk_keep_order


def make_scores(kind: str, B: int, N: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[B, N] scores on the CPU in ``dtype``."""
    if kind == "ties":  # few distinct integer values: long runs of equal scores
        s = torch.randint(-4, 4, (B, N), generator=gen).float()
    else:
        s = torch.randn(B, N, generator=gen)
    if kind == "special":  # about a quarter NaN / +inf / -inf / +0.0 / -0.0
        hit = torch.rand(B, N, generator=gen) < 0.25
        pick = torch.randint(0, len(SPECIALS), (B, N), generator=gen)
        s = torch.where(hit, torch.tensor(SPECIALS)[pick], s)
    return s.to(dtype)


def k_values(N: int, gen: torch.Generator) -> list[int]:
    ks = {1, 2, N // 3, N // 2, N - 1, N, int(torch.randint(1, N + 1, (1,), generator=gen))}
    return sorted(k for k in ks if 1 <= k <= N)


def random_lengths(B: int, N: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [B] in [k, N], with the extremes k and N when there are rows for them."""
    lengths = torch.randint(k, N + 1, (B,), generator=gen)
    lengths[0] = k
    if B > 1:
        lengths[-1] = N
    return lengths


def check(cuda_topk, scores, k, lengths=None):
    expected = reference(scores, k, lengths=lengths)
    got = cuda_topk(scores.cuda(), k, lengths=None if lengths is None else lengths.cuda())
    assert got.dtype == torch.int64 and got.device.type == "cuda" and got.shape == expected.shape
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("B", BATCHES)
def test_matches_reference(cuda_topk, B, N, dtype, kind):
    gen = torch.Generator().manual_seed(1000 * B + N)
    scores = make_scores(kind, B, N, dtype, gen)
    for k in k_values(N, gen):
        check(cuda_topk, scores, k)
        check(cuda_topk, scores, k, random_lengths(B, N, k, gen))


@pytest.mark.parametrize("N", (255, 256, 257, 1023, 1024, 1025, 65536))
def test_block_edges_and_long_rows(cuda_topk, N):
    # Rows that end just before/after a thread-block chunk, and the longest supported use (64K).
    gen = torch.Generator().manual_seed(N)
    for kind in KINDS:
        scores = make_scores(kind, 4, N, torch.float32, gen)
        for k in (1, N // 7 or 1, N - 3 if N > 3 else N, N):
            check(cuda_topk, scores, k)
            check(cuda_topk, scores, k, random_lengths(4, N, k, gen))


def test_constant_and_nan_rows(cuda_topk):
    N = 3000
    scores = torch.stack(
        [
            torch.zeros(N),
            torch.full((N,), float("nan")),
            torch.full((N,), float("-inf")),
            torch.where(torch.arange(N) % 2 == 0, float("nan"), float("-inf")),
            torch.where(torch.arange(N) % 3 == 0, -0.0, 0.0),
        ]
    )
    for k in (1, 2, 1499, 1500, 1501, N - 1, N):
        check(cuda_topk, scores, k)


def test_lengths_on_cpu_and_side_stream(cuda_topk):
    gen = torch.Generator().manual_seed(7)
    scores = make_scores("ties", 3, 577, torch.float16, gen)
    lengths = torch.tensor([10, 577, 300])
    expected = reference(scores, 10, lengths=lengths)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = cuda_topk(scores.cuda(), 10, lengths=lengths)  # lengths stays on the CPU
    stream.synchronize()
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


def test_non_contiguous_input(cuda_topk):
    gen = torch.Generator().manual_seed(3)
    scores = make_scores("randn", 2880, 4, torch.bfloat16, gen).t()  # [4, 2880], stride (1, 4)
    for k in (1, 320, 2880):
        expected = reference(scores, k)
        got = cuda_topk(scores.cuda(), k)
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


def test_public_op_backend_cuda(cuda_topk):
    gen = torch.Generator().manual_seed(11)
    scores = make_scores("special", 2, 576, torch.float32, gen)
    lengths = torch.tensor([576, 200])
    got = vtprune.ops.topk_keep_order(scores.cuda(), 64, lengths=lengths.cuda(), backend="cuda")
    torch.testing.assert_close(got.cpu(), reference(scores, 64, lengths=lengths), rtol=0, atol=0)


def test_empty_batch(cuda_topk):
    out = cuda_topk(torch.empty(0, 16, device="cuda"), 4)
    assert out.shape == (0, 4) and out.dtype == torch.int64
