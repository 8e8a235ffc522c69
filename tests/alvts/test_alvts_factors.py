"""ALVTS selector factors: SVD initialisation (exact at full rank), truncation, save/load, errors."""

import pytest
import torch
from alvts_models import layer_classes, spread_weights, tiny_config, tiny_layer

from vtprune.alvts import SelectorFactors, bilinear_form, default_rank, init_factors, svd_factors


def head_averaged_logits(layer, h, with_bias=False):
    """mean over query heads of (h W_q,h [+ b_q])(h W_k,g(h) [+ b_k])^T * head_dim^-0.5, GQA by repeat."""
    attn = layer.self_attn
    B, L, _ = h.shape
    d = attn.head_dim
    wq, wk = attn.q_proj.weight, attn.k_proj.weight
    q, k = h @ wq.T, h @ wk.T
    if with_bias:
        q, k = q + attn.q_proj.bias, k + attn.k_proj.bias
    q = q.view(B, L, -1, d).transpose(1, 2)  # [B, H, L, d]
    k = k.view(B, L, -1, d).transpose(1, 2)  # [B, Hkv, L, d]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-1, -2)).mean(1) * d**-0.5  # [B, L, L]


def selector_logits(h, u, v):
    return (h @ u) @ (h @ v).transpose(1, 2) / u.shape[1] ** 0.5


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (thin QR path: Hkv*d < D) and MHA (direct SVD)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_rank_equals_head_averaged_pre_rope_logits(family, kv_heads):
    cfg = tiny_config(family)
    cfg.num_key_value_heads = kv_heads
    layer = layer_classes(family)[0](cfg, 0).double()
    spread_weights(layer)
    h = torch.randn(2, 9, 64, dtype=torch.float64)
    for rank in (64, 16 * kv_heads):  # R = D, and R = rank(M) <= Hkv * d
        u, v = svd_factors(layer, rank, compute_dtype=torch.float64, dtype=torch.float64)
        assert u.shape == v.shape == (64, rank)
        expected = head_averaged_logits(layer, h)
        torch.testing.assert_close(selector_logits(h, u, v), expected, rtol=1e-10, atol=1e-10)


def test_key_bias_cancels_in_the_selector_softmax():
    layer, _, _ = tiny_layer("qwen2", dtype=torch.float64)
    with torch.no_grad():
        layer.self_attn.q_proj.bias.zero_()  # a query bias adds a per-key prior the selector cannot express
    h = torch.randn(1, 7, 64, dtype=torch.float64)
    u, v = svd_factors(layer, 64, compute_dtype=torch.float64, dtype=torch.float64)
    ours = torch.softmax(selector_logits(h, u, v), -1)
    theirs = torch.softmax(head_averaged_logits(layer, h, with_bias=True), -1)
    assert layer.self_attn.k_proj.bias.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_truncation_error_is_the_next_singular_value(rank):
    """Eckart-Young: the best rank-r approximation's spectral error is sigma_{r+1} (checks scale and order)."""
    layer, _, _ = tiny_layer("llama", dtype=torch.float64)
    m = bilinear_form(layer)
    sigma = torch.linalg.svdvals(m)
    u, v = svd_factors(layer, rank, compute_dtype=torch.float64, dtype=torch.float64)
    err = torch.linalg.matrix_norm(m - u @ v.T / rank**0.5, ord=2)
    torch.testing.assert_close(err, sigma[rank], rtol=1e-9, atol=1e-12)


def test_default_rank_matches_the_paper():
    assert default_rank(4096) == 256 and default_rank(2048) == 128 and default_rank(64) == 4


def test_init_factors_every_layer_in_the_weight_dtype():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config("llama")).to(torch.bfloat16)
    f = init_factors(model)
    assert f.num_layers == 2 and f.rank == 4 and f.hidden_size == 64 and f.meta["source"] == "svd"
    assert all(u.dtype == torch.bfloat16 for u in f.u)
    u1, _ = svd_factors(model.model.layers[1], 4)
    assert torch.equal(f.u[1], u1)


def test_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    f = SelectorFactors([torch.randn(8, 3, generator=gen) for _ in range(3)],
                        [torch.randn(8, 3, generator=gen).bfloat16().float() for _ in range(3)], {"source": "x"})
    path = tmp_path / "f.safetensors"
    f.save(path)
    g = SelectorFactors.load(path)
    assert g.meta == {"source": "x"} and g.num_layers == 3 and g.rank == 3
    for a, b in zip(f.u + f.v, g.u + g.v):
        assert torch.equal(a, b)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a vtprune ALVTS factors file"):
        SelectorFactors.load(path)
    save_file({"layers.0.u": torch.zeros(2, 1)}, str(path),
              metadata={"format": "vtprune.alvts.factors/1", "num_layers": "1", "rank": "1"})
    with pytest.raises(ValueError, match="lacks tensors"):
        SelectorFactors.load(path)


def test_errors():
    layer, _, _ = tiny_layer("llama")
    for bad in (0, 65, True, 2.0):
        with pytest.raises(ValueError, match="rank must be an int in"):
            svd_factors(layer, bad)
    with pytest.raises(ValueError, match="q_proj/k_proj"):
        svd_factors(torch.nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="shape \\[D, R\\]"):
        SelectorFactors([torch.zeros(4, 2), torch.zeros(4, 3)], [torch.zeros(4, 2), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="equal length"):
        SelectorFactors([torch.zeros(4, 2)], [])
    with pytest.raises(ValueError, match="found no decoder layers"):
        init_factors(torch.nn.Linear(4, 4))
