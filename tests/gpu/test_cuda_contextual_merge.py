"""CUDA kernels of ``contextual_merge`` and ``select_and_merge`` against the reference.

Target positions and keep indices must match exactly; dominant rows are copies (exact); contextual rows are
fp32 sums cast to x's dtype (torch's default tolerance of that dtype). Member metrics are drawn near a random
target, so every cosine argmax has a clear winner and the kernels' different rounding cannot flip it; exact
ties (identical metric rows) are tested on their own.
"""

from __future__ import annotations

import pytest
import torch
from cuda_common import poison_cuda_cache, require_extension

import vtprune
from vtprune.reference.contextual_merge import merge_with_targets as reference_merge
from vtprune.reference.select_and_merge import select_and_merge as reference_select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def cuda_merge():
    require_extension()
    from vtprune.cuda.contextual_merge import merge_with_targets
    from vtprune.cuda.select_and_merge import select_and_merge

    return merge_with_targets, select_and_merge


def random_keep(B, lengths, k, gen):
    """int64 [B, k] ascending positions inside each row's length."""
    return torch.stack([torch.randperm(int(n), generator=gen)[:k].sort().values for n in lengths])


def separated_metric(x_shape, dk, keep, C, lengths, gen):
    """metric [B, N, dk]: every member row = a random target's row + small noise (clear argmax)."""
    B, N, _ = x_shape
    metric = torch.randn(B, N, dk, generator=gen)
    if C == 0:
        return metric
    probe = torch.zeros(B, N, 1)
    _, targets = reference_merge(probe, metric, keep, C, lengths)  # target positions depend on keep only
    pick = torch.randint(0, C, (B, N), generator=gen)
    near = metric.gather(1, targets.gather(1, pick)[:, :, None].expand(-1, -1, dk))
    member = torch.ones(B, N, dtype=torch.bool).scatter(1, keep, False).scatter(1, targets, False)
    return torch.where(member[:, :, None], near + 0.05 * torch.randn(B, N, dk, generator=gen), metric)


def check_merge(fn, x, metric, keep, C, lengths=None):
    exp_tokens, exp_targets = reference_merge(x.cpu(), metric.cpu(), keep, C, lengths)
    poison_cuda_cache()
    tokens, targets = fn(x.cuda(), metric.cuda(), keep.cuda(), C, None if lengths is None else lengths.cuda())
    torch.cuda.synchronize()
    k = keep.shape[1]
    assert tokens.dtype == x.dtype and tokens.shape == exp_tokens.shape
    torch.testing.assert_close(targets.cpu(), exp_targets, rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, :k].cpu(), exp_tokens[:, :k], rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, k:].cpu(), exp_tokens[:, k:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, N, D, dk, k, C, ragged",
    [
        (1, 576, 1024, 64, 47, 6, False),  # CLIP-L/336 encoder stage (keys averaged over heads)
        (4, 576, 4096, 128, 30, 5, True),  # LLaVA-1.5 LLM stage
        (1, 2880, 4096, 128, 256, 64, False),  # LLaVA-NeXT budget 320
        (2, 7, 12, 5, 2, 3, True),  # tiny rows, odd D and dk
        (3, 300, 100, 300, 0, 17, True),  # nothing kept, dk > 256 (register cache + L1 tail)
        (2, 50, 8, 16, 10, 0, False),  # no contextual tokens
        (2, 33, 24, 8, 1, 32, False),  # every rest token a target (step = 1)
    ],
)
def test_merge(cuda_merge, B, N, D, dk, k, C, ragged, dtype):
    gen = torch.Generator().manual_seed(N * 31 + D + dk + k + C)
    lengths = torch.randint(k + C, N + 1, (B,), generator=gen) if ragged else torch.full((B,), N)
    lengths[0] = N
    keep = random_keep(B, lengths, k, gen)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = separated_metric(x.shape, dk, keep, C, lengths, gen).to(dtype)
    check_merge(cuda_merge[0], x, metric, keep, C, lengths if ragged else None)


def test_merge_ties_and_unaligned(cuda_merge):
    # Identical metric rows: every cosine ties, so every member joins the first target. x is contiguous but
    # starts 2 bytes into its storage and D is odd: the scalar (not 16-byte) path.
    gen = torch.Generator().manual_seed(4)
    B, N, D = 2, 200, 4097
    x = torch.randn(B * N * D + 1, generator=gen).to(torch.bfloat16).cuda()[1:].view(B, N, D)  # ptr % 16 == 2
    metric = torch.randn(1, 1, 32, generator=gen).expand(B, N, 32).contiguous()
    keep = random_keep(B, [N, N], 20, gen)
    check_merge(cuda_merge[0], x, metric, keep, 9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_and_merge_llava_next(cuda_merge, dtype):
    gen = torch.Generator().manual_seed(2880)
    B, N, D, dk, k, C = 1, 2880, 4096, 128, 288, 32
    scores = torch.rand(B, N, generator=gen)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    keep = reference_select(scores, x, x[..., :dk], k, C)[1]
    metric = separated_metric(x.shape, dk, keep, C, None, gen).to(dtype)
    exp_tokens, exp_keep, exp_targets = reference_select(scores, x, metric, k, C)
    poison_cuda_cache()
    tokens, keep_idx, targets = cuda_merge[1](scores.cuda(), x.cuda(), metric.cuda(), k, C)
    torch.cuda.synchronize()
    torch.testing.assert_close(keep_idx.cpu(), exp_keep, rtol=0, atol=0)
    torch.testing.assert_close(targets.cpu(), exp_targets, rtol=0, atol=0)
    torch.testing.assert_close(tokens.cpu(), exp_tokens)


def test_select_and_merge_public_op_ragged(cuda_merge):
    gen = torch.Generator().manual_seed(8)
    B, N, D, dk = 3, 650, 256, 64
    lengths = torch.tensor([650, 400, 101])
    scores = torch.randn(B, N, generator=gen).half()
    x = torch.randn(B, N, D, generator=gen).half()
    keep = reference_select(scores, x, x[..., :dk], 60, 40, lengths=lengths)[1]
    metric = separated_metric(x.shape, dk, keep, 40, lengths, gen).half()
    expected = reference_select(scores, x, metric, 60, 40, lengths=lengths)
    got = vtprune.ops.select_and_merge(scores.cuda(), x.cuda(), metric.cuda(), 60, 40, lengths=lengths,
                                       backend="cuda")
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e)
