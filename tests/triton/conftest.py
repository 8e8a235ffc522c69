"""Triton kernel tests: real kernels on a CUDA device when one is visible, else the CPU interpreter.

TRITON_INTERPRET must be set before the kernels are decorated (at import), so it is set here, before any test
module of this folder imports them; CI sets it anyway (scripts/test.sh). The modules skip on
``importorskip("triton.language")``, not ``"triton"``: with tests/ on sys.path this folder would pass for a
(namespace) package named triton when the real one is missing. Under ``CI`` (which installs Triton) a missing
Triton fails this folder's collection instead (:func:`utils.triton_installed`).
"""

import os

import pytest
import torch

from utils import interpret, triton_installed

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_installed()  # raises under CI when Triton is missing; elsewhere the modules' importorskip skips them


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() and not interpret() else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Make every ``torch.empty`` return garbage (NaN, or -7 for integers) while the test runs.

    The kernels allocate their outputs and workspaces with ``torch.empty`` and must write every element they
    later read or return; a missed element then shows up as NaN or -7 instead of a lucky zero.
    """
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)



@pytest.fixture
def spy_calls(monkeypatch):
    """``spy_calls(module, name)`` wraps ``module.name`` so that each call appends to the returned list: a test
    of one launch path then asserts the path was really taken (it cannot pass on another path)."""

    def attach(module, name: str) -> list:
        calls = []
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
        return calls

    return attach
