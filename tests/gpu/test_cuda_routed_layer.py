"""CUDA ``routed_layer`` (gather + RMSNorm, residual + RMSNorm, residual + scatter) against the reference.

Shapes: LLaVA-1.5 (L = 650, image span 576 after 35 tokens), D = 4096, 32 heads, MLP 11008; batch 2 with row 1
left-padded by 17 and its image 9 tokens shorter; every text token plus 64 / 128 / 192 image tokens routed.
Row kernels are checked against the layer's own HF modules (only the variance's float32 summation order
differs); the whole layer against the reference backend (fp32) or by flash-attention's 2x rule against an
fp32 run (fp16 / bf16). Outputs are poisoned (0xFF) before every kernel; skipped rows must be bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cuda_common import llama_7b_layer, poison_cuda_cache, rel_err, require_extension

from vtprune.ops.routed_layer import routed_attention_mask, routed_layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
L, START, COUNT, D, PAD = 650, 35, 576, 4096, 17
KEEP = (64, 128, 192)
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# Row outputs: fp32 within a few ulps; fp16/bf16 within 2 ulps (a flipped rounding of the normalised value,
# then the product with the weight rounded again).
ROW_RTOL = {torch.float32: 4 * ULP[torch.float32], torch.float16: 2 * ULP[torch.float16],
            torch.bfloat16: 2 * ULP[torch.bfloat16]}


@pytest.fixture(scope="module")
def kernels():
    require_extension()
    from vtprune.cuda import routed_layer as cuda_routed

    return cuda_routed


@pytest.fixture(scope="module")
def llama():
    """(fp32 LLaMA-7B-shaped decoder layer on the GPU, its rotary embedding, config), random weights."""
    return llama_7b_layer()


def llava_batch(keep: int, dtype, seed: int = 0):
    """x [2, L, D], key padding mask [2, L], positions [2, L], routed idx int64 [2, K] (text + keep images)."""
    gen = torch.Generator().manual_seed(seed * 1000 + keep)
    x = torch.randn(2, L, D, generator=gen).to(dtype).cuda()
    kpm = (torch.arange(L)[None, :] >= torch.tensor([[0], [PAD]])).cuda()
    pos = (kpm.long().cumsum(1) - 1).clamp(min=0)
    rows = []
    for start, count, k in ((START, COUNT, keep), (START + PAD, COUNT - 9, keep - 9)):  # the same K per row
        picked = torch.randperm(count, generator=gen)[:k] + start
        rows.append(torch.cat([torch.arange(start), torch.arange(start + count, L), picked]).sort().values)
    return x, kpm, pos, torch.stack(rows).cuda()


def skipped_rows(idx: torch.Tensor, length: int) -> torch.Tensor:
    skipped = torch.ones(idx.shape[0], length, dtype=torch.bool, device=idx.device)
    skipped[torch.arange(idx.shape[0], device=idx.device)[:, None], idx] = False
    return skipped


def assert_rounds_like(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal but for the float32 variance's summation order: within an ulp, and (16-bit) bit-identical but
    for a rare element whose rounding it flips."""
    assert torch.isfinite(ours).all()
    assert ours.dtype == torch.float32 or (ours != theirs).float().mean() < 0.01
    torch.testing.assert_close(ours, theirs, rtol=ROW_RTOL[ours.dtype], atol=0)


def check_row_kernels(kernels, x, idx, norm1, norm2, gen):
    """The three row kernels against the modules they replace, with skipped rows untouched."""
    B, K = idx.shape
    rows = torch.arange(B, device=x.device)[:, None], idx
    xr = x[rows]  # [B, K, D]
    delta = torch.randn(B, K, x.shape[-1], generator=gen).to(x.dtype).cuda()
    mlp = torch.randn(B, K, x.shape[-1], generator=gen).to(x.dtype).cuda()
    with torch.no_grad():
        poison_cuda_cache()
        n1 = kernels.gather_rmsnorm(x, idx, norm1.weight, norm1.variance_epsilon)
        assert_rounds_like(n1, norm1(xr))
        mid = delta.clone()
        poison_cuda_cache()
        n2 = kernels.gather_add_rmsnorm(x, idx, mid, norm2.weight, norm2.variance_epsilon)
        assert torch.equal(mid, xr + delta)  # one rounding of the float32 sum, exactly as torch's add
        assert_rounds_like(n2, norm2(xr + delta))
        y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)  # x's strides
        kernels.add_scatter(y, idx, mid, mlp)
    assert torch.equal(y[rows], mid + mlp)
    skipped = skipped_rows(idx, x.shape[1])
    assert torch.equal(y[skipped], x[skipped])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep", KEEP)
def test_row_kernels_round_like_the_hf_modules(kernels, llama, keep, dtype):
    layer = copy.deepcopy(llama[0]).to(dtype)
    x, _, _, idx = llava_batch(keep, dtype)
    check_row_kernels(kernels, x, idx, layer.input_layernorm, layer.post_attention_layernorm,
                      torch.Generator().manual_seed(keep))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_kernels_scalar_path_and_strided_x(kernels, dtype):
    """D not a multiple of 16 bytes and x 2 bytes off alignment (scalar path); x a slice of a longer buffer
    (batch stride != L * D, 16-byte path); an out-of-range index reads zeros and writes nothing."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(7)
    norms = []
    for dim in (4100, 4096):
        norm = LlamaRMSNorm(dim, eps=1e-5).cuda()
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen).cuda())
        norms.append(norm.to(dtype))
    idx = torch.tensor([[0, 3, 9, 40], [1, 2, 30, 49]]).cuda()
    flat = torch.randn(2 * 50 * 4100 + 1, generator=gen).to(dtype).cuda()
    unaligned = flat[1:].view(2, 50, 4100)  # data_ptr % 16 == 2 (fp16/bf16) or 4 (fp32)
    check_row_kernels(kernels, unaligned, idx, norms[0], norms[0], gen)
    strided = torch.randn(2, 64, 4096, generator=gen).to(dtype).cuda()[:, 5:55]  # [2, 50, 4096], stride 64 * D
    check_row_kernels(kernels, strided, idx, norms[1], norms[1], gen)

    bad = torch.tensor([[0, 3, 9, 50], [-1, 2, 30, 49]]).cuda()  # out of [0, L): never written
    y = strided.clone()
    ones = torch.ones(2, 4, 4096, dtype=dtype, device="cuda")
    kernels.add_scatter(y, bad, ones, ones)
    expected = strided.clone()
    expected[0, [0, 3, 9]] = 2
    expected[1, [2, 30, 49]] = 2
    assert torch.equal(y, expected)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep", KEEP)
def test_routed_layer_matches_reference(kernels, llama, keep, dtype):
    layer32, rot, cfg = llama
    layer = copy.deepcopy(layer32).to(dtype)
    x, kpm, pos, idx = llava_batch(keep, dtype, seed=1)
    pe = rot(x, pos)
    mask = routed_attention_mask(cfg, idx, kpm, dtype=dtype)
    ref = routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, backend="reference")
    poison_cuda_cache()
    out = x.clone()
    # A CPU index exercises the glue's pinned, non-blocking copy; the public op checks its values.
    assert routed_layer(layer, out, idx.cpu(), position_embeddings=pe, attention_mask=mask, backend="cuda") is out
    torch.cuda.synchronize()
    skipped = skipped_rows(idx, L)
    assert torch.equal(out[skipped], x[skipped])
    routed = ~skipped & kpm  # padding rows are routed but meaningless
    if dtype == torch.float32:
        assert rel_err(out[routed], ref[routed]) < 1e-5
        return
    truth = routed_layer(layer32, x.float(), idx, position_embeddings=tuple(t.float() for t in pe),
                         attention_mask=routed_attention_mask(cfg, idx, kpm), backend="reference")
    assert rel_err(out[routed], truth[routed]) <= 2 * rel_err(ref[routed], truth[routed]) + 1e-6
    assert rel_err(out[routed], ref[routed]) < ULP[dtype]  # the rare flipped roundings, propagated


@torch.no_grad()
def test_kv_cache_holds_the_routed_tokens(kernels, llama):
    from transformers import DynamicCache

    layer32, rot, cfg = llama
    layer = copy.deepcopy(layer32).to(torch.bfloat16)
    x, kpm, pos, idx = llava_batch(64, torch.bfloat16, seed=2)
    pe = rot(x, pos)
    caches = {}
    for backend in ("reference", "cuda"):
        cache = DynamicCache(config=cfg)
        mask = routed_attention_mask(cfg, idx, kpm, cache, layer_idx=1, dtype=torch.bfloat16)
        routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, past_key_values=cache,
                     use_cache=True, backend=backend)
        assert cache.get_seq_length(1) == idx.shape[1]
        caches[backend] = cache.layers[1]
    torch.testing.assert_close(caches["cuda"].keys, caches["reference"].keys)
    torch.testing.assert_close(caches["cuda"].values, caches["reference"].values)
