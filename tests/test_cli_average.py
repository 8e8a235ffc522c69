"""``vtprune demo --average N``: the shared budget from the command line (in process, on the built-in tiny
LLaVA with LLaVA-1.5's geometry: 576 image tokens, 8 decoder layers)."""

import pytest

from vtprune.cli import main


@pytest.mark.parametrize("method,average", [("fastv", 200), ("alvts", 100), ("visionzip", 64), ("pyramiddrop", 160)])
def test_demo_average_prints_the_requested_average(capsys, method, average):
    main(["demo", "--method", method, "--average", str(average), "--repeats", "1"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("average visual tokens:"))
    got = float(line.split(":")[1])
    assert abs(got - average) <= 0.02 * average, out
    assert f"average={average}" in out  # the method line shows the shared knob


@pytest.mark.parametrize("argv,match", [
    (["--method", "fastv", "--average", "100"], "--method fastv --average 100 on --family llava: FastV(layer=2, "
                                                "average=100): average=100 visual tokens per decoder layer is out of "
                                                "reach"),
    (["--method", "pool", "--average", "128"], "--method pool --average 128: UniformPool: average=128 cannot be met"),
    (["--method", "fastv", "--average", "100", "--tokens", "5"], "not allowed with argument"),
    (["--method", "fastv", "--average", "many"], "--average: not a number"),
])
def test_demo_average_errors_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv, "--repeats", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
