"""Method objects: presets, schedules and argument checks (no model needed)."""

import pytest

import vtprune
from vtprune.methods.schedule import resolve_count


def test_official_default_schedule():
    # DESIGN §4.1 / official scripts: --dominant 42 --contextual 6 --layer_list [8,16,24]
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
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_alvts_export_is_explicit():
    try:
        cls = vtprune.ALVTS
    except ImportError as e:
        assert "vtprune.methods.alvts" in str(e)
    else:
        assert cls.__name__ == "ALVTS"
