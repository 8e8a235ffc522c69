"""The shared ``average=`` budget without a model: the solver (vtprune.methods.budget.fit_average), the schedules it
gives each method, argument checks and configs. Measured on models in tests/models/test_budget_average.py."""

import math

import pytest

import vtprune
from vtprune.config import save_method
from vtprune.methods import ALVTS, FastV, PyramidDrop, UniformPool, VisionDrop, VisionZip
from vtprune.methods.budget import fit_average, group_lengths, layer_average
from vtprune.methods.schedule import resolve_count


def _average(lengths, counts):
    return sum(n * c for n, c in zip(lengths, counts)) / sum(lengths)


# ---------------------------------------------------------------------- the solver
@pytest.mark.parametrize("average", [1, 7, 32, 64, 99.5, 128, 300, 575, 576])
@pytest.mark.parametrize("lengths", [(2, 2, 2, 2), (8, 8, 8, 8), (7, 7, 7, 7), (1, 2, 3, 2), (9, 9, 9, 9)])
def test_scale_shape_meets_the_average(average, lengths):
    counts = fit_average(float(average), 576, lengths, ("scale", (48, 35, 26, 19)), 0, "m")
    assert all(1 <= c <= 576 for c in counts)
    assert list(counts) == sorted(counts, reverse=True)  # a stage cannot keep more than it was left
    assert abs(_average(lengths, counts) - average) <= 0.02 * average
    if all(n == lengths[0] for n in lengths) and average == int(average):
        assert _average(lengths, counts) == average  # equal groups: whole counts can hit a whole average exactly


def test_scale_shape_at_32_is_the_official_visiondrop_schedule():
    # the paper's LLaVA-1.5 schedule averaging 32: 48 after the encoder, then 35, 26 and 19
    assert fit_average(32.0, 576, (8, 8, 8, 8), ("scale", (48, 35, 26, 19)), 0, "m") == (48, 35, 26, 19)
    assert VisionDrop(average=32).average_counts(32, 576) == (48, 35, 26, 19)


def test_scale_shape_caps_at_the_image():
    counts = fit_average(500.0, 576, (2, 2, 2, 2), ("scale", (48, 35, 26, 19)), 0, "m")
    assert counts[0] == 576 and _average((2, 2, 2, 2), counts) == 500


@pytest.mark.parametrize("L,K,n,average", [(8, 2, 576, 200), (32, 2, 576, 100), (28, 3, 1000, 400), (4, 2, 144, 80)])
def test_level_shape_is_fastvs_closed_form(L, K, n, average):
    counts = fit_average(float(average), n, (K, L - K), ("level",), 1, "m")
    k = (average * L - K * n) / (L - K)  # (K n + (L - K) k) / L = average
    assert counts[0] == n and abs(counts[1] - k) <= 0.5
    assert abs(_average((K, L - K), counts) - average) <= 0.02 * average


def test_geometric_shape_keeps_a_common_ratio():
    lengths = (8, 8, 8, 8)
    counts = fit_average(250.0, 576, lengths, ("geometric",), 1, "m")
    assert counts[0] == 576 and _average(lengths, counts) == 250
    ratios = [b / a for a, b in zip(counts, counts[1:])]
    assert max(ratios) - min(ratios) < 0.02  # one lambda, up to whole-token rounding
    lam = ratios[0]
    assert 576 * (1 + lam + lam**2 + lam**3) / 4 == pytest.approx(250, rel=0.02)


@pytest.mark.parametrize("shape,fixed,lengths,average,reach", [
    (("level",), 1, (2, 6), 100.0, "144.75 to 576"),  # FastV K=2 of 8: the first 2 layers see all 576
    (("level",), 1, (2, 6), 577.0, "144.75 to 576"),
    (("scale", (48, 35, 26, 19)), 0, (2, 2, 2, 2), 600.0, "1.00 to 576"),
    (("geometric",), 1, (2, 2, 2, 2), 140.0, "144.75 to 576"),
])
def test_out_of_reach_names_average_and_the_range(shape, fixed, lengths, average, reach):
    with pytest.raises(ValueError, match=rf"average={average:g} .*out of reach.*576 visual tokens.*{reach}"):
        fit_average(average, 576, lengths, shape, fixed, "m", "why")


def test_whole_counts_that_cannot_meet_two_percent_are_refused():
    # (10 + 2k) / 3 = 4.2 needs k = 1.3: k = 1 gives 4.0 (-4.8 %), k = 2 gives 4.67 (+11 %)
    with pytest.raises(ValueError, match=r"average=4.2 .*cannot be met within 2%.*closest is 4.00"):
        fit_average(4.2, 10, (1, 2), ("level",), 1, "m")


def test_group_lengths():
    assert group_lengths((2, 4, 6), 8) == (2, 2, 2, 2)
    assert group_lengths((2,), 32) == (2, 30)
    assert layer_average((2, 6), (576, 64)) == 192  # FastV(tokens=64) on 8 layers


# ---------------------------------------------------------------------- what each method resolves to
def test_methods_resolve_counts_per_image():
    vd = VisionDrop(average=64).plan(8)
    assert [resolve_count(s.dominant, 576, 576) + resolve_count(s.contextual, 576, 576)
            for s in (vd.encoder, *vd.stages)] == [96, 70, 52, 38]  # twice the official 32 schedule
    fv = FastV(average=200).plan(8).stages[0]
    assert fv.layer == 2 and resolve_count(fv.dominant, 576, 576) == 75  # (2*576 + 6*75) / 8 = 200.25
    pd = PyramidDrop(average=200).plan(8)
    kept = [resolve_count(s.dominant, 576, 576) for s in pd.stages]
    assert (2 * 576 + 2 * sum(kept)) / 8 == pytest.approx(200, rel=0.02)
    vz = VisionZip(average=100).plan(8).encoder
    assert (resolve_count(vz.dominant, 576, 576), resolve_count(vz.contextual, 576, 576)) == (84, 16)  # 54:10
    assert UniformPool(average=100).tokens == 100
    a = ALVTS(average=100)
    assert a.average_k(576, 8) == 32  # (576 + 7 * 32) / 8 = 100
    assert ALVTS(average=100, first_layer=0).average_k(576, 8) == 100


def test_dynamic_images_get_their_own_counts():
    fv = FastV(average=80).plan(4).stages[0]
    # (2 n + 2 k) / 4 = 80: k = 64 for a 96-token image, 16 for a 144-token one
    assert resolve_count(fv.dominant, 96, 96) == 64 and resolve_count(fv.dominant, 144, 144) == 16
    with pytest.raises(ValueError, match=r"average=80 .*out of reach for an image of 200 visual tokens"):
        resolve_count(fv.dominant, 200, 200)


def test_uniform_pool_needs_a_square_near_the_average():
    assert UniformPool(average=63).tokens == 64  # 1.6 % off
    with pytest.raises(ValueError, match=r"UniformPool: average=128 cannot be met within 2 %.*121 \(11x11\).*144"):
        UniformPool(average=128)


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("make,names", [
    (lambda: VisionDrop(tokens=64, average=64), "tokens="),
    (lambda: VisionDrop(ratio=0.1, average=64), "ratio="),
    (lambda: VisionDrop(encoder=(42, 6), stages={8: (30, 5)}, average=64), "encoder= / stages="),
    (lambda: FastV(ratio=0.5, average=64), "ratio="),
    (lambda: FastV(tokens=64, average=64), "tokens="),
    (lambda: PyramidDrop(0.5, average=64), "ratio="),
    (lambda: VisionZip(54, 10, average=64), "dominant= / contextual="),
    (lambda: UniformPool(64, average=64), "tokens="),
    (lambda: ALVTS(keep=64, average=64), "keep="),
    (lambda: ALVTS(ratio=0.1, average=64), "ratio="),
])
def test_average_excludes_native_knobs(make, names):
    with pytest.raises(ValueError, match=f"give either average= or {names}, not both"):
        make()


@pytest.mark.parametrize("cls", [VisionDrop, FastV, PyramidDrop, VisionZip, UniformPool, ALVTS])
@pytest.mark.parametrize("bad", [0, 0.5, -3, True, "64", math.nan, math.inf])
def test_bad_average_names_the_argument(cls, bad):
    with pytest.raises(ValueError, match="average must be a number >= 1"):
        cls(average=bad)


def test_native_defaults_still_apply_without_average():
    assert PyramidDrop().ratio == 0.5 and VisionZip().encoder.dominant == 54 and UniformPool().tokens == 64
    assert FastV().ratio == 0.5 and ALVTS().keep == 64 and VisionDrop().tokens == 64


@pytest.mark.parametrize("method", [VisionDrop(average=64), FastV(layer=3, average=150), PyramidDrop(average=90.5),
                                    VisionZip(average=64), UniformPool(average=100), ALVTS(average=96, first_layer=2)])
def test_average_round_trips_through_configs(method, tmp_path):
    cfg = vtprune.to_config(method)
    assert cfg["args"]["average"] == method.average
    assert not {"tokens", "ratio", "keep", "dominant", "contextual"} & set(cfg["args"])
    path = tmp_path / "m.json"
    save_method(method, path)
    back = vtprune.load_method(path)
    assert type(back) is type(method) and repr(back) == repr(method)
    assert back.average == method.average


def test_config_refuses_average_with_a_native_knob():
    with pytest.raises(ValueError, match="config: FastV: give either average= or tokens="):
        vtprune.load_method({"method": "fastv", "args": {"tokens": 64, "average": 64}})
