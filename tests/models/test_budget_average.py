"""The shared budget ``average=N`` measured on models: every method's visual tokens per decoder layer, averaged
over the layers as ``handle.stats`` counts them, lie within 2 % of N for each image, on a fixed-resolution model
(LLaVA-1.5 geometry: 576 patches, 8 layers) and on dynamic resolutions (Qwen2.5-VL with 8 layers, two images
of different sizes in one batch); targets a method cannot reach raise naming ``average``."""

import pytest

import vtprune
from vtprune import ALVTS, FastV, PyramidDrop, UniformPool, VisionDrop, VisionZip
from vtprune.models import _tiny

# a few targets per method, each reachable on a 576-patch image over 8 layers (FastV K = 2 and PyramidDrop's
# first stage after 2 layers keep at least (2 * 576 + 6) / 8 = 144.75; ALVTS's layer 0 (576 + 7) / 8 = 72.9;
# UniformPool keeps square grids)
LLAVA_CASES = [
    (VisionDrop, (32, 64, 128, 300)),
    (FastV, (150, 200, 400)),
    (PyramidDrop, (160, 250, 400)),
    (VisionZip, (37, 64, 200)),
    (UniformPool, (64, 100, 144)),
    (ALVTS, (80, 128, 300)),
]


@pytest.fixture(scope="module")
def llava576():
    model = _tiny.tiny_llava("demo")  # LLaVA-1.5's geometry (336 px, 14 px patches) at toy widths, 8 layers
    return model, _tiny.tiny_inputs(model, (3, 7), (6, 4), seed=1)


@pytest.fixture(scope="module")
def qwen8():
    """Tiny Qwen2.5-VL with 8 decoder layers, and a batch of a 96-token and a 144-token image."""
    saved = dict(_tiny.QWEN)
    _tiny.QWEN["layers"] = 8
    try:
        model = _tiny.tiny_qwen2_5_vl()
    finally:
        _tiny.QWEN.clear()
        _tiny.QWEN.update(saved)
    assert model.config.get_text_config().num_hidden_layers == 8
    return model, _tiny.tiny_qwen_inputs(model, (3, 6), (5, 2), ((16, 24), (24, 24)))


def _run(model, inputs, method):
    with vtprune.apply(model, method) as handle:
        model(**inputs)
        return handle.stats


def _row_averages(stats):
    return [sum(row) / len(row) for row in stats.visual_tokens_per_row]


@pytest.mark.parametrize("cls,average", [(c, n) for c, ns in LLAVA_CASES for n in ns],
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_fixed_resolution_meets_the_average(llava576, cls, average):
    model, inputs = llava576
    stats = _run(model, inputs, cls(average=average))
    assert len(stats.visual_tokens_per_layer) == 8
    assert abs(stats.average_visual_tokens - average) <= 0.02 * average
    for got in _row_averages(stats):  # every row of the batch, not only row 0
        assert abs(got - average) <= 0.02 * average
    assert max(stats.visual_tokens_per_layer) <= 576


QWEN_CASES = [
    (VisionDrop, (24, 60, 90)),
    (FastV, (40, 80, 90)),  # the first 2 of 8 layers see all: (2 * 144 + 6) / 8 = 36.75 up to 96 fit both
    (PyramidDrop, (50, 80)),
    (VisionZip, (25, 50, 90)),
    (ALVTS, (40, 75)),
]


@pytest.mark.parametrize("cls,average", [(c, n) for c, ns in QWEN_CASES for n in ns],
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_dynamic_resolution_meets_the_average_per_image(qwen8, cls, average):
    model, inputs = qwen8
    stats = _run(model, inputs, cls(average=average))
    rows = stats.visual_tokens_per_row
    assert len(rows) == 2 and all(len(r) == 8 for r in rows)
    for got in _row_averages(stats):  # the 96-token and the 144-token image alike
        assert abs(got - average) <= 0.02 * average
    if cls in (FastV, PyramidDrop, ALVTS):  # no encoder stage: layer 0 sees each whole image
        assert [r[0] for r in rows] == [96, 144]


def test_native_and_shared_budgets_differ_as_documented(llava576):
    """The native knobs keep their meaning: at 64, VisionDrop averages 64, FastV 192 and ALVTS 128 on 8 layers;
    average=64 (where reachable) gives 64 for all."""
    model, inputs = llava576
    assert _run(model, inputs, VisionDrop(tokens=64)).average_visual_tokens == 64
    assert _run(model, inputs, FastV(tokens=64)).average_visual_tokens == (2 * 576 + 6 * 64) / 8
    assert _run(model, inputs, ALVTS(keep=64)).average_visual_tokens == (576 + 7 * 64) / 8
    assert _run(model, inputs, PyramidDrop(ratio=0.5)).average_visual_tokens == 2 * (576 + 288 + 144 + 72) / 8
    for method in (VisionZip(), UniformPool(), VisionZip(average=64), UniformPool(average=64)):
        assert _run(model, inputs, method).average_visual_tokens == 64
    stats = _run(model, inputs, VisionDrop(average=32))
    assert stats.visual_tokens_per_layer == [48, 48, 35, 35, 26, 26, 19, 19]  # the official average-32 schedule


@pytest.mark.parametrize("method,reach", [
    (FastV(average=100), "144.75 to 576"),
    (PyramidDrop(average=140), "144.75 to 576"),
    (ALVTS(average=60), "72.88 to 576"),
    (VisionDrop(average=600), "1.00 to 576"),
    (VisionZip(average=577), "1.00 to 576"),
])
def test_unreachable_average_fails_at_apply_on_fixed_resolution(llava576, method, reach):
    model, _ = llava576
    with pytest.raises(ValueError, match=rf"average=\d+ visual tokens per decoder layer is out of reach for an "
                                         rf"image of 576 visual tokens on 8 decoder layers: it reaches {reach}"):
        vtprune.apply(model, method)
    assert getattr(model, "_vtprune_handle", None) is None  # nothing left patched


def test_uniform_pool_beyond_the_image_fails_at_apply(llava576):
    model, _ = llava576
    with pytest.raises(ValueError, match=r"average=625 .*out of reach for an image of 576 patches"):
        vtprune.apply(model, UniformPool(average=625))


@pytest.mark.parametrize("method", [FastV(average=30), PyramidDrop(average=30), VisionDrop(average=100),
                                    ALVTS(average=120), VisionZip(average=120)])
def test_unreachable_average_fails_at_the_forward_on_dynamic_resolution(qwen8, method):
    model, inputs = qwen8
    with vtprune.apply(model, method):
        with pytest.raises(ValueError, match=r"average=\d+ visual tokens per decoder layer is out of reach for an "
                                             r"image of (96|144) visual tokens"):
            model(**inputs)


def test_tiled_images_are_refused():
    from models_common import family_model

    model = family_model("LlavaNextForConditionalGeneration")
    for method in (VisionDrop(average=64), FastV(average=64), ALVTS(average=64)):
        with pytest.raises(ValueError, match="average= counts the visual tokens of one image.*tiles"):
            vtprune.apply(model, method)


def test_one_alvts_object_serves_one_depth(llava576):
    from models_common import family_model

    method = ALVTS(average=100)
    deep, _ = llava576
    with vtprune.apply(deep, method):
        with pytest.raises(ValueError, match="average= solves k for one model depth.*8 decoder layers.*4"):
            vtprune.apply(family_model("LlavaForConditionalGeneration"), method)  # the 4-layer tiny model


@pytest.mark.parametrize("cls", [VisionDrop, FastV, PyramidDrop, VisionZip, ALVTS], ids=lambda c: c.__name__)
def test_qwen3_vl_meets_the_average_per_image(cls):
    """Qwen3-VL's tiny model (4 layers) with its 24- and 36-token images: 20 is reachable by every method on both
    (FastV keeps 16 and 4, ALVTS routes 19 and 15: (24 + 3 * 19) / 4 = 20.25)."""
    from models_common import family_model_and_batch

    model, batch = family_model_and_batch("Qwen3VLForConditionalGeneration")
    stats = _run(model, batch, cls(average=20))
    averages = _row_averages(stats)
    assert len(averages) == 2
    for got in averages:
        assert abs(got - 20) <= 0.02 * 20


@pytest.mark.parametrize("cls,average", [(VisionDrop, 40), (FastV, 60), (PyramidDrop, 60), (VisionZip, 40),
                                         (ALVTS, 50)], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_average_is_per_image_unit_with_several_units_per_prompt(qwen8, cls, average):
    """average= holds per image unit: a prompt with a 96-token image, a 144-token image and a 2-frame-group video
    of 64 tokens per group (4 units) averages 4 N per layer, each unit solved on its own size (a solve over the
    row's total would give N)."""
    model, _ = qwen8
    inputs = _tiny.tiny_qwen_multi_inputs(model, [[3, (16, 24), 2, (24, 24), 2, (2, 16, 16), 4]])
    stats = _run(model, inputs, cls(average=average))
    assert stats.unit_tokens_per_row[0][0][0] == 96 and len(stats.unit_tokens) == 4  # the unpruned stage
    (row,) = _row_averages(stats)
    assert abs(row - 4 * average) <= 0.02 * 4 * average, stats
