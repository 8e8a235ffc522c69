"""ALVTS ops on a GPU at LLaVA-1.5 / LLaVA-NeXT shapes: Triton against the reference, bf16 on a 7B-sized layer.

Shapes: LLaVA-1.5 (L = 650, image span 576 after 35 tokens), LLaVA-NeXT (L = 2950, 2880), D = 4096,
32 heads, MLP 11008, R = 256, batch 2 with left padding and different spans; random weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cuda_common import llama_7b_layer

from utils import rel_err
from vtprune._compat import cache_kwargs
from vtprune.alvts import svd_factors
from vtprune.ops.lowrank_scores import lowrank_scores
from vtprune.ops.routed_layer import routed_attention_mask, routed_layer
from vtprune.reference import routed_layer as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]
pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

SHAPES = {"llava-1.5": (650, 35, 576), "llava-next": (2950, 35, 2880)}  # L, image start, image count


@pytest.fixture(scope="module")
def llama():
    from vtprune.triton_kernels._common import interpreting

    if interpreting():
        pytest.fail("TRITON_INTERPRET is set: the GPU tests must run the compiled Triton kernels")
    layer, rot, cfg = llama_7b_layer()
    return layer.to(torch.bfloat16), rot, cfg


def batch(L, start, count, device="cuda", dtype=torch.bfloat16):
    """Batch 2: row 1 left-padded by 17 with its image 17 later and 9 tokens shorter."""
    x = torch.randn(2, L, 4096, device=device, dtype=dtype)
    kpm = torch.arange(L, device=device)[None, :] >= torch.tensor([[0], [17]], device=device)
    spans = torch.tensor([[start, count], [start + 17, count - 9]])
    pos = (kpm.long().cumsum(1) - 1).clamp(min=0)
    return x, kpm, spans, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lowrank_scores_matches_reference(llama, shape, dtype):
    layer = llama[0]
    L, start, count = SHAPES[shape]
    x, kpm, spans, _ = batch(L, start, count, dtype=dtype)
    u, v = svd_factors(layer, 256, dtype=dtype)
    h = torch.nn.functional.rms_norm(x.float(), (4096,), eps=1e-6).to(dtype)  # the selector's input scale
    ref = lowrank_scores(h, u, v, visual_spans=spans, key_padding_mask=kpm, backend="reference")
    out = lowrank_scores(h, u, v, visual_spans=spans, key_padding_mask=kpm, backend="triton")
    assert rel_err(out, ref) < 1e-4
    assert torch.equal(out == 0, ref == 0)
    top = set(torch.topk(ref[0], 64).indices.tolist())
    assert len(top & set(torch.topk(out[0], 64).indices.tolist())) >= 60


@pytest.mark.parametrize("keep", [192, 64])
def test_routed_layer_bf16_within_twice_pytorchs_error(llama, keep):
    layer, rot, cfg = llama
    L, start, count = SHAPES["llava-1.5"]
    x, kpm, spans, pos = batch(L, start, count)
    pe = rot(x, pos)
    gen = torch.Generator().manual_seed(keep)
    rows = []
    for b in range(2):  # text (padding included) + keep random image tokens, the same K per row
        s, n = spans[b].tolist()
        picked = torch.randperm(n, generator=gen)[:keep] + s
        rows.append(torch.cat([torch.arange(s), torch.arange(s + n, L), picked]).sort().values)
    idx = torch.stack(rows).cuda()
    mask = routed_attention_mask(cfg, idx, kpm, dtype=torch.bfloat16)
    with torch.no_grad():
        truth = reference.routed_layer(copy.deepcopy(layer).float(), x.float(), idx,
                                       position_embeddings=tuple(t.float() for t in pe),
                                       attention_mask=routed_attention_mask(cfg, idx, kpm))
        ref = routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, backend="reference")
        out = routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, backend="triton")
    real_rows = kpm.clone()
    assert rel_err(out[real_rows], truth[real_rows]) <= 2 * rel_err(ref[real_rows], truth[real_rows]) + 1e-6
    skipped = torch.ones(2, L, dtype=torch.bool, device="cuda")
    skipped[torch.arange(2, device="cuda")[:, None], idx] = False
    assert torch.equal(out[skipped], x[skipped])


def test_keep_all_reference_is_exact_and_triton_close(llama):
    from transformers.masking_utils import create_causal_mask

    layer, rot, cfg = llama
    L, start, count = SHAPES["llava-1.5"]
    x, kpm, _, pos = batch(L, start, count)
    pe = rot(x, pos)
    idx = torch.arange(L, device="cuda").expand(2, L).contiguous()
    with torch.no_grad():
        full_mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=kpm, **cache_kwargs(None),
                                       position_ids=pos)
        expected = layer(x, attention_mask=full_mask, position_embeddings=pe)
        mask = routed_attention_mask(cfg, idx, kpm, dtype=torch.bfloat16)
        ref = routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, backend="reference")
        out = routed_layer(layer, x.clone(), idx, position_embeddings=pe, attention_mask=mask, backend="triton")
    assert torch.equal(ref, expected)
    assert rel_err(out[kpm], expected[kpm]) < 1e-2


def test_alvts_route_on_gpu_matches_the_reference_backend(llama):
    from transformers import LlamaConfig, LlamaModel

    from vtprune.methods.alvts import ALVTS

    layer, _, _ = llama
    lm = LlamaModel(LlamaConfig(hidden_size=4096, intermediate_size=16, num_attention_heads=32,
                                num_key_value_heads=32, num_hidden_layers=2, vocab_size=8, bos_token_id=None,
                                eos_token_id=None, pad_token_id=None))
    lm.layers[1].self_attn.load_state_dict(layer.self_attn.state_dict())
    lm = lm.cuda().to(torch.bfloat16)
    L, start, count = SHAPES["llava-1.5"]
    x, kpm, spans, _ = batch(L, start, count)
    h = lm.layers[1].input_layernorm(x)
    routes = {}
    for backend in ("triton", "reference"):
        a = ALVTS(keep=64, backend=backend)
        a.prepare(lm)
        routes[backend] = a.route(1, h, spans, kpm).idx
    assert routes["triton"].shape == routes["reference"].shape
    for b in range(2):
        same = set(routes["triton"][b].tolist()) & set(routes["reference"][b].tolist())
        assert len(same) >= routes["triton"].shape[1] - 4  # near-ties may swap a few image tokens
