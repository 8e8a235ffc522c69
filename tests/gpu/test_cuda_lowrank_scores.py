"""CUDA kernels of ``lowrank_scores`` (ALVTS selector) against the reference: real ranks (R = 256 for 7B
LLaVA, 128 for Qwen2.5-VL-3B), LLaVA-1.5 and LLaVA-NeXT lengths, padding, rows without text (S_T2V = 1),
odd ranks, every dtype. Projections and scores are fp32 on both sides, so the bound is fp32's."""

from __future__ import annotations

import pytest
import torch
from cuda_common import poison_cuda_cache, rel_err, require_extension

import vtprune
from utils import left_padding_mask
from vtprune.reference.lowrank_scores import lowrank_scores as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]


@pytest.fixture(scope="module")
def cuda_lowrank():
    require_extension()
    from vtprune.cuda.lowrank_scores import lowrank_scores

    return lowrank_scores


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize(
    "B, L, D, R, spans, pads",
    [
        (1, 650, 4096, 256, [(35, 576)], None),  # LLaVA-1.5 7B
        (2, 2950, 4096, 256, [(35, 2880), (20, 2900)], None),  # LLaVA-NeXT
        (2, 1100, 2048, 128, [(15, 1024), (40, 1024)], [0, 40]),  # Qwen2.5-VL-3B, left padding
        (3, 61, 48, 24, [(0, 61), (5, 50), (0, 20)], [0, 3, 0]),  # a row of only visual tokens; odd rank
        (1, 1, 16, 8, [(0, 1)], None),  # L = 1
    ],
)
def test_matches_reference(cuda_lowrank, B, L, D, R, spans, pads, dtype):
    gen = torch.Generator().manual_seed(L + R)
    h = torch.randn(B, L, D, generator=gen).to(dtype)
    u = (torch.randn(D, R, generator=gen) * D**-0.5).to(dtype)
    v = (torch.randn(D, R, generator=gen) * D**-0.5).to(dtype)
    vs = torch.tensor(spans)
    kpm = None if pads is None else left_padding_mask(B, L, pads)
    expected = reference(h.float(), u.float(), v.float(), visual_spans=vs, key_padding_mask=kpm)
    poison_cuda_cache()
    got = cuda_lowrank(h.cuda(), u.cuda(), v.cuda(), visual_spans=vs,
                       key_padding_mask=None if kpm is None else kpm.cuda())
    torch.cuda.synchronize()
    assert got.shape == expected.shape and got.dtype == torch.float32 and torch.isfinite(got).all()
    # TF32 must stay off for the fp32 projections to match: torch's default for matmul is full fp32.
    assert rel_err(got, expected) <= 1e-4


def test_public_op(cuda_lowrank):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 300, 256, generator=gen).cuda()
    u, v = torch.randn(256, 64, generator=gen).cuda() / 16, torch.randn(256, 64, generator=gen).cuda() / 16
    vs = torch.tensor([[10, 200], [0, 250]])
    got = vtprune.ops.lowrank_scores(h, u, v, visual_spans=vs, backend="cuda")
    assert rel_err(got, reference(h, u, v, visual_spans=vs)) <= 1e-4


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("M, D, R", [(650, 4096, 256), (77, 200, 24), (1, 8, 8), (130, 136, 72)])
def test_tensor_core_projection(cuda_lowrank, M, D, R, dtype):
    """lowrank_project (16-bit products, fp32 sums) against fp32 matmuls of the same 16-bit values: only the
    order of the fp32 sums differs. Ragged row / D / column tiles included."""
    from vtprune._ext import load_extension
    from vtprune.cuda.lowrank_scores import project

    gen = torch.Generator().manual_seed(M + D + R)
    h = torch.randn(1, M, D, generator=gen).to(dtype).cuda()
    u = (torch.randn(D, R, generator=gen) * D**-0.5).to(dtype).cuda()
    v = (torch.randn(D, R, generator=gen) * D**-0.5).to(dtype).cuda()
    poison_cuda_cache()
    a, b = project(load_extension(), h, u, v)
    torch.cuda.synchronize()
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (1, M, R)
    assert rel_err(a, h.float() @ u.float()) <= 1e-5
    assert rel_err(b, h.float() @ v.float()) <= 1e-5
