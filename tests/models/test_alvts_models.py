"""ALVTS end to end through ``vtprune.apply`` on the three families (tiny random-weight models, CPU).

Reference backend everywhere; the Triton backend through the interpreter (TRITON_INTERPRET=1 without a GPU, set by
tests/conftest.py). Batches: two left-padded prompts; LLaVA-NeXT and Qwen2.5-VL rows hold
images with different token counts.
"""

import importlib.util

import pytest
import torch
from models_common import check_batch_equals_rows
from models_common import row as llava_row
from test_llava_next import SIZES
from test_llava_next import row as next_row
from test_qwen2_5_vl import GRIDS
from test_qwen2_5_vl import row as qwen_row

import vtprune
from vtprune.flops import prefill_flops
from vtprune.methods.alvts import ALVTS
from vtprune.models import _tiny

GEN = dict(max_new_tokens=8, do_sample=False)
KEEP = 16
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("vtprune.triton_kernels") is None,
    reason="needs triton and vtprune.triton_kernels (an installed vtprune)")
FAMILIES = {
    "llava": (_tiny.tiny_llava, lambda m: _tiny.tiny_inputs(m, (3, 7), (6, 4), seed=1), llava_row),
    "llava_next": (_tiny.tiny_llava_next, lambda m: _tiny.tiny_next_inputs(m, (3, 7), (6, 4), SIZES, seed=1),
                   next_row),
    "qwen2_5_vl": (_tiny.tiny_qwen2_5_vl, lambda m: _tiny.tiny_qwen_inputs(m, (3, 7), (6, 4), GRIDS, seed=1),
                   qwen_row),
}
_MODELS = {}


def model_of(family, attn="sdpa"):
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = FAMILIES[family][0](attn_implementation=attn)
    return _MODELS[family, attn]


def setup(family, attn="sdpa"):
    model = model_of(family, attn)
    batch = FAMILIES[family][1](model)
    assert not batch["attention_mask"].all()  # row 0 really is padded
    return model, batch


def image_span(batch, model, b):
    """(start, count) of row b's image tokens (the placeholders: ALVTS does not change the prompt)."""
    where = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
    return int(where[0]), len(where)


class Recording(ALVTS):
    """ALVTS that keeps the routed positions of every layer of the last forward that routed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.routes, self.inputs = {}, set()

    def route(self, layer_idx, normed_hidden, visual_spans, key_padding_mask):
        idx = super().route(layer_idx, normed_hidden, visual_spans, key_padding_mask)
        self.routes[layer_idx] = idx.clone()
        self.inputs.add((id(visual_spans), id(key_padding_mask)))
        return idx


class Replay(ALVTS):
    """Routes a prompt of length L0 as a recorded prefill did, plus every position after it (generated text).

    What the KV cache computes while decoding: each routed layer cached exactly the prefill's routed prompt
    tokens, and every generated token runs through every layer."""

    def __init__(self, routes, prompt_len, **kwargs):
        super().__init__(**kwargs)
        self.routes, self.prompt_len = routes, prompt_len

    def route(self, layer_idx, normed_hidden, visual_spans, key_padding_mask):
        B, L, _ = normed_hidden.shape
        generated = torch.arange(self.prompt_len, L).expand(B, -1)
        return torch.cat([self.routes[layer_idx], generated], 1)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_unpatched(family, attn):
    model, batch = setup(family, attn)
    ref = model(**batch).logits
    ref_gen = model.generate(**batch, **GEN)
    with vtprune.apply(model, ALVTS(keep=None, backend="reference")) as h:
        out = model(**batch).logits
        count0 = image_span(batch, model, 0)[1]
        assert h.stats.visual_tokens_per_layer == [count0] * 4
        assert h.stats.flops == h.stats.flops_unpruned
        gen = model.generate(**batch, **GEN)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_counts_are_the_routed_image_tokens(family):
    model, batch = setup(family)
    router = Recording(keep=KEEP, backend="reference")
    with vtprune.apply(model, router) as h:
        model(**batch)
        st = h.stats
    start, count = image_span(batch, model, 0)
    real0 = int(batch["attention_mask"][0].sum())
    routed = [int(((router.routes[i][0] >= start) & (router.routes[i][0] < start + count)).sum()) for i in (1, 2, 3)]
    assert routed == [KEEP] * 3  # these batches fill row 0 up to the batch's K with its padding, not its image
    assert st.visual_tokens_per_layer == [count] + routed  # layer 0 runs in full (first_layer=1)
    assert st.tokens_per_layer == [real0] + [real0 - count + n for n in routed]
    assert st.flops == prefill_flops(model.config, st.tokens_per_layer) < st.flops_unpruned
    assert len(router.inputs) == 1  # the same span / mask tensors at every layer (ALVTS plans once per forward)


def test_counts_include_image_tokens_that_fill_a_row():
    """Row 0 has the bigger image and less text, so no padding: it fills the batch's K with more image tokens."""
    model = model_of("qwen2_5_vl")
    batch = _tiny.tiny_qwen_inputs(model, (3, 7), (4, 6), (GRIDS[1], GRIDS[0]), seed=2)
    assert batch["attention_mask"][0].all()
    router = Recording(keep=KEEP, backend="reference")
    with vtprune.apply(model, router) as h:
        model(**batch)
        visual = h.stats.visual_tokens_per_layer
    start, count = image_span(batch, model, 0)
    routed = [int(((router.routes[i][0] >= start) & (router.routes[i][0] < start + count)).sum()) for i in (1, 2, 3)]
    assert routed[0] > KEEP
    assert visual == [count] + routed


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_rows_alone(family):
    model, batch = setup(family)
    with vtprune.apply(model, ALVTS(keep=KEEP, backend="reference")):
        check_batch_equals_rows(model, batch, FAMILIES[family][2], GEN)


@pytest.mark.parametrize("family,attn", [("llava", "sdpa"), ("llava", "eager"), ("llava_next", "sdpa"),
                                         ("qwen2_5_vl", "sdpa")])
def test_cached_decoding_equals_recomputation_with_the_same_routes(family, attn):
    """With the KV cache, routed layer i holds the prefill's routed prompt tokens only; each generated token is
    text, so it runs through every layer, attending to that layer's cached tokens and the earlier generated ones.
    Recomputing without a cache must therefore route the prompt exactly as the prefill did, plus all generated
    positions (a fresh ALVTS recomputation would rescore the image with the generated text as extra queries and
    may pick other tokens). Then the greedy tokens agree exactly and the per-step logits up to float rounding."""
    model, batch = setup(family, attn)
    gen = dict(GEN, return_dict_in_generate=True, output_scores=True)
    router = Recording(keep=KEEP, backend="reference")
    with vtprune.apply(model, router):
        cached = model.generate(**batch, **gen)
    L0 = batch["input_ids"].shape[1]
    assert sorted(router.routes) == [1, 2, 3] and router.routes[1].shape[1] < L0
    with vtprune.apply(model, Replay(router.routes, L0, keep=KEEP, backend="reference")):
        recomputed = model.generate(**batch, **gen, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_tokens_pass_through_a_routed_layer(family):
    """At routed layer 2 (seen from hooks on the decoder layer, as the language model calls it): every position
    outside the routed set leaves the layer bit for bit as it came in; ``output_hidden_states`` records the
    same input and output (the in-place routed layer does not overwrite recorded states; hooks fire once)."""
    model, batch = setup(family)
    layer = model.model.language_model.layers[2]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0].clone())),
             layer.register_forward_hook(lambda m, args, out: seen.setdefault("out", out.clone()))]
    router = Recording(keep=KEEP, backend="reference")
    try:
        with vtprune.apply(model, router):
            hidden = model(**batch, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    idx = router.routes[2]
    x, y = seen["in"], seen["out"]
    skipped = torch.ones(x.shape[:2], dtype=torch.bool).scatter_(1, idx, False)
    assert skipped.sum(1).min() > 0
    assert torch.equal(y[skipped], x[skipped])
    real = batch["attention_mask"].bool().gather(1, idx)
    assert not torch.isclose(y.gather(1, idx[..., None].expand(-1, -1, y.shape[-1]))[real],
                             x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))[real]).all(-1).any()
    assert len(hidden) == 5 and torch.equal(hidden[2], x) and torch.equal(hidden[3], y)


@needs_triton
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_matches_reference(family):
    model, batch = setup(family)
    with vtprune.apply(model, ALVTS(keep=KEEP, backend="reference")):
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, **GEN)
    with vtprune.apply(model, ALVTS(keep=KEEP, backend="triton")):
        out = model(**batch).logits
        gen = model.generate(**batch, **GEN)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


@needs_triton
def test_triton_keep_all_reproduces_unpatched():
    model, batch = setup("llava")
    ref = model(**batch).logits
    with vtprune.apply(model, ALVTS(keep=None, backend="triton")):
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_remove_restores_bit_for_bit():
    model, batch = setup("llava")
    layers = model.model.language_model.layers
    ref = model(**batch).logits
    h = vtprune.apply(model, ALVTS(keep=KEEP, backend="reference"))
    assert not torch.equal(model(**batch).logits, ref)
    h.remove()
    assert torch.equal(model(**batch).logits, ref)
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert "forward" not in model.model.__dict__ and "forward" not in model.__dict__


def test_routing_layer_0_needs_use_cache_false():
    model, batch = setup("llava")
    with vtprune.apply(model, ALVTS(keep=KEEP, first_layer=0, backend="reference")) as h:
        with pytest.raises(ValueError, match="layer 0 with a KV cache"):
            model(**batch)
        model(**batch, use_cache=False)
        assert h.stats.visual_tokens_per_layer == [KEEP] * 4
