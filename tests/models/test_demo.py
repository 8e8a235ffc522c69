"""``python -m vtprune demo``: a bad method budget ends in a one-line error (SystemExit), not a traceback."""

import re

import pytest

from vtprune.__main__ import demo


@pytest.mark.parametrize("argv,match", [
    # refused when the method is built
    (["--method", "visionzip", "--tokens", "1"], r"^--method visionzip --tokens 1: encoder dominant must be >= 1"),
    (["--method", "visiondrop", "--tokens", "0"], r"^--method visiondrop --tokens 0: VisionDrop tokens must be"),
    (["--method", "pool", "--tokens", "10"], r"^--method pool --tokens 10: UniformPool tokens must be a square"),
    # refused by apply(): more tokens than the model's images have
    (["--method", "visiondrop", "--tokens", "1000"], r"^--method visiondrop --tokens 1000 on --family llava: "
                                                     r"VisionDrop\(tokens=1000\): its encoder stage keeps 1500 tokens"),
])
def test_bad_budget_is_a_one_line_error(argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        demo([*argv, "--repeats", "1"])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code


@pytest.mark.parametrize(("family", "per_image"), [("llava_next", 16 * 5), ("qwen2_5_vl", 16), ("qwen3_vl", 16)])
def test_demo_runs_on_every_built_in_family(family, per_image, capsys):
    """--tokens is per 336 px tile on LLaVA-NeXT (the demo image has 4 tiles and the base image) and per image on
    the Qwen families; the printed average keeps it within integer rounding of the schedule."""
    demo(["--family", family, "--method", "visiondrop", "--tokens", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert f"tiny random {family}" in out
    average = float(re.search(r"average visual tokens: ([0-9.]+)", out).group(1))
    assert abs(average - per_image) <= 0.1 * per_image, out
