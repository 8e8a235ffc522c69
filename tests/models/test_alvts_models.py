"""ALVTS end to end through ``vtprune.apply`` on the three families (tiny random-weight models, CPU).

Reference backend everywhere; the Triton backend through the interpreter (TRITON_INTERPRET=1 without a GPU, set by
tests/conftest.py). Batches: two left-padded prompts; LLaVA-NeXT and Qwen2.5-VL rows hold
images with different token counts.
"""

import importlib.util

import pytest
import torch

import vtprune
from vtprune.flops import prefill_flops
from vtprune.methods.alvts import ALVTS, Route
from vtprune.models import _tiny

GEN = dict(max_new_tokens=8, do_sample=False)
KEEP = 16
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("vtprune.triton_kernels") is None,
    reason="needs triton and vtprune.triton_kernels (an installed vtprune)")
FAMILIES = {  # short name -> (build, two-row batch, row alone) of the family's tiny model
    name: (t.build, lambda m, t=t: t.batch(m, (3, 7), (6, 4), seed=1), t.row) for name, t in (
        ("llava", _tiny.TINY_FAMILIES["LlavaForConditionalGeneration"]),
        ("llava_next", _tiny.TINY_FAMILIES["LlavaNextForConditionalGeneration"]),
        ("qwen2_5_vl", _tiny.TINY_FAMILIES["Qwen2_5_VLForConditionalGeneration"]))
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
    """ALVTS that keeps the routed positions (and fill marks) of every layer of the last forward that routed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.routes, self.fills, self.inputs = {}, {}, set()

    def route(self, layer_idx, normed_hidden, visual_spans, key_padding_mask, *, layer=None, **kw):
        r = super().route(layer_idx, normed_hidden, visual_spans, key_padding_mask, layer=layer, **kw)
        self.routes[layer_idx] = r.idx.clone()
        self.fills[layer_idx] = None if r.fill is None else r.fill.clone()
        self.inputs.add((id(visual_spans), id(key_padding_mask)))
        return r


class Replay(ALVTS):
    """Routes a prompt of length L0 as a recorded prefill did (fill tokens included), plus every position after
    it (generated text).

    What the KV cache computes while decoding: each routed layer cached exactly the prefill's routed prompt
    tokens, and every generated token runs through every layer."""

    def __init__(self, recording, prompt_len, **kwargs):
        super().__init__(**kwargs)
        self.recording, self.prompt_len = recording, prompt_len

    def route(self, layer_idx, normed_hidden, visual_spans, key_padding_mask, *, layer=None, **kw):
        B, L, _ = normed_hidden.shape
        generated = torch.arange(self.prompt_len, L).expand(B, -1)
        idx = torch.cat([self.recording.routes[layer_idx], generated], 1)
        fill = self.recording.fills[layer_idx]
        if fill is not None:
            fill = torch.cat([fill, torch.zeros(generated.shape, dtype=torch.bool)], 1)
        return Route(idx, fill, 0 if fill is None else int(fill.sum(1).max()), True)


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


def test_counts_leave_out_image_tokens_that_fill_a_row():
    """Row 0 has the bigger image and less text, so no padding: it fills the batch's K with more image tokens,
    which leave the layer unchanged and do not count."""
    model = model_of("qwen2_5_vl")
    batch = _tiny.tiny_qwen_inputs(model, (3, 7), (4, 6), (_tiny.QWEN_GRIDS[1], _tiny.QWEN_GRIDS[0]), seed=2)
    assert batch["attention_mask"][0].all()
    router = Recording(keep=KEEP, backend="reference")
    with vtprune.apply(model, router) as h:
        model(**batch)
        st = h.stats
    start, count = image_span(batch, model, 0)
    routed = [int(((router.routes[i][0] >= start) & (router.routes[i][0] < start + count)).sum()) for i in (1, 2, 3)]
    fills = [int(router.fills[i][0].sum()) for i in (1, 2, 3)]
    assert routed[0] > KEEP and [r - f for r, f in zip(routed, fills)] == [KEEP] * 3
    assert st.visual_tokens_per_layer == [count] + [KEEP] * 3
    real0 = int(batch["attention_mask"][0].sum())
    assert st.tokens_per_layer == [real0] + [real0 - count + KEEP] * 3


def _rows_alone(model, batch, row, rows, gen):
    """Last-token logits and greedy tokens of each of ``rows`` batch rows equal that row run alone."""
    n = gen["max_new_tokens"]
    both = model(**batch).logits[:, -1]
    tokens = model.generate(**batch, **gen)[:, -n:]
    for b in range(rows):
        torch.testing.assert_close(both[b], model(**row(batch, b)).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[b], model.generate(**row(batch, b), **gen)[0, -n:]), b


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_rows_with_fill_tokens_equal_each_row_alone(family):
    """Three rows with different image-token counts and text lengths: the batch's uniform K makes some rows route
    fill image tokens. They are no keys and leave each layer unchanged, so every row computes what it computes
    alone (the batch's padding is masked as before)."""
    model = model_of(family)
    if family == "qwen2_5_vl":
        grids = ((8, 12), (4, 4), (12, 8))
        batch = _tiny.tiny_qwen_inputs(model, (3, 9, 1), (6, 2, 4), grids, seed=3)

        def row(batch, b):
            offsets = [0]
            for h, w in grids:
                offsets.append(offsets[-1] + h * w)
            keep = batch["attention_mask"][b].bool()
            return {"input_ids": batch["input_ids"][b:b + 1, keep],
                    "attention_mask": batch["attention_mask"][b:b + 1, keep],
                    "pixel_values": batch["pixel_values"][offsets[b]:offsets[b + 1]],
                    "image_grid_thw": batch["image_grid_thw"][b:b + 1],
                    "mm_token_type_ids": batch["mm_token_type_ids"][b:b + 1, keep]}
        keep = 4
    else:
        batch = _tiny.tiny_next_inputs(model, (3, 9, 1), (6, 2, 4), ((50, 100), (56, 56), (100, 100)), seed=3)
        row = FAMILIES["llava_next"][2]
        keep = 8
    router = Recording(keep=keep, backend="reference")
    with vtprune.apply(model, router):
        model(**batch)
        assert any(f is not None and f.any() for f in router.fills.values())  # the batch really routes fill tokens
        _rows_alone(model, batch, row, 3, GEN)


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
    with vtprune.apply(model, Replay(router, L0, keep=KEEP, backend="reference")):
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


def test_routing_layer_0_needs_use_cache_false():
    model, batch = setup("llava")
    with vtprune.apply(model, ALVTS(keep=KEEP, first_layer=0, backend="reference")) as h:
        with pytest.raises(ValueError, match="layer 0 with a KV cache"):
            model(**batch)
        model(**batch, use_cache=False)
        assert h.stats.visual_tokens_per_layer == [KEEP] * 4


def test_one_alvts_object_patches_two_models_with_their_own_factors():
    """The same ALVTS applied to two models at once: each uses its own selector factors."""
    first, second = _tiny.tiny_llava(seed=0), _tiny.tiny_llava(seed=1)
    batch = _tiny.tiny_inputs(first, (3, 9), (6, 2), seed=2)
    with vtprune.apply(first, ALVTS(keep=8, backend="reference")):
        expected = first(**batch).logits
    with vtprune.apply(second, ALVTS(keep=8, backend="reference")):
        expected_second = second(**batch).logits
    shared = ALVTS(keep=8, backend="reference")
    with vtprune.apply(first, shared), vtprune.apply(second, shared):
        assert torch.equal(first(**batch).logits, expected)
        assert torch.equal(second(**batch).logits, expected_second)
        assert torch.equal(first(**batch).logits, expected)


def _calibration_batch(model):
    batch = _tiny.tiny_inputs(model, (3, 7), (6, 4), seed=4)
    spans = [image_span(batch, model, b) for b in range(2)]
    return dict(batch, visual_spans=torch.tensor(spans))


def test_calibration_runs_image_batches_through_the_vlm():
    """ALVTS(calibration=...) through vtprune.apply encodes the batches' images: the first decoder layer's recorded
    inputs are the projected image features at the image positions (not the placeholders' token embeddings), and
    the calibrated factors differ from a fit on the placeholder embeddings."""
    from vtprune.alvts import calibrate, capture_layer_inputs, init_factors

    model = _tiny.tiny_llava(seed=0)
    lm = model.model.language_model
    batch = _calibration_batch(model)
    records = capture_layer_inputs(model, [batch])
    embedded = lm.get_input_embeddings()(batch["input_ids"])
    image = batch["input_ids"] == model.config.image_token_id
    h = records[0]["hidden_states"]
    assert torch.equal(h[~image], embedded[~image]) and not torch.isclose(h[image], embedded[image]).all(-1).any()

    options = {"steps": 3, "progress": False}
    router = ALVTS(keep=8, rank=4, calibration={"batches": [batch], **options}, backend="reference")
    with vtprune.apply(model, router):
        tuned = router.prepare(lm)
    placeholders = [{"inputs_embeds": embedded, "attention_mask": batch["attention_mask"],
                     "visual_spans": batch["visual_spans"]}]
    via_lm = calibrate(lm, placeholders, factors=init_factors(lm, 4), **options)
    via_vlm = calibrate(lm.layers, records, factors=init_factors(lm, 4), **options)
    assert all(torch.equal(a, b) for a, b in zip(tuned.u + tuned.v, via_vlm.u + via_vlm.v))
    assert not all(torch.allclose(a, b) for a, b in zip(tuned.u, via_lm.u))


def test_capturing_image_batches_through_the_language_model_is_refused():
    from vtprune.alvts import capture_layer_inputs

    model = _tiny.tiny_llava(seed=0)
    batch = _calibration_batch(model)
    with pytest.raises(ValueError, match="'pixel_values' is not a parameter of LlamaModel.forward"):
        capture_layer_inputs(model.model.language_model, [batch])
    with pytest.raises(ValueError, match="'pixel_values' is not a parameter"):
        ALVTS(calibration={"batches": [batch], "steps": 1, "progress": False}).prepare(model.model.language_model)


@pytest.mark.parametrize("lengths,padded", [(((3, 9), (9, 3)), False), (((3, 7), (6, 4)), True)],
                         ids=["no padding", "padded"])
def test_routed_masks_add_no_device_reads(monkeypatch, lengths, padded):
    """The routed layers' masks come from host-side knowledge of their padding: transformers' mask builder, as
    routed_attention_mask calls it, never reads a mask on the host (``fast_all``, one sync each), in prefill or
    decoding."""
    import transformers.masking_utils as masking

    model = model_of("llava")
    batch = _tiny.tiny_inputs(model, *lengths, seed=1)
    assert bool(batch["attention_mask"].all()) != padded
    seen = {"inside": 0, "builds": 0, "reads": 0}
    build, fast_all = masking.create_causal_mask, masking.fast_all

    def counted_build(*args, **kwargs):  # routed_attention_mask imports it from masking_utils when called
        seen["builds"] += 1
        seen["inside"] += 1
        try:
            return build(*args, **kwargs)
        finally:
            seen["inside"] -= 1

    def counted_fast_all(t):
        seen["reads"] += seen["inside"] > 0
        return fast_all(t)

    monkeypatch.setattr(masking, "create_causal_mask", counted_build)
    monkeypatch.setattr(masking, "fast_all", counted_fast_all)
    with vtprune.apply(model, ALVTS(keep=KEEP, backend="reference")):
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # routed layers 1..3 at the prefill; at each of the 3 decoding steps one mask shared by the routed layers, or
    # one per layer when their cached keys hold routed padding
    assert seen["builds"] == 3 + 3 * (3 if padded else 1)
    assert seen["reads"] == 0
