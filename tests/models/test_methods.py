"""Method objects: presets, schedules and argument checks (no model needed)."""

import pytest

import vtprune
from vtprune.methods.schedule import resolve_count
from vtprune.methods.visiondrop import ratio_totals


def test_official_default_schedule():
    # docs/methods.md#visiondrop / official scripts: --dominant 42 --contextual 6 --layer_list [8,16,24]
    # --image_token_list [[30,5],[22,4],[16,3]] is "average 32"
    plan = vtprune.VisionDrop(tokens=32).plan(32)
    assert (plan.encoder.dominant, plan.encoder.contextual) == (42, 6)
    assert [(s.layer, s.dominant, s.contextual) for s in plan.stages] == [(8, 30, 5), (16, 22, 4), (24, 16, 3)]


@pytest.mark.parametrize("tokens,totals", [(64, (96, 70, 52, 38)), (128, (192, 140, 104, 76)),
                                           (192, (288, 210, 156, 114))])
def test_presets_keep_the_encoder_rule(tokens, totals):
    plan = vtprune.VisionDrop(tokens=tokens).plan(32)
    got = [plan.encoder.dominant + plan.encoder.contextual] + [s.dominant + s.contextual for s in plan.stages]
    assert tuple(got) == totals
    assert sum(got) / 4 == tokens  # average over the four equal layer groups
    assert got[0] == 1.5 * tokens
    for d, c in [(plan.encoder.dominant, plan.encoder.contextual)] + [(s.dominant, s.contextual) for s in plan.stages]:
        assert 5 <= d / c <= 8  # about the official 7:1 dominant:contextual split


def test_explicit_and_ratio_schedules():
    m = vtprune.VisionDrop(encoder=(42, 6), stages={8: (30, 5), 16: (22, 4), 24: (16, 3)})
    assert m.plan(32) == vtprune.VisionDrop(tokens=32).plan(32)
    plan = vtprune.VisionDrop(ratio=64 / 576).plan(32)
    enc = plan.encoder
    assert resolve_count(enc.dominant, 576, 576) + resolve_count(enc.contextual, 576, 576) == 96
    assert [s.layer for s in vtprune.PyramidDrop().plan(32).stages] == [8, 16, 24]
    assert [s.layer for s in vtprune.VisionDrop().plan(4).stages] == [1, 2, 3]


@pytest.mark.parametrize("make,match", [
    (lambda: vtprune.VisionDrop(tokens=0), "tokens"),
    (lambda: vtprune.VisionDrop(ratio=1.5), "ratio"),
    (lambda: vtprune.VisionDrop(ratio=0.1, encoder=(4, 1)), "either ratio"),
    (lambda: vtprune.VisionDrop(encoder=(4,)), "encoder"),
    (lambda: vtprune.VisionDrop(encoder=(4, 1), stages={0: (2, 1)}), "stage layer"),
    (lambda: vtprune.VisionDrop(encoder=(4, -1)), "contextual"),
    (lambda: vtprune.FastV(ratio=0), "ratio"),
    (lambda: vtprune.UniformPool(tokens=10), "square"),
    (lambda: vtprune.VisionZip(dominant=0), "dominant"),
    (lambda: vtprune.VisionDrop(backend="fast"), "backend"),
    (lambda: vtprune.VisionDrop(tokens=16, ratio=0.5), "tokens=.*ratio="),
    (lambda: vtprune.VisionDrop(tokens=None, ratio=0.5), "tokens=.*ratio="),
    (lambda: vtprune.VisionDrop(tokens=16, encoder=(12, 2), stages={1: (8, 2)}), "tokens=.*encoder="),
    (lambda: vtprune.VisionDrop(tokens=16, stages={1: (8, 2)}), "tokens=.*stages="),
    (lambda: vtprune.FastV(ratio=0.3, tokens=10), "ratio=.*tokens="),
    (lambda: vtprune.FastV(ratio=0.5, tokens=10), "ratio=.*tokens="),  # even the default value, given explicitly
    (lambda: vtprune.FastV(tokens=0.3), "FastV tokens must be a positive int"),
    (lambda: vtprune.FastV(tokens=True), "FastV tokens must be a positive int"),
    (lambda: vtprune.FastV(tokens=0), "FastV tokens must be a positive int"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_defaults_and_single_budgets():
    assert vtprune.VisionDrop().plan(32) == vtprune.VisionDrop(tokens=64).plan(32)
    assert vtprune.VisionDrop(ratio=0.5).tokens is None
    assert vtprune.FastV().plan(4).stages[0].dominant == 0.5
    assert vtprune.FastV(ratio=0.3).plan(4).stages[0].dominant == 0.3
    fastv = vtprune.FastV(tokens=10)
    assert (fastv.ratio, fastv.plan(4).stages[0].dominant) == (None, 10)
    assert repr(fastv) == "FastV(layer=2, tokens=10)"


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 2 / 3, 0.7, 0.8, 0.9, 0.99, 1.0])
def test_ratio_schedule_averages_ratio_and_fits_the_image(ratio):
    totals = ratio_totals(ratio)
    assert sum(totals) / 4 == pytest.approx(ratio)
    assert all(0 < t <= 1 for t in totals) and totals == sorted(totals, reverse=True)
    if ratio <= 2 / 3:  # the paper's rule: the encoder keeps 1.5x the average, the official 48:35:26:19 shape
        assert totals == pytest.approx([ratio * t / 32 for t in (48, 35, 26, 19)])
    plan = vtprune.VisionDrop(ratio=ratio).plan(32)
    for (d, c), total in zip([(plan.encoder.dominant, plan.encoder.contextual)]
                             + [(s.dominant, s.contextual) for s in plan.stages], totals):
        if total == 1.0:  # the whole image: keep every token (still scored and selected)
            assert (d, c) == (None, 0)
        else:
            assert (d, c) == pytest.approx((total * 7 / 8, total / 8))
            for n in (64, 576, 577, 2880):  # never more than the image, the error the review found
                assert resolve_count(d, n, n) + resolve_count(c, n, n) <= n


def test_ratio_one_is_keep_all():
    assert vtprune.VisionDrop(ratio=1.0).plan(32) == vtprune.VisionDrop(tokens=None).plan(32)
    assert ratio_totals(1.0) == [1.0] * 4


def test_alvts_export_is_explicit():
    from vtprune.methods.alvts import ALVTS

    assert vtprune.ALVTS is ALVTS
