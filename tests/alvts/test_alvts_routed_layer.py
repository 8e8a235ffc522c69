"""routed_layer (reference backend) and routed_attention_mask: exactness, skipped rows, KV cache, errors."""

import pytest
import torch
from alvts_models import FAMILIES, left_padded_positions, rope, tiny_layer
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from utils import triton_installed
from vtprune._compat import cache_kwargs
from vtprune.ops.routed_layer import routed_attention_mask, routed_key_padding_mask, routed_layer

B, L = 2, 13
PADS = [0, 3]
IDX = torch.tensor([[0, 2, 3, 4, 7, 9, 12], [1, 3, 5, 8, 10, 11, 12]])  # row 1 routes one padding token


def inputs(rot, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 64, generator=gen).to(dtype)
    kpm = torch.arange(L)[None, :] >= torch.tensor(PADS)[:, None]
    pos = left_padded_positions(kpm)
    return x, kpm, pos, rope(rot, x, pos)


def compact_call(layer, cfg, x, kpm, pe, idx, cache=None):
    """The plain layer on the compacted sequence x[idx] with the same positions (plain indexing)."""
    rows = torch.arange(B)[:, None]
    xc, kc = x[rows, idx], kpm[rows, idx]
    pec = tuple(t[rows, idx] for t in pe)
    mask = create_causal_mask(config=cfg, inputs_embeds=xc, attention_mask=kc, **cache_kwargs(cache),
                              layer_idx=layer.self_attn.layer_idx)
    return layer(xc, attention_mask=mask, position_embeddings=pec, **cache_kwargs(cache), use_cache=cache is not None)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_unpatched_layer_exactly(family, attn):
    layer, rot, cfg = tiny_layer(family, attn)
    x, kpm, pos, pe = inputs(rot)
    full_mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=kpm, **cache_kwargs(None),
                                   position_ids=pos)
    expected = layer(x, attention_mask=full_mask, position_embeddings=pe, position_ids=pos)
    idx = torch.arange(L).expand(B, L).contiguous()
    out = routed_layer(layer, x.clone(), idx, position_embeddings=pe, position_ids=pos,
                       attention_mask=routed_attention_mask(cfg, idx, kpm), backend="reference")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_rows_are_the_compacted_layer_and_skipped_rows_untouched(family):
    layer, rot, cfg = tiny_layer(family)
    x, kpm, _, pe = inputs(rot)
    out = routed_layer(layer, x.clone(), IDX, position_embeddings=pe,
                       attention_mask=routed_attention_mask(cfg, IDX, kpm), backend="reference")
    rows = torch.arange(B)[:, None]
    assert torch.equal(out[rows, IDX], compact_call(layer, cfg, x, kpm, pe, IDX))
    skipped = torch.ones(B, L, dtype=torch.bool)
    skipped[rows, IDX] = False
    assert torch.equal(out[skipped], x[skipped])  # bit for bit
    assert not torch.equal(out[rows, IDX], x[rows, IDX])


def test_writes_in_place_and_broadcast_positions():
    layer, rot, cfg = tiny_layer("llama")
    x, _, _, _ = inputs(rot)
    pe = rot(x, torch.arange(L)[None])  # [1, L, d]: positions shared by the batch
    y = x.clone()
    out = routed_layer(layer, y, IDX, position_embeddings=pe)
    assert out is y
    pe_b = tuple(t.expand(B, L, t.shape[-1]) for t in pe)
    assert torch.equal(out, routed_layer(layer, x.clone(), IDX, position_embeddings=pe_b))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_position_ids_are_not_forwarded(backend):
    """FlashAttention-2 reads non-contiguous position_ids of a batch-1 sequence as packed sequences, so the
    attention function must see none; an attention function that records its kwargs checks it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    if backend == "triton" and not triton_installed():  # an error under CI, which installs triton
        pytest.skip("triton is not installed")
    seen = []

    def probe(module, *args, **kwargs):
        seen.append(kwargs.get("position_ids"))
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("vtprune_test_probe", probe)
    AttentionMaskInterface.register("vtprune_test_probe", sdpa_mask)
    layer, rot, cfg = tiny_layer("qwen2_5_vl", attn="vtprune_test_probe")
    x, kpm, pos, pe = inputs(rot)
    mask = routed_attention_mask(cfg, IDX, kpm)
    with torch.no_grad():
        a = routed_layer(layer, x.clone(), IDX, position_embeddings=pe, attention_mask=mask, position_ids=pos,
                         backend=backend)
        b = routed_layer(layer, x.clone(), IDX, position_embeddings=pe, attention_mask=mask, backend=backend)
    assert seen == [None, None] and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_cache_holds_the_routed_tokens_and_decodes_like_the_compacted_layer(family, backend):
    if backend == "triton" and not triton_installed():  # an error under CI, which installs triton
        pytest.skip("triton is not installed")
    layer, rot, cfg = tiny_layer(family)
    x, kpm, pos, pe = inputs(rot)
    K = IDX.shape[1]
    cache = DynamicCache(config=cfg)
    mask = routed_attention_mask(cfg, IDX, kpm, cache, layer_idx=1)
    routed_layer(layer, x.clone(), IDX, position_embeddings=pe, attention_mask=mask, past_key_values=cache,
                 use_cache=True, backend=backend)
    assert cache.get_seq_length(1) == K and cache.get_seq_length(0) == 0
    # one decode step: the next token of each row, at the next original position
    x1 = torch.randn(B, 1, 64, generator=torch.Generator().manual_seed(9))
    pe1 = rope(rot, x1, pos[:, -1:] + 1)
    step = torch.zeros(B, 1, dtype=torch.int64)
    kpm1 = torch.cat([routed_key_padding_mask(IDX, kpm), torch.ones(B, 1, dtype=torch.bool)], 1)  # [B, K + 1]
    mask1 = routed_attention_mask(cfg, step, kpm1, cache, layer_idx=1)
    out = routed_layer(layer, x1.clone(), step, position_embeddings=pe1, attention_mask=mask1,
                       past_key_values=cache, use_cache=True, backend=backend)
    assert cache.get_seq_length(1) == K + 1
    # the same two steps through the plain layer on the compacted sequence
    plain = DynamicCache(config=cfg)
    compact_call(layer, cfg, x, kpm, pe, IDX, plain)
    mask_p = create_causal_mask(config=cfg, inputs_embeds=x1, attention_mask=kpm1, **cache_kwargs(plain), layer_idx=1)
    expected = layer(x1, attention_mask=mask_p, position_embeddings=pe1, **cache_kwargs(plain), use_cache=True)
    if backend == "reference":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.layers[1].keys, plain.layers[1].keys, rtol=1e-5, atol=1e-5)


def brute_force_allowed(idx, kpm):
    """allowed[b, q, k] over the routed sequence: causal by routed order, keys not padding."""
    kr = kpm.gather(1, idx)
    K = idx.shape[1]
    return torch.ones(K, K, dtype=torch.bool).tril()[None] & kr[:, None, :]


def test_mask_sdpa_and_eager_forms():
    kpm = torch.arange(L)[None, :] >= torch.tensor(PADS)[:, None]
    idx = torch.tensor([[0, 3, 4, 7, 8, 10, 12], [0, 1, 2, 3, 6, 9, 11]])  # row 1 routes 3 padding tokens
    allowed = brute_force_allowed(idx, kpm)
    sdpa = routed_attention_mask(tiny_layer("llama", "sdpa")[2], idx, kpm)
    assert sdpa.dtype == torch.bool and torch.equal(sdpa[:, 0][allowed.any(-1)], allowed[allowed.any(-1)])
    eager = routed_attention_mask(tiny_layer("llama", "eager")[2], idx, kpm, dtype=torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and torch.equal(eager[:, 0] == 0, allowed)


def test_mask_materialize_builds_the_same_mask_without_reading_it(monkeypatch):
    import transformers.masking_utils as masking

    kpm = torch.arange(L)[None, :] >= torch.tensor(PADS)[:, None]
    idx = torch.tensor([[0, 3, 4, 7, 8, 10, 12], [0, 1, 2, 3, 6, 9, 11]])
    for attn in ("sdpa", "eager"):
        cfg = tiny_layer("llama", attn)[2]
        expected = routed_attention_mask(cfg, idx, kpm)
        monkeypatch.setattr(masking, "fast_all", lambda t: pytest.fail("materialize=True read the mask"))
        assert torch.equal(routed_attention_mask(cfg, idx, kpm, materialize=True), expected)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="materialize=True needs the key_padding_mask"):
        routed_attention_mask(cfg, idx, None, materialize=True)


def test_mask_flash_attention_is_the_gathered_2d_mask():
    cfg = tiny_layer("llama")[2]
    cfg._attn_implementation = "flash_attention_2"
    kpm = torch.arange(L)[None, :] >= torch.tensor(PADS)[:, None]
    idx = torch.tensor([[0, 3, 4, 7], [0, 1, 6, 9]])
    assert torch.equal(routed_attention_mask(cfg, idx, kpm).bool(), kpm.gather(1, idx))
    assert routed_attention_mask(cfg, idx, None) is None


def test_mask_decode_sees_the_layers_cache():
    layer, rot, cfg = tiny_layer("llama")
    cache = DynamicCache(config=cfg)
    cache.update(torch.zeros(B, 2, 5, 16), torch.zeros(B, 2, 5, 16), 1)  # layer 1 cached 5 tokens, layer 0 none
    kpm = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    m = routed_attention_mask(cfg, torch.zeros(B, 1, dtype=torch.int64), kpm, cache, layer_idx=1)
    assert m.shape == (B, 1, 1, 6) and torch.equal(m[:, 0, 0], kpm)
    with pytest.raises(ValueError, match="P \\+ L"):
        routed_attention_mask(cfg, torch.zeros(B, 1, dtype=torch.int64), kpm[:, :5], cache, layer_idx=1)


def test_mask_errors():
    cfg = tiny_layer("qwen2")[2]
    cfg.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="full attention"):
        routed_attention_mask(cfg, IDX, None, layer_idx=1)
    with pytest.raises(ValueError, match="cache_position must have K"):
        routed_attention_mask(cfg, IDX, None, cache_position=torch.arange(3), layer_idx=0)


def test_errors():
    layer, rot, cfg = tiny_layer("llama")
    x, kpm, _, pe = inputs(rot)

    def call(idx=IDX, **kw):
        kw.setdefault("position_embeddings", pe)
        return routed_layer(layer, x.clone(), idx, backend="reference", **kw)

    with pytest.raises(ValueError, match="strictly ascending"):
        call(IDX.flip(1))
    with pytest.raises(ValueError, match="strictly ascending"):
        call(torch.tensor([[0, 1, 1], [0, 1, 2]]))
    with pytest.raises(ValueError, match="must lie in"):
        call(torch.tensor([[0, 1, L], [0, 1, 2]]))
    with pytest.raises(ValueError, match="dtype in"):
        call(IDX.int())
    with pytest.raises(ValueError, match="1 <= K <= L"):
        call(torch.arange(L + 1).expand(B, L + 1))
    with pytest.raises(ValueError, match="shape \\[B, K\\]"):
        call(IDX[:1])
    with pytest.raises(ValueError, match="full sequence"):
        call(position_embeddings=tuple(t[:, :5] for t in pe))
    with pytest.raises(ValueError, match="cos, sin"):
        call(position_embeddings=pe[0])
    with pytest.raises(ValueError, match="routed sequence's mask"):
        call(attention_mask=kpm)  # the full [B, L] padding mask, not the routed sequence's
    with pytest.raises(ValueError, match="position_ids must be"):
        call(position_ids=[0, 1])
    with pytest.raises(ValueError, match="backend must be one of"):
        routed_layer(layer, x, IDX, position_embeddings=pe, backend="nope")


def test_gather_position_embeddings_mrope_and_broadcast_layouts():
    from vtprune.reference.routed_layer import gather_position_embeddings

    gen = torch.Generator().manual_seed(2)
    rows = torch.arange(B)[:, None]
    mrope = torch.randn(3, B, L, 16, generator=gen)  # [3, B, L, d]: a leading M-RoPE axis
    shared = torch.randn(1, L, 16, generator=gen)  # [1, L, d]: positions shared by the batch
    got_m, got_s = gather_position_embeddings((mrope, shared), IDX)
    assert torch.equal(got_m, mrope[:, rows, IDX])
    assert torch.equal(got_s, shared[0][IDX])
