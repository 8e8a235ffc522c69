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


# ---------------------------------------------------------------- damaged files and foreign models (issue 11.9)
def _llama(seed):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config("llama")).eval()


def _write(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


FMT = {"format": "vtprune.alvts.factors/1"}


@pytest.mark.parametrize("meta,match", [
    (FMT, "metadata lacks num_layers, rank"),
    ({**FMT, "num_layers": "1"}, "metadata lacks rank"),
    ({**FMT, "num_layers": "one", "rank": "1"}, "metadata num_layers='one' is not an integer"),
    ({**FMT, "num_layers": "1", "rank": "2"}, "metadata rank=2 but layers.0.u has shape \\[8, 3\\]"),
])
def test_load_bad_metadata_names_the_file(tmp_path, meta, match):
    path = _write(tmp_path / "f.safetensors", {"layers.0.u": torch.ones(8, 3), "layers.0.v": torch.ones(8, 3)}, meta)
    with pytest.raises(ValueError, match=f"factors file '{path}': {match}"):
        SelectorFactors.load(path)


def _saved(tmp_path):
    f = SelectorFactors([torch.ones(8, 3)] * 2, [torch.ones(8, 3)] * 2, {"source": "x"})
    path = tmp_path / "f.safetensors"
    f.save(path)
    return path


def test_load_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (4, 20, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"factors file .*: not a readable safetensors file \(truncated or"):
            SelectorFactors.load(path)


def test_load_tampered_header(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,')  # offsets no longer tile the data
    assert header != data[8:8 + n]
    path.write_bytes(bytes(data[:8] + header + data[8 + n:]))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SelectorFactors.load(path)
    path.write_bytes(b"\xff" * 8 + bytes(data[8:]))  # header length past the end of the file
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SelectorFactors.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        SelectorFactors.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_factors_are_refused(tmp_path, bad):
    v = torch.ones(8, 3)
    v[2, 1] = bad
    meta = {**FMT, "num_layers": "2", "rank": "3"}
    tensors = {"layers.0.u": torch.ones(8, 3), "layers.0.v": torch.ones(8, 3), "layers.1.u": torch.ones(8, 3),
               "layers.1.v": v}
    path = _write(tmp_path / "f.safetensors", tensors, meta)
    with pytest.raises(ValueError, match=r"factors file .*: v\[1\] has 1 non-finite"):
        SelectorFactors.load(path)
    with pytest.raises(ValueError, match=r"v\[0\] has 1 non-finite"):
        SelectorFactors([torch.ones(8, 3)], [v])


def test_rank_zero_is_refused(tmp_path):
    meta = {**FMT, "num_layers": "1", "rank": "0"}
    path = _write(tmp_path / "f.safetensors", {"layers.0.u": torch.ones(8, 0), "layers.0.v": torch.ones(8, 0)}, meta)
    with pytest.raises(ValueError, match="num_layers=1, rank=0; both must be >= 1"):
        SelectorFactors.load(path)
    with pytest.raises(ValueError, match="rank R >= 1"):
        SelectorFactors([torch.ones(8, 0)], [torch.ones(8, 0)])


def test_fingerprint_is_saved_and_dtype_invariant(tmp_path):
    from vtprune.alvts.factors import model_fingerprint

    model = _llama(0)
    fp = model_fingerprint(model)
    assert fp["architecture"] == "LlamaDecoderLayer" and fp["num_layers"] == 2 and fp["hidden_size"] == 64
    assert len(fp["weight_sample"]) == 64
    assert model_fingerprint(_llama(1))["weight_sample"] != fp["weight_sample"]
    f = init_factors(model)
    f.save(tmp_path / "f.safetensors")
    g = SelectorFactors.load(tmp_path / "f.safetensors")
    assert g.fingerprint == fp
    g.check_model(model)
    g.check_model(model.to(torch.bfloat16))  # the same checkpoint in another dtype is the same model
    g.check_model(_llama(0).to(torch.float16).to(torch.bfloat16))  # cast chains round differently: still it


def test_factors_of_another_model_with_the_same_shapes_are_refused(tmp_path):
    from vtprune.methods.alvts import ALVTS

    path = tmp_path / "a.safetensors"
    init_factors(_llama(0)).save(path)
    other = _llama(1)
    with pytest.raises(ValueError, match=f"factors file '{path}': made for a different model: weight_sample"):
        ALVTS(keep=4, factors=str(path)).prepare(other.model)
    ALVTS(keep=4, factors=str(path)).prepare(_llama(0).model)  # its own model (same seed) is accepted


def test_fingerprint_fields_are_compared(tmp_path):
    import json

    f = init_factors(_llama(0))
    fp = json.loads(f.meta["model_fingerprint"])
    f.meta["model_fingerprint"] = json.dumps({**fp, "architecture": "Qwen2DecoderLayer"})
    with pytest.raises(ValueError, match="architecture 'Qwen2DecoderLayer' \\(factors\\) vs 'LlamaDecoderLayer'"):
        f.check_model(_llama(0))
    f.meta["model_fingerprint"] = "{not json"
    with pytest.raises(ValueError, match="is not valid JSON"):
        f.check_model(_llama(0))
