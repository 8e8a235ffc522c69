"""Triton VisionDrop kernels on a GPU, at real-model shapes, against the reference.

The checks themselves are the CUDA kernels' (tests/gpu/test_cuda_*.py): they take the function under test as
an argument, so the same assertions, shapes and tolerances judge both backends. Shapes: CLIP-L/336 [CLS]
rows (577 tokens, 16 x 64, B 1 and 8), LLaVA-1.5 (650 tokens, 32 x 128, image span 576), LLaVA-NeXT
(2950 / 2880), Qwen2.5-VL GQA 28/4 at 4k tokens, select_and_merge at N = 2880, D = 4096 in bf16.
"""

from __future__ import annotations

import pytest
import torch
from cuda_common import SCORE_RTOL, poison_cuda_cache, rel_err
from test_cuda_attention_scores import REAL_SHAPES, check_scores, make_qkv, torch_attention_error
from test_cuda_contextual_merge import check_merge, random_keep, separated_metric
from test_cuda_topk_keep_order import check, k_values, make_scores, random_lengths

import vtprune
from utils import left_padding_mask
from vtprune.reference.attention_with_scores import attention_with_scores as reference_with
from vtprune.reference.select_and_merge import select_and_merge as reference_select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]
pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def tk():
    """The Triton backend functions (compiled kernels: TRITON_INTERPRET must be off on the GPU machine)."""
    from vtprune.triton_kernels._common import interpreting

    if interpreting():
        pytest.fail("TRITON_INTERPRET is set: the GPU tests must run the compiled Triton kernels")
    from vtprune.triton_kernels.attention_scores import attention_scores
    from vtprune.triton_kernels.attention_with_scores import attention_with_scores
    from vtprune.triton_kernels.contextual_merge import contextual_merge_launch
    from vtprune.triton_kernels.topk_keep_order import topk_keep_order

    return dict(scores=attention_scores, with_scores=attention_with_scores, merge=contextual_merge_launch,
                topk=topk_keep_order)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REAL_SHAPES.values(), ids=REAL_SHAPES.keys())
def test_scores_real_shapes(tk, shape, dtype):
    B, H, Hkv, L, d, qspan, kspan, causal = shape
    gen = torch.Generator().manual_seed(L + H)
    q, k, _ = make_qkv(B, H, Hkv, L, d, dtype, gen)
    check_scores(tk["scores"], q, k, torch.tensor([qspan] * B), torch.tensor([kspan] * B), causal)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_scores_padded_batches_with_different_spans(tk, dtype):
    """LLaVA-1.5 batch of 4 with left padding and per-row image spans; CLIP [CLS] rows under GQA 16/4."""
    gen = torch.Generator().manual_seed(650)
    q, k, _ = make_qkv(4, 32, 32, 650, 128, dtype, gen)
    spans = torch.tensor([[37, 576], [40, 576], [60, 576], [74, 576]])
    kpm = left_padding_mask(4, 650, [0, 3, 23, 37]).cuda()
    check_scores(tk["scores"], q, k, spans, spans, True, kpm=kpm)
    q, k, _ = make_qkv(8, 16, 4, 577, 64, dtype, gen)
    check_scores(tk["scores"], q, k, torch.tensor([[0, 1]] * 8), torch.tensor([[1, 576]] * 8), False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, H, Hkv, L, d, qspan, kspan, causal, pad",
    [
        (1, 16, 16, 577, 64, (0, 1), (1, 576), False, 0),  # CLIP-L/336 layer -2
        (8, 16, 16, 577, 64, (0, 1), (1, 576), False, 0),
        (2, 32, 32, 650, 128, (37, 576), (37, 576), True, 20),  # LLaVA-1.5, FastV layer K
        (1, 28, 4, 4096, 128, (15, 3840), (15, 3840), True, 0),  # Qwen2.5-VL GQA 28/4
    ],
)
def test_attention_with_scores(tk, B, H, Hkv, L, d, qspan, kspan, causal, pad, dtype):
    gen = torch.Generator().manual_seed(L * 7 + d + B)
    q, k, v = make_qkv(B, H, Hkv, L, d, dtype, gen)
    qs, ks = torch.tensor([qspan] * B), torch.tensor([kspan] * B)
    kpm = left_padding_mask(B, L, [pad * (b % 2) for b in range(B)]).cuda() if pad else None
    exp_out, exp_scores = reference_with(q.float(), k.float(), v.float(), query_spans=qs, key_spans=ks,
                                         causal=causal, key_padding_mask=kpm)
    poison_cuda_cache()
    out, scores = tk["with_scores"](q, k, v, query_spans=qs, key_spans=ks, causal=causal, key_padding_mask=kpm)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == exp_out.shape and torch.isfinite(out).all()
    assert rel_err(scores, exp_scores) <= SCORE_RTOL[dtype]
    bound = 1e-5 if dtype == torch.float32 else 2 * torch_attention_error(q, k, v, causal, kpm, exp_out) + 1e-4
    assert rel_err(out, exp_out) <= bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", (1, 7, 576, 577, 2880, 9000, 16384))
def test_topk_matches_reference(tk, N, dtype):
    """Exact indices; 9000 and 16384 take the tiled path (rows over 4096)."""
    gen = torch.Generator().manual_seed(N)
    for kind in ("randn", "ties", "special"):
        scores = make_scores(kind, 8, N, dtype, gen)
        for k in k_values(N, gen):
            check(tk["topk"], scores, k)
            check(tk["topk"], scores, k, random_lengths(8, N, k, gen))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, N, D, dk, k, C, ragged",
    [
        (1, 576, 1024, 64, 47, 6, False),  # CLIP-L/336 encoder stage
        (4, 576, 4096, 128, 30, 5, True),  # LLaVA-1.5 LLM stage
        (1, 2880, 4096, 128, 256, 64, False),  # LLaVA-NeXT budget 320
        (3, 300, 100, 300, 0, 17, True),  # nothing kept, dk over one 64-wide chunk
        (2, 33, 24, 8, 1, 32, False),  # every non-kept token a target
    ],
)
def test_merge(tk, B, N, D, dk, k, C, ragged, dtype):
    gen = torch.Generator().manual_seed(N * 31 + D + dk + k + C)
    lengths = torch.randint(k + C, N + 1, (B,), generator=gen) if ragged else torch.full((B,), N)
    lengths[0] = N
    keep = random_keep(B, lengths, k, gen)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = separated_metric(x.shape, dk, keep, C, lengths, gen).to(dtype)
    check_merge(tk["merge"], x, metric, keep, C, lengths if ragged else None)


def test_select_and_merge_llava_next_bf16():
    gen = torch.Generator().manual_seed(2880)
    B, N, D, dk, k, C = 2, 2880, 4096, 128, 288, 32
    scores = torch.rand(B, N, generator=gen)
    x = torch.randn(B, N, D, generator=gen).to(torch.bfloat16)
    keep = reference_select(scores, x, x[..., :dk], k, C)[1]
    metric = separated_metric(x.shape, dk, keep, C, None, gen).to(torch.bfloat16)
    expected = reference_select(scores, x, metric, k, C)
    poison_cuda_cache()
    got = vtprune.ops.select_and_merge(scores.cuda(), x.cuda(), metric.cuda(), k, C, backend="triton")
    torch.testing.assert_close(got[1].cpu(), expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2].cpu(), expected[2], rtol=0, atol=0)
    torch.testing.assert_close(got[0].cpu(), expected[0])


def test_torch_compile_inductor_on_cuda():
    """The custom ops inside an inductor-compiled CUDA graph (fullgraph) give the eager results."""
    vt = torch.ops.vtprune
    import vtprune._library  # noqa: F401

    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 32, 32, 650, 128, torch.bfloat16, gen)
    spans = torch.tensor([[37, 576], [37, 576]])
    x = torch.randn(2, 576, 4096, generator=gen).to(torch.bfloat16).cuda()

    def stage(q, k, v, x):
        out, s = vt.attention_with_scores(q, k, v, spans, spans, True, None, None, 576, 576)
        tokens, keep, targets = vt.select_and_merge(s, x, k.mean(1)[:, 37:613], 30, 5, None)
        return out * 2, tokens, keep, targets

    eager = stage(q, k, v, x)
    compiled = torch.compile(stage, fullgraph=True)(q, k, v, x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
