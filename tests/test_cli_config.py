"""Method configs as data (vtprune.config): every method round-trips through dict / JSON / YAML, with the package
version and the model fingerprint; ``vtprune demo --method-config FILE``."""

import json

import pytest
import torch

import vtprune
from vtprune import ALVTS, FastV, PyramidDrop, UniformPool, VisionDrop, VisionZip
from vtprune.cli import main
from vtprune.config import load_method, save_method, to_config

METHODS = [
    VisionDrop(), VisionDrop(tokens=192), VisionDrop(tokens=None), VisionDrop(ratio=0.25, backend="reference"),
    VisionDrop(encoder=(42, 6), stages={8: (30, 5), 16: (22, 4), 24: (16, 3)}),
    VisionDrop(encoder=(0.5, 0.1), stages={2: (None, 0)}),
    ALVTS(), ALVTS(keep=128, rank=32, first_layer=0), ALVTS(ratio=0.11), ALVTS(keep=None),
    ALVTS(keep=64, factors="llava.alvts.safetensors"),
    FastV(), FastV(layer=3, ratio=0.25), FastV(tokens=100),
    VisionZip(), VisionZip(dominant=108, contextual=20),
    PyramidDrop(), PyramidDrop(ratio=0.6, layers=(2, 4, 6)),
    UniformPool(), UniformPool(tokens=144),
]


def same(a, b):
    assert type(a) is type(b) and repr(a) == repr(b)
    assert to_config(a) == to_config(b)
    if not isinstance(a, ALVTS):
        assert a.plan(32) == b.plan(32)  # the executed schedule, not just the description
    else:
        assert (a.keep, a.ratio, a.rank, a.first_layer, a.factors, a.backend) == \
            (b.keep, b.ratio, b.rank, b.first_layer, b.factors, b.backend)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_round_trip_dict_json_yaml(method, tmp_path):
    cfg = vtprune.to_config(method)
    assert cfg["vtprune_version"] == vtprune.__version__ and cfg["method"] == method.name
    same(method, vtprune.load_method(cfg))
    same(method, load_method(json.loads(json.dumps(cfg))))
    for name in ("m.json", "m.yaml"):
        save_method(method, tmp_path / name)
        loaded = load_method(tmp_path / name)
        if isinstance(method, ALVTS) and method.factors is not None:  # relative to the config file
            assert loaded.factors == str(tmp_path / method.factors)
        else:
            same(method, loaded)


def test_official_schedule_is_kept():
    cfg = to_config(VisionDrop(encoder=(42, 6), stages={8: (30, 5), 16: (22, 4), 24: (16, 3)}))
    assert cfg["args"] == {"encoder": [42, 6], "stages": {"8": [30, 5], "16": [22, 4], "24": [16, 3]},
                           "backend": "auto"}


def test_fingerprint_recorded_and_checked():
    from vtprune.models._tiny import tiny_llava

    a, b = tiny_llava(seed=0), tiny_llava(seed=1)
    cfg = to_config(VisionDrop(tokens=64), model=a)
    assert cfg["model_fingerprint"]["num_layers"] == a.config.text_config.num_hidden_layers
    load_method(cfg, model=a)
    with pytest.raises(ValueError, match="made for a different model: weight_sample"):
        load_method(cfg, model=b)


@pytest.mark.parametrize("cfg,match", [
    ({"method": "visiondrops"}, "method must be one of visiondrop, alvts"),
    ({"method": "visiondrop", "args": {"tokens": 64}, "extra": 1}, "unknown keys \\['extra'\\]"),
    ({"method": "visiondrop", "args": {"tokenz": 64}}, "visiondrop args \\['tokenz'\\]"),
    ({"method": "visiondrop", "args": {"tokens": 0}}, "VisionDrop tokens must be a positive int"),
    ({"method": "visiondrop", "args": {"stages": {"eight": [1, 0]}}}, "stages keys must be layer numbers"),
    ({"method": "alvts", "args": [64]}, "args must be a mapping"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        load_method(cfg)


def test_unsaveable_methods():
    from vtprune.alvts import SelectorFactors

    f = SelectorFactors([torch.ones(4, 2)], [torch.ones(4, 2)])
    with pytest.raises(ValueError, match="in-memory SelectorFactors"):
        to_config(ALVTS(factors=f))
    with pytest.raises(ValueError, match="calibration= holds data batches"):
        to_config(ALVTS(calibration={"batches": []}))
    with pytest.raises(ValueError, match="method must be one of"):
        to_config(object())


def test_bad_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_method(p)
    p = tmp_path / "bad.yaml"
    p.write_text("method: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_method(p)


def test_demo_method_config(tmp_path, capsys):
    path = tmp_path / "pool.json"
    save_method(UniformPool(tokens=16), path)
    main(["demo", "--method-config", str(path), "--repeats", "1"])
    out = capsys.readouterr().out
    assert "method: UniformPool(tokens=16)" in out
    assert "visual tokens per decoder layer (of 576): [16," in out


def test_demo_method_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"method": "pool", "args": {"tokens": 10}}')
    with pytest.raises(SystemExit) as e:
        main(["demo", "--method-config", str(path), "--repeats", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--method-config" in err and "UniformPool tokens must be a square number" in err
