"""The command line: ``--version``, ``--help`` listing the commands, and every refused argument ending in one
line naming the argument with exit code 2 (never a traceback, never exit code 1)."""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

import vtprune
from vtprune.cli import main


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "vtprune", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_version_is_the_installed_package_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"vtprune {version('vtprune')}" == f"vtprune {vtprune.__version__}"


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for command in ("demo", "ops"):
        assert f"\n  {command} " in r.stdout, r.stdout


def test_no_command_and_unknown_command_are_one_line_errors():
    for argv in ((), ("frobnicate",)):
        r = run_cli(*argv)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "argument command" in r.stderr or "required: command" in r.stderr


def refused(capsys, argv, match):
    """main(argv) exits with code 2 and prints exactly one stderr line containing ``match``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return str(path)


def test_image_errors(capsys, tmp_path):
    refused(capsys, ["demo", "--image", str(tmp_path / "missing.png")], "--image")
    refused(capsys, ["demo", "--image", str(tmp_path)], "not a regular file")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    refused(capsys, ["demo", "--image", str(junk)], "not a readable image")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_unreadable_image(capsys, png):
    os.chmod(png, 0)
    refused(capsys, ["demo", "--image", png], "not readable")


def test_model_errors(capsys, tmp_path):
    refused(capsys, ["demo", "--model", str(tmp_path / "nowhere")], "--model")
    refused(capsys, ["demo", "--model", str(tmp_path)], "no config.json")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    refused(capsys, ["demo", "--model", str(tmp_path), "--repeats", "1"], "cannot load a LLaVA-1.5 checkpoint")


def test_out_errors(capsys, png, tmp_path):
    refused(capsys, ["demo", "--image", png, "--out", str(tmp_path / "no" / "dir" / "m.png")], "--out")
    refused(capsys, ["demo", "--image", png, "--out", str(tmp_path)], "is a directory")
    refused(capsys, ["demo", "--image", png, "--out", str(tmp_path / "m.txt")], "ending in one of .png")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        refused(capsys, ["demo", "--image", png, "--out", str(ro / "m.png")], "not writable")


@pytest.mark.parametrize("argv,match", [
    (["demo", "--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (["demo", "--repeats", "x"], "argument --repeats: expected a positive integer, got 'x'"),
    (["demo", "--method", "nope"], "argument --method: invalid choice"),
    (["ops", "--rep", "0"], "argument --rep: expected a positive integer"),
    (["ops", "--backends", "reference,tritonn"], "--backends 'reference,tritonn': unknown 'tritonn'"),
    (["ops", "--backends", ","], "--backends ',': unknown empty list"),
    (["ops", "--device", "tpu"], "--device 'tpu'"),
])
def test_argument_errors(capsys, argv, match):
    refused(capsys, argv, match)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_without_cuda(capsys):
    refused(capsys, ["ops", "--device", "cuda"], "--device cuda: CUDA is not available")


@pytest.mark.parametrize("argv,match", [
    # refused when the method is built
    (["--method", "pool", "--tokens", "10"], "--method pool --tokens 10: UniformPool tokens must be a square"),
    # refused on the first forward: more tokens than the image has
    (["--method", "visiondrop", "--tokens", "1000"], "--method visiondrop --tokens 1000 on --family llava"),
])
def test_budget_errors_exit_2(capsys, argv, match):
    refused(capsys, ["demo", *argv, "--repeats", "1"], match)


def test_budget_error_in_a_subprocess_is_one_line_with_code_2():
    r = run_cli("demo", "--method", "visiondrop", "--tokens", "0", "--repeats", "1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("vtprune demo: error: --method visiondrop --tokens 0")
    assert "Traceback" not in r.stderr
