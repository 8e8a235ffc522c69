"""CUDA kernels of ``attention_scores`` and ``attention_with_scores`` against the reference.

Real shapes (CLIP-L/336 [CLS] row, LLaVA-1.5 / LLaVA-NeXT image spans, Qwen2.5-VL GQA 28/4 at 4k tokens) and
awkward ones (L = 1, odd lengths and head dims, left padding, GQA, batch rows with different spans), every
dtype, fresh random inputs, outputs poisoned before each call. The reference runs in float32 on the inputs
already rounded to the dtype, so only the kernels' own arithmetic shows in the error.
"""

from __future__ import annotations

import pytest
import torch
from cuda_common import SCORE_RTOL, poison_cuda_cache, rel_err, require_extension

import vtprune
from utils import left_padding_mask, random_spans
from vtprune.reference.attention_scores import attention_scores as reference
from vtprune.reference.attention_with_scores import attention_with_scores as reference_with

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def cuda_ops():
    require_extension()
    from vtprune.cuda.attention_scores import attention_scores
    from vtprune.cuda.attention_with_scores import attention_with_scores

    return attention_scores, attention_with_scores


def make_qkv(B, H, Hkv, L, d, dtype, gen, dv=None):
    """q [B, H, L, d], k [B, Hkv, L, d], v [B, Hkv, L, dv] on the GPU in ``dtype``."""
    q = torch.randn(B, H, L, d, generator=gen).to(dtype).cuda()
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype).cuda()
    v = torch.randn(B, Hkv, L, dv or d, generator=gen).to(dtype).cuda()
    return q, k, v


def check_scores(fn, q, k, qs, ks, causal, kpm=None, scale=None):
    expected = reference(q.float(), k.float(), query_spans=qs, key_spans=ks, causal=causal,
                         key_padding_mask=kpm, scale=scale)
    poison_cuda_cache()
    got = fn(q, k, query_spans=qs, key_spans=ks, causal=causal, key_padding_mask=kpm, scale=scale)
    torch.cuda.synchronize()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.isfinite(got).all(), "unwritten (poisoned) or NaN scores"
    err = rel_err(got, expected)
    assert err <= SCORE_RTOL[q.dtype], f"relative error {err:.2e} > {SCORE_RTOL[q.dtype]:.0e}"
    past = torch.arange(got.shape[1], device=got.device) >= ks[:, 1:].to(got.device)
    assert (got[past] == 0).all(), "entries past a row's key count must be zero"


# (B, H, Hkv, L, d, query span, key span, causal): the shapes of benchmarks/bench_visiondrop_ops.py.
REAL_SHAPES = {
    "clip_l336_cls_b1": (1, 16, 16, 577, 64, (0, 1), (1, 576), False),
    "clip_l336_cls_b8": (8, 16, 16, 577, 64, (0, 1), (1, 576), False),
    "llava15_image": (1, 32, 32, 650, 128, (37, 576), (37, 576), True),
    "llava_next_image": (1, 32, 32, 2950, 128, (35, 2880), (35, 2880), True),
    "qwen25vl_gqa_4k": (1, 28, 4, 4096, 128, (15, 3840), (15, 3840), True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REAL_SHAPES.values(), ids=REAL_SHAPES.keys())
def test_scores_real_shapes(cuda_ops, shape, dtype):
    B, H, Hkv, L, d, qspan, kspan, causal = shape
    gen = torch.Generator().manual_seed(L + H)
    q, k, _ = make_qkv(B, H, Hkv, L, d, dtype, gen)
    qs, ks = torch.tensor([qspan] * B), torch.tensor([kspan] * B)
    check_scores(cuda_ops[0], q, k, qs, ks, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize(
    "B, H, Hkv, L, d",
    [(1, 1, 1, 1, 64), (2, 4, 4, 7, 16), (3, 8, 2, 77, 80), (2, 6, 3, 129, 40), (2, 4, 1, 300, 256), (4, 2, 2, 65, 33)],
)
def test_scores_awkward(cuda_ops, B, H, Hkv, L, d, causal, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + d)
    q, k, _ = make_qkv(B, H, Hkv, L, d, dtype, gen)
    qs, ks = random_spans(B, L, gen), random_spans(B, L, gen)  # different spans per batch row
    check_scores(cuda_ops[0], q, k, qs, ks, causal)
    pads = torch.randint(0, L, (B,), generator=gen).tolist()
    check_scores(cuda_ops[0], q, k, qs, ks, causal, kpm=left_padding_mask(B, L, pads).cuda(), scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_single_query_rows(cuda_ops, dtype):
    # The Qm == 1 path: [CLS] and a last-token query (FastV), causal, with padding and GQA.
    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, L, d = 3, 8, 2, 301, 128
    q, k, _ = make_qkv(B, H, Hkv, L, d, dtype, gen)
    qs = torch.tensor([[0, 1], [300, 1], [150, 1]])
    ks = torch.tensor([[1, 300], [10, 200], [0, 301]])
    check_scores(cuda_ops[0], q, k, qs, ks, False)
    check_scores(cuda_ops[0], q, k, qs, ks, True, kpm=left_padding_mask(B, L, [0, 5, 160]).cuda())


def test_scores_side_stream_and_public_op(cuda_ops):
    gen = torch.Generator().manual_seed(9)
    q, k, _ = make_qkv(2, 8, 8, 650, 128, torch.bfloat16, gen)
    qs = ks = torch.tensor([[37, 576], [10, 600]])
    expected = reference(q.float(), k.float(), query_spans=qs, key_spans=ks, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = vtprune.ops.attention_scores(q, k, query_spans=qs, key_spans=ks, causal=True, backend="cuda")
    stream.synchronize()
    assert rel_err(got, expected) <= SCORE_RTOL[torch.bfloat16]


def torch_attention_error(q, k, v, causal, kpm, expected_out):
    """Relative error of PyTorch's own attention in q's dtype: the yardstick of the 2x rule."""
    group = q.shape[1] // k.shape[1]
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril()
    mask = mask[None, None] & (kpm[:, None, None, :] if kpm is not None else True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
    )
    rows_ok = mask.any(-1, keepdim=True)
    return rel_err(torch.where(rows_ok, out, 0), expected_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, H, Hkv, L, d, dv, qspan, kspan, causal, pad",
    [
        (1, 16, 16, 577, 64, 64, (0, 1), (1, 576), False, 0),  # CLIP-L/336 layer -2
        (2, 32, 32, 650, 128, 128, (37, 576), (37, 576), True, 20),  # LLaVA-1.5, FastV layer K
        (1, 28, 4, 1030, 128, 128, (649, 1), (15, 1000), True, 0),  # Qwen2.5-VL GQA, last-token query
        (3, 4, 2, 77, 40, 24, (3, 50), (0, 77), True, 9),  # odd length, dv != d
        (1, 2, 1, 1, 64, 64, (0, 1), (0, 1), True, 0),  # L = 1
    ],
)
def test_attention_with_scores(cuda_ops, B, H, Hkv, L, d, dv, qspan, kspan, causal, pad, dtype):
    gen = torch.Generator().manual_seed(L * 7 + d + dv)
    q, k, v = make_qkv(B, H, Hkv, L, d, dtype, gen, dv=dv)
    qs, ks = torch.tensor([qspan] * B), torch.tensor([kspan] * B)
    kpm = left_padding_mask(B, L, [pad * (b % 2) for b in range(B)]).cuda() if pad else None
    exp_out, exp_scores = reference_with(q.float(), k.float(), v.float(), query_spans=qs, key_spans=ks,
                                         causal=causal, key_padding_mask=kpm)
    poison_cuda_cache()
    out, scores = cuda_ops[1](q, k, v, query_spans=qs, key_spans=ks, causal=causal, key_padding_mask=kpm)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == exp_out.shape and torch.isfinite(out).all()
    assert rel_err(scores, exp_scores) <= SCORE_RTOL[dtype]
    # flash-attention's rule: at most 2x PyTorch's own error in the same precision (fp32: far under 1e-5).
    bound = 1e-5 if dtype == torch.float32 else 2 * torch_attention_error(q, k, v, causal, kpm, exp_out) + 1e-4
    assert rel_err(out, exp_out) <= bound
